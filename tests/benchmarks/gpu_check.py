"""Real-GPU check of `gpuledger agent`: does what it reports match a known load?

On a machine with an NVIDIA GPU, PyTorch and gpuledger installed:

    python tests/benchmarks/gpu_check.py [--seconds 30] [--device 0]

Starts two worker processes on the same GPU running torch matmul loops of different sizes and
duty cycles (a big busy one, a small mostly idle one) that each hold a known amount of memory,
runs `gpuledger agent --dry-run --interval 1` against the real pynvml for ~30 s, then prints, per
worker, what torch says it reserved next to what the agent saw (per-process memory and SM
utilisation), plus checks: each worker's pid seen, NVML memory >= torch reserved (NVML adds the
CUDA context), the busy worker's SM share above the idle one's, intervals close to 1 s, event
ids unique. Ends in well under 3 minutes; exits 0 when every check passes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
GIB = 1 << 30


def worker(size: int, busy_fraction: float, hold_gib: float, seconds: float, status: str) -> None:
    """A load: hold `hold_gib` extra GiB, then run size x size matmuls `busy_fraction` of the
    time."""
    import torch

    device = torch.device("cuda")
    ballast = torch.empty(int(hold_gib * GIB), dtype=torch.uint8, device=device)
    a = torch.randn(size, size, device=device, dtype=torch.float16)
    b = torch.randn(size, size, device=device, dtype=torch.float16)
    torch.cuda.synchronize()
    end = time.monotonic() + seconds
    iterations = 0
    reserved_samples = []
    while time.monotonic() < end:
        start = time.monotonic()
        while time.monotonic() - start < 0.1 * busy_fraction:
            (a @ b).sum()
            iterations += 1
        torch.cuda.synchronize()
        time.sleep(0.1 * (1 - busy_fraction))
        reserved_samples.append(torch.cuda.memory_reserved())
        Path(status).write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "size": size,
                    "busy_fraction": busy_fraction,
                    "reserved_bytes": max(reserved_samples),
                    "allocated_bytes": torch.cuda.memory_allocated(),
                    "iterations": iterations,
                    "device_name": torch.cuda.get_device_name(),
                }
            )
        )
    del ballast


def agent_command(seconds: float) -> list[str]:
    exe = shutil.which("gpuledger") or str(Path(sys.executable).with_name("gpuledger"))
    args = [
        "agent",
        "--dry-run",
        "--interval",
        "1",
        "--duration",
        str(seconds),
        "--metrics-port",
        "0",
        "--cluster",
        "gpu-check",
        "--node",
        "gpu-check",
    ]
    if Path(exe).exists():
        return [exe, *args]
    return [sys.executable, "-m", "agents.agent_cli", *args]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="agent run (default 30)")
    parser.add_argument("--device", default="0", help="CUDA device for both workers")
    parser.add_argument("--worker", nargs=5, metavar=("SIZE", "BUSY", "GIB", "SECONDS", "STATUS"))
    args = parser.parse_args()
    if args.worker:
        size, busy, hold, seconds, status = args.worker
        worker(int(size), float(busy), float(hold), float(seconds), status)
        return 0

    try:
        import pynvml
        import torch
    except ImportError as exc:
        print(f"SKIP: needs torch and nvidia-ml-py ({exc})")
        return 2
    if not torch.cuda.is_available():
        print("SKIP: torch sees no CUDA device")
        return 2
    pynvml.nvmlInit()
    print(
        f"driver {pynvml.nvmlSystemGetDriverVersion()}, "
        f"{pynvml.nvmlDeviceGetCount()} GPU(s), torch {torch.__version__}"
    )
    pynvml.nvmlShutdown()

    tmp = Path(tempfile.mkdtemp(prefix="gpuledger-gpu-check-"))
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": args.device,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    load_s = args.seconds + 25
    specs = {"busy": (8192, 0.95, 3.0), "light": (1024, 0.15, 1.0)}
    workers = {
        name: subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                str(size),
                str(busy),
                str(hold),
                str(load_s),
                str(tmp / f"{name}.json"),
            ],
            env=env,
        )
        for name, (size, busy, hold) in specs.items()
    }
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
            (tmp / f"{n}.json").exists() for n in workers
        ):
            if any(p.poll() is not None for p in workers.values()):
                print("FAIL: a worker exited early (see its error above)")
                return 1
            time.sleep(0.5)
        time.sleep(2)  # let both loops settle
        print(
            f"workers running: {', '.join(f'{n} pid {p.pid}' for n, p in workers.items())}; "
            f"running the agent for {args.seconds:.0f} s ..."
        )
        out_path = tmp / "agent.jsonl"
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with out_path.open("wb") as out, (tmp / "agent.err").open("wb") as err:
            agent = subprocess.run(
                agent_command(args.seconds),
                stdout=out,
                stderr=err,
                cwd=REPO,
                env=env,
                timeout=args.seconds + 60,
                check=False,
            )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = after.ru_utime + after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
        print(
            f"agent CPU over its {args.seconds:.0f} s run, start-up included: {cpu_s:.2f} s "
            f"({cpu_s / args.seconds * 100:.2f} % of one core)"
        )
        status = {n: json.loads((tmp / f"{n}.json").read_text()) for n in workers}
    finally:
        for p in workers.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in workers.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    if agent.returncode != 0:
        print(f"FAIL: agent exited {agent.returncode}:\n{(tmp / 'agent.err').read_text()[-3000:]}")
        return 1
    return report(
        [json.loads(x) for x in out_path.read_text().splitlines() if x.strip()],
        status,
        {n: p.pid for n, p in workers.items()},
    )


def report(events: list[dict[str, Any]], status: dict[str, Any], pids: dict[str, int]) -> int:
    checks: list[tuple[bool, str]] = []
    samples = [e["data"] for e in events]
    print(
        f"\nagent events: {len(events)} from {len({s['device_uuid'] for s in samples})} device(s)"
    )
    for s in {s["device_uuid"]: s for s in samples}.values():
        print(
            f"  {s['device_uuid']}  {s['gpu_model']}  mig={s['mig_profile']}  "
            f"mem_total={s['mem_total_bytes'] / GIB:.1f} GiB"
        )
    checks.append((len({e["id"] for e in events}) == len(events), "event ids unique"))
    intervals = [s["interval_s"] for s in samples[len({s["device_uuid"] for s in samples}) :]]
    if intervals:
        checks.append(
            (
                all(0.8 <= i <= 1.5 for i in intervals),
                f"interval_s within 0.8-1.5 s (min {min(intervals):.3f}, max {max(intervals):.3f})",
            )
        )
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        for p in s["processes"]:
            by_pid.setdefault(p["pid"], []).append({**p, "device_sm": s["sm_util_pct"]})
    print(f"\nprocesses seen by NVML: {sorted(by_pid)}")
    seen_pid = {name: pid in by_pid for name, pid in pids.items()}
    if not all(seen_pid.values()) and len(by_pid) >= 2:
        # In a container without the host's PID namespace NVML reports host pids: pair the
        # workers with NVML's processes by memory size instead, and say so.
        print("NOTE: worker pids not among NVML's (PID namespace?); pairing by memory size")
        ranked = sorted(
            by_pid, key=lambda pid: -statistics.mean(p["mem_used_bytes"] for p in by_pid[pid])
        )
        mapping = dict(
            zip(sorted(pids, key=lambda n: -status[n]["reserved_bytes"]), ranked, strict=False)
        )
    else:
        mapping = {name: pid for name, pid in pids.items() if pid in by_pid}
    checks.append((all(seen_pid.values()), "each worker's pid seen by NVML through the agent"))
    print(
        f"\n{'worker':8} {'pid':>8} {'torch reserved':>15} {'NVML mem (mean)':>16} "
        f"{'SM % (mean)':>12} {'SM % null':>10} {'samples':>8}"
    )
    sm_means: dict[str, float] = {}
    for name in pids:
        st = status[name]
        pid = mapping.get(name)
        rows = by_pid.get(pid, []) if pid is not None else []
        mem = statistics.mean(r["mem_used_bytes"] for r in rows) if rows else 0.0
        sm_values = [r["sm_util_pct"] for r in rows if r["sm_util_pct"] is not None]
        nulls = sum(1 for r in rows if r["sm_util_pct"] is None)
        sm = statistics.mean(sm_values) if sm_values else float("nan")
        sm_means[name] = sm
        print(
            f"{name:8} {pid or '-':>8} {st['reserved_bytes'] / GIB:>12.2f} GiB "
            f"{mem / GIB:>12.2f} GiB {sm:>12.1f} {nulls:>10} {len(rows):>8}"
        )
        if rows:
            extra = (mem - st["reserved_bytes"]) / GIB
            checks.append(
                (
                    mem >= st["reserved_bytes"] and extra < 2.0,
                    f"{name}: NVML memory >= torch reserved, context overhead "
                    f"{extra:.2f} GiB < 2 GiB",
                )
            )
    if all(v == v for v in sm_means.values()) and len(sm_means) == 2:
        checks.append(
            (
                sm_means["busy"] > sm_means["light"] + 10,
                f"busy worker's SM % ({sm_means['busy']:.0f}) above the light one's "
                f"({sm_means['light']:.0f}) by > 10 points",
            )
        )
    else:
        checks.append(
            (
                False,
                "per-process SM utilisation reported for both workers "
                "(null on MIG instances: run on a whole GPU)",
            )
        )
    device_sm = [
        s["sm_util_pct"] for s in samples if s["processes"] and s["sm_util_pct"] is not None
    ]
    if device_sm:
        print(
            f"\ndevice SM % while loaded: mean {statistics.mean(device_sm):.0f}, "
            f"max {max(device_sm):.0f}"
        )
    print()
    for ok, text in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {text}")
    failed = sum(1 for ok, _ in checks if not ok)
    print(f"\n{'ALL CHECKS PASSED' if not failed else f'{failed} CHECK(S) FAILED'}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())

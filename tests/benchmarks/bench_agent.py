"""CPU cost of `gpuledger agent` sampling 8 GPUs every second, on the fake NVML.

Runs the real command (`gpuledger agent --fake-nvml bench --dry-run --interval 1`, /metrics on)
as a child process and reads its CPU time from /proc/<pid>/stat after a warm-up, so imports and
start-up are not counted. Also times one sampling pass in-process. Linux only.

    .venv/bin/python tests/benchmarks/bench_agent.py [--seconds 30]

The figure includes the fake NVML's own Python work; the real driver's calls cost
microseconds to milliseconds of mostly kernel time each (see notes/nvml-facts.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from agents.demo_scenario import bench_scenario
from agents.fake_nvml import FakeNvml
from agents.metrics import AgentMetrics
from agents.sampler import DeviceSampler, SamplerSettings
from agents.scenario import SimClock
from agents.scenario_views import cgroup_reader
from gpuledger.embedded_broker import free_port
from schemas.events import encode_event

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def per_pass_s(passes: int = 2000) -> float:
    start = 1_800_000_000.0
    clock = SimClock(start)
    scenario = bench_scenario(start)
    sampler = DeviceSampler(
        FakeNvml(scenario, "bench-node", clock),
        SamplerSettings("bench", "bench-node"),
        AgentMetrics(CollectorRegistry(), "bench", "bench-node"),
        cgroup_reader=cgroup_reader(scenario),
        wall_clock=clock,
    )
    sampler.sample()
    began = time.process_time()
    for _ in range(passes):
        clock.advance(1.0)
        for event in sampler.sample():
            encode_event(event)
    return (time.process_time() - began) / passes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    args = parser.parse_args()
    one = per_pass_s()
    print(f"one pass over 8 GPUs (sample + encode, in-process): {one * 1e3:.3f} ms CPU")
    cmd = [
        sys.executable,
        "-m",
        "gpuledger.cli",
        "agent",
        "--fake-nvml",
        "bench",
        "--dry-run",
        "--interval",
        "1",
        "--metrics-port",
        str(free_port()),
        "--metrics-host",
        "127.0.0.1",
        "--duration",
        str(args.warmup + args.seconds + 5),
    ]
    with tempfile.TemporaryFile() as out:  # a file, not a pipe: a full pipe would stall it
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL)
        try:
            time.sleep(args.warmup)
            before, t0 = cpu_seconds(child.pid), time.monotonic()
            time.sleep(args.seconds)
            after, t1 = cpu_seconds(child.pid), time.monotonic()
        finally:
            child.terminate()
            child.wait(timeout=30)
        out.seek(0)
        lines = len(out.read().splitlines())
    share = (after - before) / (t1 - t0) * 100
    print(
        f"gpuledger agent, 8 GPUs at 1 s, {args.seconds:.0f} s measured: "
        f"{share:.2f} % of one core ({after - before:.2f} s CPU); {lines} events printed"
    )
    ok = share < 2.0
    print("PASS: under 2 % of one core" if ok else "FAIL: 2 % of one core or more")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

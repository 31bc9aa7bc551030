"""The worker benchmark on an earlier revision and on this tree, alternating, in one run.

Each side runs its own `tests/benchmarks/bench_worker.py` (one backlog round, then the live phase
unless `--no-live`) as a child process: the earlier revision from a `git archive` of it,
installed with its own build (a compiled extension, where that revision had one) into a
temporary folder that comes first on the child's path. Sides alternate A B B A ..., so the
machine's drift within the run falls on both. Reported per side: worker events/s over the
backlog, worker / raw aiokafka + orjson (raw measured around each worker run, in the same
child), and, live at the cluster's rate, the worker process's cores and its headroom (1 / cores).

    .venv/bin/python tests/benchmarks/bench_before_after.py --before REV [--pairs 2] \
        [--no-live] [--out before-after.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[2]


def prepare_before(rev: str, tmp: Path, console: Console) -> tuple[Path, Path, bool]:
    """The earlier revision's sources and an install of them; whether it compiled anything."""
    source, site = tmp / "source", tmp / "site"
    source.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    (source / ".cache").symlink_to(REPO / ".cache")  # the Kafka jars
    with console.status(f"installing {rev} into {site} ..."):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--target",
                str(site),
                str(source),
            ],
            check=True,
        )
    compiled = any(site.rglob("*.so"))
    return source, site, compiled


def run_side(
    name: str, tree: Path, pythonpath: Path | None, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    command = [
        sys.executable,
        str(tree / "tests" / "benchmarks" / "bench_worker.py"),
        "--rounds",
        "1",
        "--nodes",
        str(args.nodes),
        "--seconds",
        str(args.seconds),
        "--live-seconds",
        str(args.live_seconds),
        "--out",
        str(out),
    ]
    if args.no_live:
        command.append("--no-live")
    subprocess.run(command, check=True, env=env, cwd=tree, stdout=subprocess.DEVNULL)
    result: dict[str, Any] = orjson.loads(out.read_bytes())
    result["side"] = name
    return result


def summary(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    rounds = [r["worker_rounds"][0] for r in runs]
    live = [r["live"] for r in runs if r.get("live")]
    cores = [x["worker_cores"] for x in live if "worker_cores" in x]
    return {
        "events_per_s": statistics.median(x["events_per_s"] for x in rounds),
        "ratio": statistics.median(x["ratio"] for x in rounds),
        "live_events_per_s": statistics.median(x["events_per_s"] for x in live) if live else None,
        "live_worker_cores": statistics.median(cores) if cores else None,
        "live_loop_cores": (
            statistics.median(x["loop_cores"] for x in live if "loop_cores" in x) if live else None
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, metavar="REV", help="the earlier revision")
    parser.add_argument("--pairs", type=int, default=2, help="runs of each side")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=60, help="seconds of backlog")
    parser.add_argument("--live-seconds", type=int, default=60)
    parser.add_argument("--no-live", action="store_true")
    parser.add_argument("--out", metavar="FILE", help="write every run as JSON")
    args = parser.parse_args()
    console = Console()
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="gpuledger-before-") as name:
        tmp = Path(name)
        source, site, compiled = prepare_before(args.before, tmp, console)
        console.log(f"{args.before}: installed, compiled extension: {compiled}")
        order = []
        for pair in range(args.pairs):
            order += ["before", "after"] if pair % 2 == 0 else ["after", "before"]
        for i, side in enumerate(order):
            tree, path = (source, site) if side == "before" else (REPO, None)
            with console.status(f"run {i + 1}/{len(order)}: {side} ..."):
                result = run_side(side, tree, path, args, tmp / f"run-{i}.json")
            runs[side].append(result)
            w = result["worker_rounds"][0]
            console.log(f"{side}: {w['events_per_s']:,.0f} events/s, worker / raw {w['ratio']:.2f}")
    table = Table(
        title=f"worker, {args.before} (before) vs this tree (after), {os.cpu_count()} CPUs"
    )
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    before, after = summary(runs["before"]), summary(runs["after"])

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    table.add_row(
        "backlog: worker events/s (median)",
        fmt(before["events_per_s"], ",.0f"),
        fmt(after["events_per_s"], ",.0f"),
    )
    table.add_row(
        "backlog: worker / raw (median)", fmt(before["ratio"], ".2f"), fmt(after["ratio"], ".2f")
    )
    table.add_row(
        "live: events/s sent",
        fmt(before["live_events_per_s"], ",.0f"),
        fmt(after["live_events_per_s"], ",.0f"),
    )
    table.add_row(
        "live: worker process cores",
        fmt(before["live_worker_cores"], ".3f"),
        fmt(after["live_worker_cores"], ".3f"),
    )
    table.add_row(
        "live: event-loop thread cores",
        fmt(before["live_loop_cores"], ".3f"),
        fmt(after["live_loop_cores"], ".3f"),
    )
    table.add_row(
        "live: headroom on one core (1 / cores)",
        *(f"{1 / c:.1f}x" if (c := side["live_worker_cores"]) else "-" for side in (before, after)),
    )
    console.print(table)
    if args.out:
        Path(args.out).write_bytes(
            orjson.dumps(
                {"before_rev": args.before, "runs": runs, "before": before, "after": after},
                option=orjson.OPT_INDENT_2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

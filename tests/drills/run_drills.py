"""Run every fault drill (tests/drills/drills.py) and print one table; exit 1 if any fails.

    .venv/bin/python tests/drills/run_drills.py               # full length: ClickHouse down 60 s
    .venv/bin/python tests/drills/run_drills.py --quick       # the test suite's durations
    .venv/bin/python tests/drills/run_drills.py --only poison clock_skew
    .venv/bin/python -m tests.drills.run_drills

Each drill starts a Kafka broker of its own (the jars of .ci/fetch-kafka) and uses the real
ClickHouse engine (chDB) in a temporary folder. The workers' logs go to <work dir>/drills.log.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent):  # tests/drills, tests
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import drills  # noqa: E402
from kafka_broker import DEFAULT_LIBS_DIR, KAFKA_VERSION, fetch_kafka_libs  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402


def _money(rows: int, usd: object) -> str:
    return "0" if not rows else f"{rows} rows (USD {usd})"


def table(results: list[drills.DrillResult], baseline: drills.Baseline) -> Table:
    out = Table(title="gpuledger fault drills", show_lines=False)
    for column in (
        "drill",
        "totals equal",
        "lost",
        "double counted",
        "dead letters (expected/actual)",
        "worker alive",
        "seconds",
        "result",
    ):
        out.add_column(column, justify="right" if column == "seconds" else "left")
    why = []
    for r in results:
        d = r.diff
        letters_ok = not r.dead_letter_problems
        out.add_row(
            r.name,
            "yes" if r.totals_equal else "[red]NO[/red]",
            _money(d.lost_rows, d.lost_usd) if d else "?",
            _money(d.double_rows, d.double_usd) if d else "?",
            f"{r.dead_letters_expected}/{r.dead_letters_actual}"
            + ("" if letters_ok else " [red]✗[/red]"),
            "yes" if r.workers_alive else "[red]NO[/red]",
            f"{r.elapsed_s:.0f}",
            "[green]pass[/green]" if r.ok else "[red]FAIL[/red]",
        )
        if not r.ok:
            failures = r.failures()
            more = f" (+{len(failures) - 3} more)" if len(failures) > 3 else ""
            why.append(f"{r.name}: " + "; ".join(failures[:3]) + more)
    oracle = "equal to" if baseline.matches_oracle else "NOT equal to"
    teams = ", ".join(f"{t} {v}" for t, v in sorted(baseline.ledger.cost_by_team.items()))
    caption = [
        f"expected: an undisturbed worker run ({baseline.elapsed_s:.0f} s), {oracle} the "
        f"allocation core; GPU cost by team: {teams}",
        *why,
    ]
    out.caption = "\n".join(caption)
    out.caption_justify = "left"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the test suite's durations")
    parser.add_argument("--clickhouse-down-s", type=float, help="default 60 (quick: 5)")
    parser.add_argument("--broker-down-s", type=float, help="default 10 (quick: 1)")
    parser.add_argument("--converge-s", type=float, help="default 90 (quick: 45)")
    slugs = [d.slug for d in drills.DRILLS]
    parser.add_argument("--only", nargs="+", metavar="DRILL", choices=slugs, help=", ".join(slugs))
    parser.add_argument("--work-dir", type=Path, help="keep chDB folders and logs here")
    parser.add_argument("-v", "--verbose", action="store_true", help="each drill's details")
    args = parser.parse_args(argv)

    settings = drills.QUICK if args.quick else drills.FULL
    changes = {
        "clickhouse_down_s": args.clickhouse_down_s,
        "broker_down_s": args.broker_down_s,
        "converge_s": args.converge_s,
    }
    settings = dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})
    if not (DEFAULT_LIBS_DIR / f"kafka_2.13-{KAFKA_VERSION}.jar").exists():
        fetch_kafka_libs()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpuledger-drills-"))
    work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=work / "drills.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    env = drills.DrillEnv(f"chdb://{work / 'chdb'}", work, settings)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    selected = [d for d in drills.DRILLS if not args.only or d.slug in args.only]
    started = time.monotonic()
    results: list[drills.DrillResult] = []
    try:
        with console.status("undisturbed run"):
            baseline = asyncio.run(drills.compute_baseline(env))
        for drill in selected:
            with console.status(f"drill {drill.slug}"):
                result = asyncio.run(drill.run(env, baseline))
            results.append(result)
            if args.verbose:
                console.print(result.report(), highlight=False, markup=False)
        console.print(table(results, baseline))
        passed = all(r.ok for r in results)
        kept = f"; logs in {work}" if args.work_dir or not passed else ""
        console.print(f"{len(results)} drills in {time.monotonic() - started:.0f} s{kept}")
        return 0 if passed else 1
    finally:
        env.close()
        logging.shutdown()
        if args.work_dir is None and results and all(r.ok for r in results):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

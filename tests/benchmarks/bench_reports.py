"""Report query times at scale: N GPUs x D days of 1-minute windows, four cost rows per
device-window (two pods, a host process, idle) plus two cost-per-token rows, generated inside
ClickHouse with INSERT ... SELECT FROM numbers(). Then the hours are sealed and every report is
timed on rollups and on base rows only.

    .venv/bin/python tests/benchmarks/bench_reports.py --gpus 1000 --days 30 --dsn chdb:///tmp/b
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

from streams.reports.chargeback import chargeback, invoice
from streams.reports.focus_files import write_rows
from streams.reports.params import Period, parse_month
from streams.reports.showback import showback
from streams.reports.tags import tag_compliance
from streams.reports.unit_economics import unit_economics
from streams.rollups import seal_hours
from streams.store import ClickHouseStore

T0 = "toDateTime64('2026-11-01 00:00:00', 3, 'UTC')"


def generate(store: ClickHouseStore, gpus: int, days: int) -> int:
    db = store.database
    windows = days * 24 * 60
    n = gpus * windows
    store.command(
        f"""INSERT INTO {db}.gpu_cost_windows SELECT
        {T0} + toIntervalMinute(intDiv(number, {gpus})) AS window_start,
        window_start + toIntervalMinute(1), 'c1', concat('node-', toString(intDiv(g, 8))),
        concat('GPU-', toString(g)), concat('GPU-', toString(g)), 'NVIDIA H100 80GB HBM3', '',
        multiIf(r = 0, concat('ns-', toString(g % 40)), r = 1, 'sandbox', r = 2, '__host__',
                '__idle__'),
        if(r < 2, concat('pod-', toString(g), '-', toString(r)), ''),
        multiIf(r < 2, concat('uid-', toString(g), '-', toString(r)), r = 2, '__host__',
                '__idle__'),
        multiIf(r = 0, concat('team-', toString(g % 12)), r = 1, '__untagged__', r = 2,
                '__host__', 'platform'),
        multiIf(r = 0, concat('product-', toString(g % 30)), r = 1, '__untagged__', r = 2,
                '__host__', '__idle__'),
        multiIf(r = 0, 'cc-1', r = 1, '__untagged__', r = 2, '__host__', '__idle__'),
        multiIf(r < 2, 'usage', r = 2, 'host', 'idle'),
        [30.0, 10.0, 2.0, 18.0][r + 1] AS secs, 50.0, 1e10,
        toDecimal128(secs * 4 / 3600, 15), toDecimal128(0, 15), toDecimal128(4, 15),
        if(g % 4 = 0, 'spot', 'on_demand'), 1
        FROM (SELECT number, number % {gpus} AS g, arrayJoin([0, 1, 2, 3]) AS r
              FROM numbers({n}))"""
    )
    store.command(
        f"""INSERT INTO {db}.cost_per_token_windows SELECT
        {T0} + toIntervalMinute(intDiv(number, {gpus})) AS window_start,
        window_start + toIntervalMinute(1), 'c1', concat('ns-', toString(g % 40)),
        concat('pod-', toString(g), '-0'), concat('uid-', toString(g), '-0'),
        concat('team-', toString(g % 12)), concat('product-', toString(g % 30), ''), 'cc-1',
        concat('model-', toString(g % 6)), toDecimal128(30 * 4 / 3600, 15), 40000, 8000, 20,
        1000, 2.0, 30.0, toDecimal128(0.6944, 9), 1
        FROM (SELECT number, number % {gpus} AS g FROM numbers({n}))"""
    )
    return n * 4


def timed(label: str, fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    seconds = time.perf_counter() - start
    print(f"{label:<44} {seconds:8.2f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, default=100)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--dsn", default="chdb:///tmp/gpuledger-bench")
    parser.add_argument("--skip-base", action="store_true", help="skip the base-only timings")
    args = parser.parse_args()
    store = ClickHouseStore(args.dsn, database="bench")
    store.command("DROP DATABASE IF EXISTS bench")
    store.create_schema()
    t = time.perf_counter()
    rows = generate(store, args.gpus, args.days)
    print(
        f"generated {rows:,} cost rows ({args.gpus} GPUs x {args.days} days) "
        f"in {time.perf_counter() - t:.1f} s",
        flush=True,
    )
    month = parse_month("2026-11")
    end_ms = month.start_ms + args.days * 86_400_000
    timed("seal_hours (whole period)", lambda: seal_hours(store, end_ms + 2 * 3_600_000))
    print(f"peak RSS after generating and sealing: {peak_rss_mib():,.0f} MiB", flush=True)
    period = Period(month.start_ms, end_ms)
    for use_rollups in (True, False):
        if not use_rollups and args.skip_base:
            continue
        tag = "rollups" if use_rollups else "base rows only (FINAL)"
        timed(
            f"showback by team, {tag}",
            lambda u=use_rollups: showback(store, period, "team", use_rollups=u),
        )
        timed(
            f"showback by model, {tag}",
            lambda u=use_rollups: showback(store, period, "model", use_rollups=u),
        )
        timed(f"tags, {tag}", lambda u=use_rollups: tag_compliance(store, period, use_rollups=u))
        timed(
            f"unit-economics, {tag}",
            lambda u=use_rollups: unit_economics(store, period, use_rollups=u),
        )
        timed(f"chargeback FOCUS CSV, {tag}", lambda u=use_rollups: export_csv(store, month, u))
        timed(
            f"invoice by team, {tag}",
            lambda u=use_rollups: invoice(store, month, by="team", use_rollups=u),
        )
    print(f"peak RSS of the process: {peak_rss_mib():,.0f} MiB", flush=True)


def export_csv(store: ClickHouseStore, month: Period, use_rollups: bool) -> None:
    """The month's FOCUS CSV written to a temporary file, as `gpuledger export` writes it."""
    with tempfile.TemporaryFile() as out:
        rows = write_rows(chargeback(store, month, use_rollups=use_rollups), "focus-csv", out)
        size = out.tell()
    print(f"  {rows:,} FOCUS rows, {size / 2**20:,.1f} MiB of CSV", flush=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()

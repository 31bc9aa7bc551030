"""Bill import and true-up at scale: N GPUs (N/8 nodes of 8) x D days of 1-minute metered
windows (bench_reports' generator, sealed into hourly rollups), the nodes' identities, and an
AWS-shaped FOCUS bill with one usage line per node-hour plus the usual extras. Timed in one run,
each against a baseline measured in the same run:

- import (decode, store the lines, true-up every node-hour) vs reading and decoding the file
  alone (the least an import must do);
- the same file again (fingerprint only) and a restated day (24 hours recomputed, the rest
  copied) vs the first import;
- `bill trueup` (every hour again from the meter) vs the first import;
- showback by team on the billed basis vs the list basis.

    .venv/bin/python tests/benchmarks/bench_bills.py --gpus 80 --days 30 --dsn chdb:///tmp/bb
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_reports import generate, peak_rss_mib

from gpuledger.demo.bills import BillNode, bill_rows, restate, write_bill
from streams.billing.importer import ImportOptions, import_bills, read_bills, retrue_up
from streams.billing.resources import GpuInstanceTypes
from streams.billing.trueup import NonGpuRule
from streams.reports.params import Period, parse_month
from streams.reports.showback import showback
from streams.rollups import seal_hours
from streams.store import ClickHouseStore

HOUR_MS = 3_600_000


def provider_id(node: int) -> str:
    return f"aws:///us-east-1a/i-{node:017x}"


def node_events(store: ClickHouseStore, nodes: int, start_ms: int) -> None:
    at = datetime.fromtimestamp((start_ms - HOUR_MS) / 1000, UTC)
    store.insert_values(
        "node_events",
        ["cluster", "node", "provider_id", "instance_type", "gpus", "cpu_millicores",
         "memory_bytes", "deleted", "time", "event_id"],
        [("c1", f"node-{n}", provider_id(n), "p5.48xlarge", 8, 192_000, 2048 * 2**30, 0, at,
          f"e{n}") for n in range(nodes)],
    )  # fmt: skip


def timed(label: str, fn: object) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()  # type: ignore[operator]
    seconds = time.perf_counter() - start
    print(f"{label:<58} {seconds:8.2f} s", flush=True)
    return seconds, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, default=80)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--dsn", default="chdb:///tmp/gpuledger-bench-bills")
    args = parser.parse_args()
    store = ClickHouseStore(args.dsn, database="bench_bills")
    store.command("DROP DATABASE IF EXISTS bench_bills")
    store.create_schema()
    rows = generate(store, args.gpus, args.days)
    month = parse_month("2026-11")
    end_ms = month.start_ms + args.days * 86_400_000
    seal_hours(store, end_ms + 2 * HOUR_MS)
    nodes = max(1, args.gpus // 8)
    node_events(store, nodes, month.start_ms)
    hours = list(range(month.start_ms, end_ms, HOUR_MS))
    billed = [
        BillNode(provider_id(n), "p5.48xlarge", Decimal("55.04"), Decimal("39.6288"),
                 "savings_plan")
        for n in range(nodes)
    ]  # fmt: skip
    bill = bill_rows("aws", "1.2", billed, hours)
    restated = restate(bill, hours[24:48], Decimal("0.97"))
    with tempfile.TemporaryDirectory() as tmp:
        first, second = Path(tmp) / "bill.csv", Path(tmp) / "restated.csv"
        write_bill(first, bill, "csv")
        write_bill(second, restated, "csv")
        print(
            f"{rows:,} metered cost rows ({args.gpus} GPUs, {nodes} nodes, {args.days} days); "
            f"bill of {len(bill):,} lines, {first.stat().st_size / 2**20:,.1f} MiB CSV",
            flush=True,
        )
        read_s, _ = timed("baseline: read and decode the bill file", lambda: read_bills(
            [first], GpuInstanceTypes()))  # fmt: skip
        import_s, result = timed("import (store lines, true-up every node-hour)", lambda: (
            import_bills(store, [first], ImportOptions())))  # fmt: skip
        again_s, _ = timed("the same file again (unchanged)", lambda: import_bills(
            store, [first], ImportOptions()))  # fmt: skip
        restate_s, restated_result = timed("a restated day (24 hours recomputed)", lambda: (
            import_bills(store, [second], ImportOptions())))  # fmt: skip
        trueup_s, trued = timed("bill trueup, weights rule (every hour again)", lambda: retrue_up(
            store, ImportOptions(rule=NonGpuRule("weights"))))  # fmt: skip
    period = Period(month.start_ms, end_ms)
    list_s, _ = timed("showback by team, list basis", lambda: showback(store, period, "team"))
    billed_s, report = timed("showback by team, billed basis", lambda: showback(
        store, period, "team", basis="billed"))  # fmt: skip
    del result
    latest = trued[0]  # type: ignore[index]
    print(f"import / read alone: {import_s / read_s:.2f}", flush=True)
    print(f"unchanged re-import / import: {again_s / import_s:.2f}", flush=True)
    print(f"restated day / import: {restate_s / import_s:.2f} "
          f"({restated_result.slices[0].changed_hours} hours recomputed)")  # type: ignore[attr-defined]  # fmt: skip
    print(f"trueup / import: {trueup_s / import_s:.2f}", flush=True)
    print(f"showback billed / list: {billed_s / list_s:.2f}", flush=True)
    total = report.total_usd  # type: ignore[attr-defined]
    print(f"billed total {total} {'==' if total == latest.gpu_effective_cost else '!='} the "
          f"newest bill's GPU EffectiveCost {latest.gpu_effective_cost}", flush=True)  # fmt: skip
    print(f"peak RSS of the process: {peak_rss_mib():,.0f} MiB", flush=True)


if __name__ == "__main__":
    main()

"""`bill import` on the real embedded ClickHouse: a provider bill for the test cluster's nodes
goes in once (the same lines again, in any file or format, change nothing), its GPU dollars
land exactly on metered rows and the unmetered line, a re-issued month recomputes only the
hours it changed, bad rows are named by file and line, and a later meter correction is
picked up by `retrue_up`."""

from __future__ import annotations

import csv
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_reports_data import HOUR_MS, T0_MS, cluster_rows, corrected, fresh_store

from streams.billing import ledger
from streams.billing.importer import ImportOptions, import_bills, retrue_up
from streams.billing.slices import KIND_UNMETERED, latest_versions_sql
from streams.billing.trueup import NonGpuRule
from streams.store import ClickHouseStore

N1 = "aws:///us-east-1a/i-0aaaaaaaaaaaaaaa1"
N2 = "aws:///us-east-1b/i-0bbbbbbbbbbbbbbb2"
UNMETERED = "i-0ccccccccccccccc3"


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def line(
    resource: str,
    hour: int,
    effective: str,
    billed: str,
    usage_type: str = "BoxUsage:p5.48xlarge",
    **extra: str,
) -> dict[str, str]:
    return {
        "BillingAccountId": "100000000001",
        "BillingPeriodStart": "2026-11-01T00:00:00Z",
        "BillingPeriodEnd": "2026-12-01T00:00:00Z",
        "ChargePeriodStart": iso(T0_MS + hour * HOUR_MS),
        "ChargePeriodEnd": iso(T0_MS + (hour + 1) * HOUR_MS),
        "ChargeCategory": "Usage",
        "ChargeClass": "",
        "BilledCost": billed,
        "EffectiveCost": effective,
        "ListCost": "98.32",
        "BillingCurrency": "USD",
        "ProviderName": "AWS",
        "ResourceId": resource,
        "x_UsageType": usage_type,
        **extra,
    }


def bill(n1_hour1: str = "70.0000000001") -> list[dict[str, str]]:
    rows = []
    for hour in range(3):
        rows.append(
            line(
                f"arn:aws:ec2:us-east-1:2:instance/{N1.rsplit('/', 1)[1]}",
                hour,
                n1_hour1 if hour == 1 else "70.0000000001",
                "0",
            )
        )
        rows.append(line(N2.rsplit("/", 1)[1], hour, "31.5", "31.5", "BoxUsage:g6e.12xlarge"))
        rows.append(line(UNMETERED, hour, "12.25", "12.25", "BoxUsage:g5.xlarge"))
        rows.append(line("vol-0123", hour, "0.11", "0.11", "EBS:VolumeUsage.gp3"))
    rows.append(line("", 0, "3.2", "3.2", "", ChargeCategory="Tax"))
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def node_events(store: ClickHouseStore) -> None:
    at = datetime.fromtimestamp((T0_MS - HOUR_MS) / 1000, UTC)
    store.insert_values(
        "node_events",
        [
            "cluster",
            "node",
            "provider_id",
            "instance_type",
            "gpus",
            "cpu_millicores",
            "memory_bytes",
            "deleted",
            "time",
            "event_id",
        ],
        [
            ("c1", "n1", N1, "p5.48xlarge", 8, 192_000, 2048 * 2**30, 0, at, "e1"),
            ("c1", "n2", N2, "g6e.12xlarge", 4, 48_000, 384 * 2**30, 0, at, "e2"),
        ],
    )


@pytest.fixture
def store() -> ClickHouseStore:
    store = fresh_store()
    store.insert_rows(cluster_rows(hours=3))
    node_events(store)
    return store


def billed(store: ClickHouseStore, where: str = "1") -> list[tuple[Any, ...]]:
    db = store.database
    return store.query_rows(
        f"SELECT resource_key, kind, sum(effective_cost), sum(billed_cost) FROM "
        f"{db}.billed_cost_hourly FINAL WHERE {latest_versions_sql(db)} AND {where} "
        "GROUP BY resource_key, kind ORDER BY resource_key, kind"
    )


def test_import_allocates_every_gpu_dollar_exactly(store: ClickHouseStore, tmp_path: Path) -> None:
    result = import_bills(store, [write_csv(tmp_path / "bill.csv", bill())], ImportOptions())
    assert result.imported and not result.bad_rows and result.rows_read == 13
    (done,) = result.slices
    assert done.status == "new" and done.version == 1
    want = Decimal("70.0000000001") * 3 + Decimal("31.5") * 3 + Decimal("12.25") * 3
    assert done.gpu_effective_cost == want
    assert done.unmetered_cost == Decimal("36.75")
    sums = {(k, kind): (e, b) for k, kind, e, b in billed(store)}
    n1 = sum(e for (k, _), (e, _) in sums.items() if k == "aws:i-0aaaaaaaaaaaaaaa1")
    assert n1 == Decimal("210.0000000003")
    assert sums[("aws:" + UNMETERED, KIND_UNMETERED)] == (Decimal("36.75"), Decimal("36.75"))
    assert not any(k.startswith("vol-") for k, _ in sums)  # storage is not GPU spend
    # Every metered kind of a billed node gets its share: the idle time too.
    kinds = {kind for (k, kind) in sums if k == "aws:i-0bbbbbbbbbbbbbbb2"}
    assert kinds == {"usage", "host", "idle"}


def test_the_same_lines_again_in_any_format_change_nothing(
    store: ClickHouseStore, tmp_path: Path
) -> None:
    rows = bill()
    import_bills(store, [write_csv(tmp_path / "a.csv", rows)], ImportOptions())
    again = import_bills(
        store, [write_csv(tmp_path / "b.csv", list(reversed(rows)))], ImportOptions()
    )
    assert [s.status for s in again.slices] == ["unchanged"]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "part-00001.parquet")
    parquet = import_bills(store, [tmp_path / "part-00001.parquet"], ImportOptions())
    assert [(s.status, s.version) for s in parquet.slices] == [("unchanged", 1)]
    db = store.database
    assert store.query_rows(f"SELECT count() FROM {db}.bill_versions")[0][0] == 1


def test_a_restated_month_recomputes_only_the_hours_it_changed(
    store: ClickHouseStore, tmp_path: Path
) -> None:
    import_bills(store, [write_csv(tmp_path / "v1.csv", bill())], ImportOptions())
    v1 = ledger.read_trueup(store, next(iter(ledger.latest_versions(store))), 1)
    result = import_bills(store, [write_csv(tmp_path / "v2.csv", bill("64.5"))], ImportOptions())
    (done,) = result.slices
    assert (done.status, done.version, done.changed_hours) == ("restated", 2, 1)
    v2 = ledger.read_trueup(store, done.slice, 2)
    hour1 = (T0_MS + HOUR_MS) // 1000
    assert [r for r in v2 if r[0] != hour1] == [r for r in v1 if r[0] != hour1]
    assert [r for r in v2 if r[0] == hour1] != [r for r in v1 if r[0] == hour1]
    assert (
        done.gpu_effective_cost
        == Decimal("70.0000000001") * 2
        + Decimal("64.5")
        + Decimal("31.5") * 3
        + Decimal("12.25") * 3
    )


def test_bad_rows_are_named_and_block_the_import_unless_skipped(
    store: ClickHouseStore, tmp_path: Path
) -> None:
    rows = bill()
    rows[2]["EffectiveCost"] = "12,25"
    rows[5]["ChargePeriodStart"] = "yesterday"
    path = write_csv(tmp_path / "bad.csv", rows)
    result = import_bills(store, [path], ImportOptions())
    assert not result.imported and result.bad_rows_total == 2
    assert [str(b) for b in result.bad_rows] == [
        f"{path}:4: EffectiveCost: not a number: '12,25'",
        f"{path}:7: ChargePeriodStart: not a FOCUS date-time: 'yesterday'",
    ]
    assert ledger.latest_versions(store) == {}
    skipped = import_bills(store, [path], ImportOptions(skip_bad_rows=True))
    assert skipped.imported and skipped.bad_rows_total == 2
    assert skipped.slices[0].lines == 11


def test_a_meter_correction_is_picked_up_by_retrue_up(
    store: ClickHouseStore, tmp_path: Path
) -> None:
    import_bills(store, [write_csv(tmp_path / "v1.csv", bill())], ImportOptions())
    assert [s.status for s in retrue_up(store, ImportOptions())] == ["unchanged"]
    store.insert_rows(corrected(cluster_rows(hours=3)))  # the untagged pod now has a team
    (done,) = retrue_up(store, ImportOptions())
    assert done.status == "recomputed" and done.version == 2
    db = store.database
    teams = {
        r[0]
        for r in store.query_rows(
            f"SELECT DISTINCT team FROM {db}.billed_cost_hourly FINAL "
            f"WHERE {latest_versions_sql(db)}"
        )
    }
    assert "sandbox-team" in teams
    weights = retrue_up(store, ImportOptions(rule=NonGpuRule("weights")))
    assert weights[0].status == "recomputed" and weights[0].non_gpu_cost > 0
    assert weights[0].gpu_effective_cost == done.gpu_effective_cost


def test_billed_showback_adds_up_to_the_bills_gpu_effective_cost(
    store: ClickHouseStore, tmp_path: Path
) -> None:
    from streams.reports.params import Period
    from streams.reports.showback import UNMETERED_LINE, showback

    (done,) = import_bills(store, [write_csv(tmp_path / "b.csv", bill())], ImportOptions()).slices
    period = Period(T0_MS, T0_MS + 3 * HOUR_MS)
    listed = showback(store, period, "team")
    billed = showback(store, period, "team", basis="billed")
    assert billed.reconciles and listed.reconciles
    assert billed.total_usd == done.gpu_effective_cost
    assert billed.unmetered_usd == Decimal("36.75")
    (unmetered,) = [line for line in billed.lines if line.line_kind == UNMETERED_LINE]
    assert unmetered.cost_cents_usd == Decimal("36.75")
    # The same teams on both bases; the billed basis carries the bill's dollars.
    assert {ln.key for ln in listed.lines} <= {ln.key for ln in billed.lines}
    assert listed.total_usd != billed.total_usd
    table = billed.table()[0]
    assert "billed basis" in table.title
    assert any("(unmetered GPU spend)" in row[0] for row in table.rows)
    weights = retrue_up(store, ImportOptions(rule=NonGpuRule("weights")))
    billed = showback(store, period, "product", basis="billed")
    assert billed.non_gpu_usd == weights[0].non_gpu_cost > 0
    assert billed.total_usd == done.gpu_effective_cost and billed.reconciles


def test_billed_chargeback_and_invoice_carry_the_bill_exactly(
    store: ClickHouseStore, tmp_path: Path
) -> None:
    from streams.reports.chargeback import ExportTotals, chargeback, invoice
    from streams.reports.focus_rules import check_rows
    from streams.reports.params import parse_month

    (done,) = import_bills(store, [write_csv(tmp_path / "b.csv", bill())], ImportOptions()).slices
    month = parse_month("2026-11")
    listed = list(chargeback(store, month))
    totals = ExportTotals()
    rows = list(chargeback(store, month, basis="billed", totals=totals))
    assert check_rows(rows) == []
    assert {r["x_CostBasis"] for r in rows} == {"billed"} and totals.unbilled_rows == 0
    assert {r["x_CostBasis"] for r in listed} == {"list"}
    effective = sum((r["EffectiveCost"] for r in rows), Decimal(0))
    assert effective == totals.total_usd == done.gpu_effective_cost - done.unmetered_cost
    assert sum((r["BilledCost"] for r in rows), Decimal(0)) == Decimal("31.5") * 3
    # List amounts are the price book's either way; the parts of each origin add up to its bill.
    assert [r["ListCost"] for r in rows] == [r["ListCost"] for r in listed]
    by_origin: dict[tuple[Any, ...], Decimal] = {}
    for r in rows:
        key = (r["ChargePeriodStart"], r["ResourceId"], r["SkuPriceId"], r["ListUnitPrice"])
        by_origin[key] = by_origin.get(key, Decimal(0)) + r["EffectiveCost"]
    db = store.database
    want = {
        (iso(int(h) * 1000), d, p, price): e
        for h, d, p, price, e in store.query_rows(
            f"SELECT toUnixTimestamp(hour), device_uuid, pricing, price_per_hour, "
            f"sum(effective_cost) FROM {db}.billed_cost_hourly FINAL WHERE "
            f"{latest_versions_sql(db)} AND kind != 'unmetered' GROUP BY 1, 2, 3, 4"
        )
    }
    assert sorted(by_origin.values()) == sorted(want.values())
    bill_by_team = invoice(store, month, basis="billed")
    assert bill_by_team.exact_total_usd == effective
    assert sum(ln.amount_usd for ln in bill_by_team.lines) == bill_by_team.total_usd


def test_billed_showback_by_model_keeps_the_total_exact(
    store: ClickHouseStore, tmp_path: Path
) -> None:
    from streams.reports.params import Period
    from streams.reports.showback import showback

    (done,) = import_bills(store, [write_csv(tmp_path / "b.csv", bill())], ImportOptions()).slices
    period = Period(T0_MS, T0_MS + 3 * HOUR_MS)
    listed = showback(store, period, "model")
    billed = showback(store, period, "model", basis="billed")
    assert billed.reconciles and billed.total_usd == done.gpu_effective_cost
    models = {ln.key for ln in listed.lines if ln.line_kind == "allocated"}
    assert models == {ln.key for ln in billed.lines if ln.line_kind == "allocated"}
    # A model's billed cost is its metered cost at its pods' billed/metered rate: positive.
    assert all(ln.cost_usd > 0 for ln in billed.lines if ln.key in models)


def test_a_restated_storage_line_recomputes_no_hour(store: ClickHouseStore, tmp_path: Path) -> None:
    import_bills(store, [write_csv(tmp_path / "v1.csv", bill())], ImportOptions())
    rows = bill()
    for row in rows:
        if row["ResourceId"] == "vol-0123":
            row["EffectiveCost"] = row["BilledCost"] = "0.13"
    (done,) = import_bills(store, [write_csv(tmp_path / "v2.csv", rows)], ImportOptions()).slices
    assert (done.status, done.version, done.changed_hours) == ("restated", 2, 0)
    assert ledger.read_trueup(store, done.slice, 2) == ledger.read_trueup(store, done.slice, 1)


def test_a_restated_hour_beside_a_monthly_credit_recomputes_that_hour_alone(
    store: ClickHouseStore, tmp_path: Path
) -> None:
    n1 = f"arn:aws:ec2:us-east-1:2:instance/{N1.rsplit('/', 1)[1]}"
    credit = line(n1, 0, "-9.75", "-9.75", "", ChargeCategory="Credit")
    credit["ChargePeriodEnd"] = "2026-12-01T00:00:00Z"  # the whole month
    import_bills(store, [write_csv(tmp_path / "v1.csv", [*bill(), credit])], ImportOptions())
    result = import_bills(
        store, [write_csv(tmp_path / "v2.csv", [*bill("64.5"), credit])], ImportOptions()
    )
    (done,) = result.slices
    assert (done.status, done.changed_hours) == ("restated", 1)
    db = store.database
    n1_total = store.query_rows(
        f"SELECT sum(effective_cost) FROM {db}.billed_cost_hourly FINAL WHERE "
        f"{latest_versions_sql(db)} AND resource_key = 'aws:i-0aaaaaaaaaaaaaaa1'"
    )[0][0]
    assert n1_total == Decimal("70.0000000001") * 2 + Decimal("64.5") - Decimal("9.75")


def test_a_restatement_under_another_non_gpu_rule_recomputes_every_hour(
    store: ClickHouseStore, tmp_path: Path
) -> None:
    weights = ImportOptions(rule=NonGpuRule("weights"))
    import_bills(store, [write_csv(tmp_path / "v1.csv", bill())], ImportOptions())
    (trued,) = retrue_up(store, weights)
    assert trued.non_gpu_cost > 0
    (same_rule,) = import_bills(
        store, [write_csv(tmp_path / "v2.csv", bill("64.5"))], weights
    ).slices
    assert same_rule.changed_hours == 1 and same_rule.non_gpu_cost > 0
    (other_rule,) = import_bills(
        store, [write_csv(tmp_path / "v3.csv", bill("64.25"))], ImportOptions()
    ).slices
    assert other_rule.changed_hours == 3 and other_rule.non_gpu_cost == 0
    (latest,) = ledger.latest_versions(store).values()
    assert latest.non_gpu_rule == "whole" and latest.version == other_rule.version

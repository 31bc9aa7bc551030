"""A generated month of chargeback through the FinOps Foundation's validator (focus-validator,
FOCUS 1.2 rules, offline), as CSV and as Parquet: no failure beyond the rule model's known
defects, for the applicability criteria that describe gpuledger's data (GPULEDGER_CRITERIA).
The 1.3 statements the 1.2 model lacks are `check_rows`' (tests/unit/reports)."""

from __future__ import annotations

from pathlib import Path

import pytest
from focus_validator import GPULEDGER_CRITERIA, KNOWN_MODEL_ARTIFACTS, run_validator
from test_reports_data import cluster_rows, fresh_store

from streams.pricing import EXAMPLE_PRICE_BOOK, load_price_book
from streams.reports.chargeback import chargeback
from streams.reports.focus_files import export_bytes, read_rows
from streams.reports.focus_rules import check_rows
from streams.reports.params import parse_month
from streams.store import ClickHouseStore

pytestmark = pytest.mark.slow
NOVEMBER = parse_month("2026-11")
# A header with no rows: the model's "one of the allowed values" rules find no value to allow.
EMPTY_FILE_ARTIFACTS = {
    "ChargeCategory-C-003-M",
    "ChargeFrequency-C-003-M",
    "PricingCategory-C-007-M",
    "ServiceCategory-C-003-M",
    "ServiceSubcategory-C-003-M",
    "ServiceSubcategory-C-004-M",
}


@pytest.fixture(scope="module")
def month() -> ClickHouseStore:
    """30 days of the test cluster, a window an hour: on-demand and spot, a whole GPU and a
    MIG instance, tagged, untagged and host use, idle time, three models."""
    store = fresh_store()
    store.insert_rows(cluster_rows(hours=30 * 24, window_minutes_step=60))
    return store


@pytest.mark.parametrize(("fmt", "suffix"), [("focus-csv", "csv"), ("focus-parquet", "parquet")])
def test_a_generated_month_passes_the_validator(
    month: ClickHouseStore, tmp_path: Path, fmt: str, suffix: str
) -> None:
    book = load_price_book(EXAMPLE_PRICE_BOOK)
    data = export_bytes(chargeback(month, NOVEMBER, book=book), fmt)
    rows = read_rows(data, fmt)
    assert len({r["ChargePeriodStart"] for r in rows}) == 30 * 24
    assert {r["PricingCategory"] for r in rows} == {"Standard", "Dynamic"}
    assert check_rows(rows) == []
    path = tmp_path / f"november.{suffix}"
    path.write_bytes(data)
    report = run_validator(path, criteria=GPULEDGER_CRITERIA)
    assert not report.unexpected_failures(), report.summary()
    assert report.failed_rule_ids - set(KNOWN_MODEL_ARTIFACTS) <= {
        f.rule_id for f in report.failures if "failed child rules" in f.message
    }
    for rule in ("BilledCost-C-000-M", "SkuPriceId-C-008-M", "SkuId-C-000-C", "Tags-C-000-C"):
        assert report.status(rule) == "PASS", rule


def test_an_empty_month_fails_only_where_the_model_needs_a_row(
    month: ClickHouseStore, tmp_path: Path
) -> None:
    path = tmp_path / "october.csv"
    path.write_bytes(export_bytes(chargeback(month, parse_month("2026-10")), "focus-csv"))
    report = run_validator(path, criteria=GPULEDGER_CRITERIA)
    plain = {f.rule_id for f in report.failures if "failed child rules" not in f.message}
    assert plain - set(KNOWN_MODEL_ARTIFACTS) <= EMPTY_FILE_ARTIFACTS, report.summary()
    present = [rule for rule in report.statuses if rule.startswith("CostAndUsage-D-")]
    assert present and all(report.status(rule) != "FAIL" for rule in present)  # every column

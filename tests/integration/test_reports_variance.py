"""The variance report against the real embedded ClickHouse: metered rows beside a provider
bill's true-up rows (an older and an unfinished version of the slice that must not count), with
exact amounts, the verdicts, the metered node the bill lacks, unmetered GPU spend, a bill in
another currency, and the limits."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from test_reports_data import HOUR_MS, T0_MS, fresh_store

from runtime.errors import ConfigError
from streams.pricing import PriceBook, parse_price_book
from streams.reports import variance as variance_module
from streams.reports.params import Period
from streams.reports.render import render
from streams.reports.variance import VarianceReport, parse_threshold, variance
from streams.rollups import seal_hours
from streams.rows import CostRow
from streams.store import ClickHouseStore

SLICE = "aws|acct-1|2026-11-01T00:00:00Z"
PERIOD = Period(T0_MS, T0_MS + 6 * HOUR_MS)
BOOK = parse_price_book(
    """
currency: USD
default_price_per_hour: 2.00
prices:
  - gpu_model: H100
    pricing: on_demand
    price_per_hour: 4.00
    id: contract-7/h100
  - gpu_model: A100
    pricing: spot
    price_per_hour: 1.50
  - gpu_model: A100
    pricing: spot
    price_per_hour: 1.20
    effective_from: 2026-11-01T02:00:00Z
"""
)
A100_OLD, A100_NEW = "A100|spot|always", "A100|spot|2026-11-01T02:00:00Z"
BILLED_COLUMNS = [
    "slice", "version", "hour", "resource_key", "instance_type", "cluster", "node",
    "device_uuid", "gpu_model", "mig_profile", "pricing", "price_per_hour", "namespace", "pod",
    "pod_uid", "team", "product", "cost_center", "kind", "device_seconds", "metered_cost_usd",
    "effective_cost", "billed_cost", "billing_currency",
]  # fmt: skip


def _hour(n: int) -> datetime:
    return datetime.fromtimestamp((T0_MS + n * HOUR_MS) / 1000, UTC)


def metered(
    hour: int, node: str, device: str, model: str, pricing: str, price: str, **changes: Any
) -> CostRow:
    """One window of a whole hour: usage of the whole device unless `changes` say otherwise."""
    values: dict[str, Any] = dict(
        window_start_ms=T0_MS + hour * HOUR_MS,
        window_end_ms=T0_MS + (hour + 1) * HOUR_MS,
        cluster="c1",
        node=node,
        device_uuid=device,
        gpu_uuid=device,
        gpu_model=model,
        mig_profile="",
        namespace="ns",
        pod="p",
        pod_uid=f"uid-{node}",
        team="search",
        product="web",
        cost_center="cc",
        kind="usage",
        device_seconds=3600.0,
        sm_util_avg=50.0,
        mem_bytes_avg=1e9,
        cost_usd=Decimal(price),
        idle_cost_usd=Decimal(0),
        price_per_hour=Decimal(price),
        pricing=pricing,
        version=1,
    )
    values.update(changes)
    return CostRow(**values)


def billed(
    version: int, hour: int, row: CostRow | None, kind: str, effective: str, **changes: Any
) -> tuple[Any, ...]:
    """A true-up row: over metered `row`, or (row None) a node's non-GPU part or unmetered."""
    values: dict[str, Any] = dict.fromkeys(BILLED_COLUMNS, "")
    values |= dict(
        slice=SLICE,
        version=version,
        hour=_hour(hour),
        resource_key="i-node",
        instance_type="p5.48xlarge",
        price_per_hour=Decimal(0),
        kind=kind,
        device_seconds=0.0,
        metered_cost_usd=Decimal(0),
        effective_cost=Decimal(effective),
        billed_cost=Decimal(effective) * 2,
        billing_currency="USD",
    )
    if row is not None:
        for name in ("cluster", "node", "device_uuid", "gpu_model", "mig_profile", "pricing",
                     "price_per_hour", "namespace", "pod", "pod_uid", "team", "product",
                     "cost_center", "device_seconds"):  # fmt: skip
            values[name] = getattr(row, name)
        values["metered_cost_usd"] = row.cost_usd
        values["resource_key"] = f"i-{row.node}"
    values.update(changes)
    return tuple(values[c] for c in BILLED_COLUMNS)


def finish(
    store: ClickHouseStore, version: int, currency: str = "USD", slice_: str = SLICE
) -> None:
    store.insert_values(
        "bill_versions",
        ["slice", "provider", "billing_account_id", "billing_period_start",
         "billing_period_end", "billing_currency", "version", "fingerprint", "lines",
         "changed_periods", "source_files", "imported_at"],
        [(slice_, "aws", "acct-1", datetime(2026, 11, 1, tzinfo=UTC),
          datetime(2026, 12, 1, tzinfo=UTC), currency, version, f"fp-{version}", 10, 1,
          ["bill.csv"], datetime(2026, 12, 2, tzinfo=UTC))],
    )  # fmt: skip


# n1: an H100 (4.00 / GPU-h), used for hour 0 and half of hour 1.
N1 = [
    metered(0, "n1", "GPU-1", "H100", "on_demand", "4.00"),
    metered(1, "n1", "GPU-1", "H100", "on_demand", "2.00", device_seconds=1800.0,
            price_per_hour=Decimal("4.00")),
    metered(1, "n1", "GPU-1", "H100", "on_demand", "2.00", device_seconds=1800.0,
            price_per_hour=Decimal("4.00"), kind="idle", pod_uid="__idle__", team="platform"),
]  # fmt: skip
# n2: an A100 on spot, whose price-book price drops from 1.50 to 1.20 at 02:00.
N2 = [metered(h, "n2", "GPU-2", "A100", "spot", "1.50") for h in (0, 1)] + [
    metered(h, "n2", "GPU-2", "A100", "spot", "1.20") for h in (2, 3)
]
# n3: metered, but the bill has no line for it.
N3 = [metered(h, "n3", "GPU-3", "H100", "on_demand", "4.00") for h in (0, 1)]


def _bill(version: int, scale: str = "1") -> list[tuple[Any, ...]]:
    k = Decimal(scale)
    return [
        billed(version, 0, N1[0], "usage", str(Decimal("2.88") * k)),
        billed(version, 1, N1[1], "usage", str(Decimal("1.44") * k)),
        billed(version, 1, N1[2], "idle", str(Decimal("1.44") * k)),
        billed(version, 0, N2[0], "usage", "1.50"),
        billed(version, 1, N2[1], "usage", "1.50"),
        billed(version, 2, N2[2], "usage", "1.30"),
        billed(version, 3, N2[3], "usage", "1.30"),
        billed(version, 0, None, "non_gpu", "0.50", cluster="c1", node="n1", resource_key="i-n1"),
        billed(version, 0, None, "unmetered", "98.32", resource_key="i-0abc"),
    ]


def _bill_line(version: int) -> tuple[Any, ...]:
    """The unmetered instance's bill line: a charge of two hours."""
    return (SLICE, version, 1, "bill.csv", _hour(0), _hour(2), "Usage", "", "i-0abc", "",
            "i-0abc", "p5.48xlarge", 1, "Amazon EC2", "sku", "us-east-1", Decimal("98.32"),
            Decimal("98.32"), Decimal("98.32"), "USD")  # fmt: skip


@pytest.fixture(scope="module")
def store() -> ClickHouseStore:
    store = fresh_store()
    store.insert_rows([*N1, *N2, *N3])
    store.insert_values("billed_cost_hourly", BILLED_COLUMNS, _bill(1, "10"))  # superseded
    store.insert_values("billed_cost_hourly", BILLED_COLUMNS, _bill(2))
    store.insert_values("billed_cost_hourly", BILLED_COLUMNS, _bill(3, "100"))  # never finished
    lines = [row[0] for row in store.query_rows(f"DESCRIBE TABLE {store.database}.bill_lines")]
    store.insert_values("bill_lines", lines, [_bill_line(1), _bill_line(2)])
    finish(store, 1)
    finish(store, 2)
    return store


def _lines(report: VarianceReport) -> dict[tuple[str, str | None], Any]:
    return {(line.gpu_model, line.entry_id): line for line in report.lines}


def test_lines_per_price_book_entry_are_exact(store: ClickHouseStore) -> None:
    report = variance(store, PERIOD, price_book=BOOK)
    lines = _lines(report)
    assert set(lines) == {("H100", "contract-7/h100"), ("A100", A100_OLD), ("A100", A100_NEW)}
    h100 = lines[("H100", "contract-7/h100")]
    assert (h100.device_hours, h100.metered_usd, h100.effective_cost) == (
        Decimal(2),
        Decimal("8.00"),
        Decimal("5.76"),
    )
    assert h100.billed_cost == Decimal("11.52")
    assert (h100.book_rate, h100.bill_rate) == (Decimal("4.00"), Decimal("2.88"))
    assert (h100.variance, h100.variance_pct) == (Decimal("-2.24"), Decimal("-28"))
    old, new = lines[("A100", A100_OLD)], lines[("A100", A100_NEW)]
    assert (old.metered_usd, old.effective_cost, old.variance) == (
        Decimal("3.00"),
        Decimal("3.00"),
        Decimal(0),
    )
    assert (new.metered_usd, new.effective_cost, new.variance) == (
        Decimal("2.40"),
        Decimal("2.60"),
        Decimal("0.20"),
    )
    assert (new.book_rate, new.bill_rate) == (Decimal("1.20"), Decimal("1.30"))
    # Only version 2 counts: neither the superseded version 1 nor the unfinished version 3.
    (usd,) = report.totals
    assert usd.metered_usd == Decimal("13.40")
    assert usd.gpu_effective_cost == Decimal("5.76") + Decimal("5.60")
    assert usd.gpu_billed_cost == 2 * usd.gpu_effective_cost
    assert (usd.non_gpu_effective_cost, usd.unmetered_effective_cost) == (
        Decimal("0.50"),
        Decimal("98.32"),
    )
    assert [(s.slice, s.version) for s in report.slices] == [(SLICE, 2)]


def test_verdicts_name_the_entries_off_by_more_than_the_threshold(store: ClickHouseStore) -> None:
    report = variance(store, PERIOD, price_book=BOOK)
    assert report.verdicts == (
        "price-book entry `contract-7/h100` (H100 on_demand, 4.00/GPU-h): the bill's "
        "2.88/GPU-h is 28.0 % below it",
        f"price-book entry `{A100_NEW}` (A100 spot, 1.20/GPU-h): the bill's 1.30/GPU-h is "
        "8.3 % above it",
    )
    looser = variance(store, PERIOD, price_book=BOOK, threshold_pct=Decimal("10"))
    assert len(looser.verdicts) == 1 and "contract-7/h100" in looser.verdicts[0]


def test_without_a_book_lines_are_per_model_and_class(store: ClickHouseStore) -> None:
    report = variance(store, PERIOD, price_book=None)
    lines = _lines(report)
    assert set(lines) == {("H100", None), ("A100", None)}
    a100 = lines[("A100", None)]
    assert (a100.device_hours, a100.metered_usd, a100.effective_cost) == (
        Decimal(4),
        Decimal("5.40"),
        Decimal("5.60"),
    )
    assert a100.book_rate == Decimal("1.35")  # two prices: metered / device-hours
    assert report.verdicts == (
        "the price book (H100 on_demand, 4.00/GPU-h): the bill's 2.88/GPU-h is 28.0 % below it",
    )


def test_the_unbilled_node_and_the_unmetered_instance(store: ClickHouseStore) -> None:
    report = variance(store, PERIOD, price_book=BOOK)
    (node,) = report.unbilled_nodes
    assert (node.cluster, node.node, node.hours, node.metered_usd) == (
        "c1",
        "n3",
        2,
        Decimal("8.00"),
    )
    assert (node.first_hour_ms, node.last_hour_ms) == (T0_MS, T0_MS + HOUR_MS)
    (spend,) = report.unmetered
    assert (spend.resource_key, spend.instance_type, spend.currency) == (
        "i-0abc",
        "p5.48xlarge",
        "USD",
    )
    assert (spend.hours, spend.effective_cost) == (Decimal(2), Decimal("98.32"))


def test_sealed_rollups_give_the_same_report(store: ClickHouseStore) -> None:
    before = variance(store, PERIOD, price_book=BOOK, use_rollups=False)
    seal_hours(store, T0_MS + 30 * HOUR_MS)
    assert variance(store, PERIOD, price_book=BOOK) == before


def test_the_report_renders_as_table_csv_and_json(store: ClickHouseStore) -> None:
    report = variance(store, PERIOD, price_book=BOOK)
    table = render(report, "table")
    assert "contract-7/h100" in table and "-2.24" in table and "-28.0%" in table
    assert "Metered nodes with no bill line" in table and "n3" in table
    assert "i-0abc" in table and "98.32" in table and "non-GPU part 0.50" in table
    csv_lines = render(report, "csv").splitlines()
    assert csv_lines[0].startswith("section,gpu_model,")
    assert len(csv_lines) == 1 + 3 + 1 + 1
    doc = json.loads(render(report, "json"))
    assert doc["report"] == "variance" and doc["verdicts"] == list(report.verdicts)
    assert Decimal(doc["totals"][0]["unmetered_effective_cost"]) == Decimal("98.32")
    cents = sum(line.metered_cents for line in report.lines)
    assert cents == Decimal("13.40")


def test_a_bill_in_another_currency_is_shown_but_not_compared() -> None:
    store = fresh_store()
    store.insert_rows(N1)
    eur = [billed(1, 0, N1[0], "usage", "2.50", billing_currency="EUR")]
    store.insert_values("billed_cost_hourly", BILLED_COLUMNS, eur)
    finish(store, 1, currency="EUR")
    report = variance(store, PERIOD, price_book=BOOK)
    (line,) = report.lines
    assert (line.currency, line.effective_cost, line.metered_usd) == (
        "EUR",
        Decimal("2.50"),
        Decimal("4.00"),
    )
    assert line.bill_rate == Decimal("2.50")
    assert line.variance is None and line.variance_pct is None
    assert report.verdicts == ()
    assert any("bill in EUR" in n and "not compared" in n for n in report.notes)
    assert "n/a" in render(report, "table")


def test_limits(store: ClickHouseStore, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="400 days"):
        variance(store, Period(T0_MS, T0_MS + 401 * 24 * HOUR_MS), price_book=BOOK)
    with pytest.raises(ConfigError, match="threshold"):
        variance(store, PERIOD, price_book=BOOK, threshold_pct=Decimal("-1"))
    monkeypatch.setattr(variance_module, "MAX_RESULT_ROWS", 2)
    with pytest.raises(ConfigError, match=r"more than 2 rows.*shorter period"):
        variance(store, PERIOD, price_book=BOOK)


def test_an_empty_store_gives_an_empty_report() -> None:
    book: PriceBook | None = None
    report = variance(fresh_store(), PERIOD, price_book=book)
    assert report.lines == () and report.unbilled_nodes == () and report.verdicts == ()
    assert render(report, "table")


@pytest.mark.parametrize("text", ["", "x", "-1", "nan", "inf", "1" * 21, "5%"])
def test_a_threshold_that_is_no_percentage_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="threshold"):
        parse_threshold(text)


def test_a_threshold_is_a_decimal_percentage() -> None:
    assert parse_threshold(" 2.5 ") == Decimal("2.5")
    assert parse_threshold("0") == 0


def test_a_mig_instance_is_a_line_of_its_own_priced_per_device_hour() -> None:
    store = fresh_store()
    price = (Decimal(4) * 3 / 7).quantize(Decimal("1e-15"))
    mig = metered(0, "n1", "MIG-1", "H100", "on_demand", str(price), mig_profile="3g.40gb")
    store.insert_rows([N1[0], mig])
    rows = [billed(1, 0, N1[0], "usage", "4.00"), billed(1, 0, mig, "usage", "1.20")]
    store.insert_values("billed_cost_hourly", BILLED_COLUMNS, rows)
    finish(store, 1)
    report = variance(store, PERIOD, price_book=BOOK)
    assert [(line.mig_profile, line.entry_id) for line in report.lines] == [
        ("", "contract-7/h100"),
        ("3g.40gb", "contract-7/h100"),
    ]
    line = report.lines[1]
    assert (line.book_rate, line.bill_rate) == (price, Decimal("1.2"))
    assert line.variance == Decimal("1.20") - price
    assert report.verdicts == (
        "price-book entry `contract-7/h100` (H100 3g.40gb on_demand, 1.71/device-h): the bill's "
        "1.20/device-h is 30.0 % below it",
    )

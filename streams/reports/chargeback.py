"""`gpuledger export chargeback`: FOCUS 1.3 Cost and Usage rows of a billing month in the
split-cost-allocation model (streams.reports.focus_charges), read a day at a time so that a
month of a large cluster streams to its file instead of being held in memory.

The rows are marked as an internal chargeback (InvoiceIssuerName is the platform, not the cloud
provider; `x_InternalChargeback` is true): they re-allocate GPU cost that the provider's own bill
already holds. streams/reports/README.md says how to load both without counting twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from runtime.errors import ConfigError
from streams.billing.slices import KIND_NON_GPU, KIND_UNMETERED, latest_versions_sql
from streams.pricing import PriceBook
from streams.reports.focus_charges import (
    EXACT,
    AllocatedCharge,
    HourCost,
    HourTokens,
    OriginKey,
    allocate_hours,
    with_billed,
)
from streams.reports.focus_columns import FOCUS_VERSION, ChargebackSettings, FocusRows
from streams.reports.invoice import INVOICE_BY, Invoice, build_invoice
from streams.reports.limits import MAX_SOURCE_ROWS, query_bounded
from streams.reports.params import DAY_MS, Period, check_choice, check_period, format_ms
from streams.reports.sources import cost_source, read_plan, token_source
from streams.store import ClickHouseStore

BASES = ("list", "billed")  # list: the price book; billed: the imported provider bills

__all__ = [
    "FOCUS_VERSION",
    "ChargebackSettings",
    "ExportTotals",
    "chargeback",
    "day_charges",
    "invoice",
    "period_charges",
]

_TOO_BIG = (
    "a day is the shortest stretch an export reads at once, so this day is too large to export"
)


@dataclass
class ExportTotals:
    """What a written export adds up to: rows, the exact EffectiveCost total, per-kind totals,
    and on the billed basis how many rows had no bill (the list basis applied to them)."""

    rows: int = 0
    total_usd: Decimal = Decimal(0)
    by_kind_usd: dict[str, Decimal] = field(default_factory=dict)
    metered_usd: Decimal = Decimal(0)
    unbilled_rows: int = 0

    def add(self, charge: AllocatedCharge) -> None:
        self.rows += 1
        self.unbilled_rows += charge.billed_effective is None
        cost = charge.effective_cost
        self.total_usd = EXACT.add(self.total_usd, cost)
        kind = charge.owner.kind
        self.by_kind_usd[kind] = EXACT.add(self.by_kind_usd.get(kind, Decimal(0)), cost)
        self.metered_usd = EXACT.add(self.metered_usd, charge.metered_cost_usd)


def day_charges(
    store: ClickHouseStore,
    start_ms: int,
    end_ms: int,
    *,
    use_rollups: bool = True,
    basis: str = "list",
) -> list[AllocatedCharge]:
    """The allocated charges of the hours in [start_ms, end_ms) (at most a day); on the billed
    basis with each part's share of the bill of its origin charge."""
    plan = read_plan(store, start_ms, end_ms, use_rollups=use_rollups)
    costs = cost_source(store.database, plan)
    tokens = token_source(store.database, plan)
    day = format_ms(start_ms)[:10]
    cost_rows = [
        HourCost(
            int(r[0]) * 1000,
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            r[6],
            r[7],
            r[8],
            r[9],
            r[10],
            r[11],
            r[12],
            r[13],
            float(r[14]),
        )
        for r in query_bounded(
            store,
            f"SELECT toUnixTimestamp(hour), cluster, node, device_uuid, gpu_model, mig_profile, "
            f"pricing, price_per_hour, pod_uid, team, product, cost_center, kind, sum(cost_usd), "
            f"sum(device_seconds) FROM {costs} "
            f"GROUP BY hour, cluster, node, device_uuid, gpu_model, mig_profile, pricing, "
            f"price_per_hour, pod_uid, team, product, cost_center, kind",
            limit=MAX_SOURCE_ROWS,
            what=f"the chargeback of {day} (one row per hour, device, pod, labels and price)",
            narrow=_TOO_BIG,
        )
    ]
    token_rows = [
        HourTokens(
            int(r[0]) * 1000, r[1], r[2], r[3], r[4], r[5], r[6], int(r[7]), int(r[8]), int(r[9])
        )
        for r in query_bounded(
            store,
            f"SELECT toUnixTimestamp(hour), pod_uid, team, product, cost_center, model, "
            f"sum(cost_usd), sum(prompt_tokens), sum(completion_tokens), sum(requests) "
            f"FROM {tokens} GROUP BY hour, pod_uid, team, product, cost_center, model",
            limit=MAX_SOURCE_ROWS,
            what=f"the chargeback of {day} (one row per hour, pod, labels and model)",
            narrow=_TOO_BIG,
        )
    ]
    charges = allocate_hours(cost_rows, token_rows)
    if basis == "billed":
        charges = with_billed(charges, _billed_origins(store, start_ms, end_ms, day))
    return charges


def _billed_origins(
    store: ClickHouseStore, start_ms: int, end_ms: int, day: str
) -> dict[OriginKey, tuple[Decimal, Decimal]]:
    """The bill's EffectiveCost and BilledCost per origin charge (hour, cluster, device,
    pricing, price) of the hours in [start_ms, end_ms): the true-up's metered kinds."""
    db = store.database
    rows = query_bounded(
        store,
        "SELECT toUnixTimestamp(hour), cluster, device_uuid, pricing, price_per_hour, "
        f"sum(effective_cost), sum(billed_cost) FROM {db}.billed_cost_hourly FINAL "
        f"WHERE {latest_versions_sql(db)} AND kind NOT IN ('{KIND_NON_GPU}', '{KIND_UNMETERED}') "
        f"AND hour >= toDateTime({start_ms // 1000}, 'UTC') "
        f"AND hour < toDateTime({-(-end_ms // 1000)}, 'UTC') "
        "GROUP BY hour, cluster, device_uuid, pricing, price_per_hour",
        limit=MAX_SOURCE_ROWS,
        what=f"the billed chargeback of {day} (one row per hour, device and price)",
        narrow=_TOO_BIG,
    )
    return {(int(r[0]) * 1000, r[1], r[2], r[3], r[4]): (r[5], r[6]) for r in rows}


def bill_currency(store: ClickHouseStore, period: Period) -> str | None:
    """The one billing currency of the imported bills' true-up in `period` (None: no bill);
    ConfigError when they are in several."""
    db = store.database
    found = [
        str(r[0])
        for r in store.query_rows(
            f"SELECT DISTINCT billing_currency FROM {db}.billed_cost_hourly "
            f"WHERE {latest_versions_sql(db)} "
            f"AND hour >= toDateTime({period.start_ms // 1000}, 'UTC') "
            f"AND hour < toDateTime({-(-period.end_ms // 1000)}, 'UTC') ORDER BY 1"
        )
    ]
    if len(found) > 1:
        raise ConfigError(f"the bills of this period are in {', '.join(found)}: one currency only")
    return found[0] if found else None


def period_charges(
    store: ClickHouseStore,
    period: Period,
    *,
    use_rollups: bool = True,
    on_day: Callable[[int], None] | None = None,
    basis: str = "list",
) -> Iterator[AllocatedCharge]:
    """The allocated charges of `period`, a day at a time, in hour, device and owner order;
    `on_day` is told each day's start once its charges are out."""
    check_period(period)
    check_choice(basis, BASES, "--basis")
    for day_start in range(period.start_ms, period.end_ms, DAY_MS):
        day_end = min(day_start + DAY_MS, period.end_ms)
        yield from day_charges(store, day_start, day_end, use_rollups=use_rollups, basis=basis)
        if on_day is not None:
            on_day(day_start)


def _check_currency(store: ClickHouseStore, period: Period, settings: ChargebackSettings) -> None:
    found = bill_currency(store, period)
    if found is not None and found != settings.currency:
        raise ConfigError(
            f"the imported bills of this period are in {found}, the export in "
            f"{settings.currency}: give --currency {found} (the price book's list amounts are "
            "then shown in that currency too) or export --basis list"
        )


def chargeback(
    store: ClickHouseStore,
    period: Period,
    settings: ChargebackSettings | None = None,
    book: PriceBook | None = None,
    *,
    use_rollups: bool = True,
    totals: ExportTotals | None = None,
    on_day: Callable[[int], None] | None = None,
    basis: str = "list",
) -> Iterator[dict[str, Any]]:
    """The FOCUS rows of `period` (see `period_charges`); `totals`, if given, adds up what was
    yielded. On the billed basis EffectiveCost and BilledCost are the bill's (x_CostBasis
    `billed`), ListCost and ContractedCost stay the price book's."""
    settings = settings or ChargebackSettings()
    if basis == "billed":
        _check_currency(store, period, settings)
    maker = FocusRows(period, settings, book)
    for charge in period_charges(
        store, period, use_rollups=use_rollups, on_day=on_day, basis=basis
    ):
        if totals is not None:
            totals.add(charge)
        yield maker.row(charge)


def invoice(
    store: ClickHouseStore,
    period: Period,
    settings: ChargebackSettings | None = None,
    by: str = "team",
    *,
    use_rollups: bool = True,
    on_day: Callable[[int], None] | None = None,
    basis: str = "list",
) -> Invoice:
    """The invoice of `period` by team or cost centre, from the same charges as `chargeback`."""
    check_choice(by, INVOICE_BY, "--by")
    settings = settings or ChargebackSettings()
    if basis == "billed":
        _check_currency(store, period, settings)
    charges = period_charges(store, period, use_rollups=use_rollups, on_day=on_day, basis=basis)
    return build_invoice(charges, period, settings, by)

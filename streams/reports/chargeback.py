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

from streams.pricing import PriceBook
from streams.reports.focus_charges import (
    EXACT,
    AllocatedCharge,
    HourCost,
    HourTokens,
    allocate_hours,
)
from streams.reports.focus_columns import FOCUS_VERSION, ChargebackSettings, FocusRows
from streams.reports.invoice import INVOICE_BY, Invoice, build_invoice
from streams.reports.limits import MAX_SOURCE_ROWS, query_bounded
from streams.reports.params import DAY_MS, Period, check_choice, check_period, format_ms
from streams.reports.sources import cost_source, read_plan, token_source
from streams.store import ClickHouseStore

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
    """What a written export adds up to: rows, the exact BilledCost total, per-kind totals."""

    rows: int = 0
    total_usd: Decimal = Decimal(0)
    by_kind_usd: dict[str, Decimal] = field(default_factory=dict)
    metered_usd: Decimal = Decimal(0)

    def add(self, charge: AllocatedCharge) -> None:
        self.rows += 1
        cost = charge.cost_usd
        self.total_usd = EXACT.add(self.total_usd, cost)
        kind = charge.owner.kind
        self.by_kind_usd[kind] = EXACT.add(self.by_kind_usd.get(kind, Decimal(0)), cost)
        self.metered_usd = EXACT.add(self.metered_usd, charge.metered_cost_usd)


def day_charges(
    store: ClickHouseStore, start_ms: int, end_ms: int, *, use_rollups: bool = True
) -> list[AllocatedCharge]:
    """The allocated charges of the hours in [start_ms, end_ms) (at most a day)."""
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
    return allocate_hours(cost_rows, token_rows)


def period_charges(
    store: ClickHouseStore,
    period: Period,
    *,
    use_rollups: bool = True,
    on_day: Callable[[int], None] | None = None,
) -> Iterator[AllocatedCharge]:
    """The allocated charges of `period`, a day at a time, in hour, device and owner order;
    `on_day` is told each day's start once its charges are out."""
    check_period(period)
    for day_start in range(period.start_ms, period.end_ms, DAY_MS):
        day_end = min(day_start + DAY_MS, period.end_ms)
        yield from day_charges(store, day_start, day_end, use_rollups=use_rollups)
        if on_day is not None:
            on_day(day_start)


def chargeback(
    store: ClickHouseStore,
    period: Period,
    settings: ChargebackSettings | None = None,
    book: PriceBook | None = None,
    *,
    use_rollups: bool = True,
    totals: ExportTotals | None = None,
    on_day: Callable[[int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """The FOCUS rows of `period` (see `period_charges`); `totals`, if given, adds up what was
    yielded."""
    maker = FocusRows(period, settings or ChargebackSettings(), book)
    for charge in period_charges(store, period, use_rollups=use_rollups, on_day=on_day):
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
) -> Invoice:
    """The invoice of `period` by team or cost centre, from the same charges as `chargeback`."""
    check_choice(by, INVOICE_BY, "--by")
    charges = period_charges(store, period, use_rollups=use_rollups, on_day=on_day)
    return build_invoice(charges, period, settings or ChargebackSettings(), by)

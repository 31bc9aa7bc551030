"""`gpuledger export invoice`: what each team or cost centre owes for a billing month, in
cents that add up exactly to the rounded total.

The invoice is made of the chargeback's own charges (streams.reports.focus_charges), so its
exact total is the FOCUS file's EffectiveCost total to the last digit. Each line is the exact sum
of its charges; the total is rounded half-up to the cent; each line is rounded down and the
missing cents go one each to the lines with the largest remainders (streams.reports.money).
Host processes, untagged pods and idle time are lines of their own, so the lines cover all
metered GPU cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from streams.reports.focus_charges import (
    EXACT,
    HOST_KIND,
    IDLE_KIND,
    QUANTITY_QUANTUM,
    AllocatedCharge,
)
from streams.reports.focus_columns import ChargebackSettings, plain
from streams.reports.money import largest_remainder_cents, round_total
from streams.reports.params import Period, format_ms
from streams.reports.render import Tabular, money

INVOICE_BY = ("team", "cost_center")
_ZERO = Decimal(0)
_LABELS = {
    "untagged": "(untagged)",
    "no_cost_center": "(no cost centre)",
    HOST_KIND: "(host processes)",
    IDLE_KIND: "(idle GPU time)",
}
_ORDER = {"owner": 0, "untagged": 1, "no_cost_center": 1, HOST_KIND: 2, IDLE_KIND: 3}


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    key: str  # the team or cost centre; empty on the lines that stand for no owner
    line_kind: str  # owner | untagged | no_cost_center | host | idle
    exact_usd: Decimal
    amount_usd: Decimal  # in cents
    gpu_hours: Decimal
    charges: int

    @property
    def label(self) -> str:
        return self.key if self.line_kind == "owner" else _LABELS[self.line_kind]


@dataclass(frozen=True, slots=True)
class Invoice:
    invoice_id: str
    period: Period
    by: str
    settings: ChargebackSettings
    lines: tuple[InvoiceLine, ...]
    exact_total_usd: Decimal  # the FOCUS file's EffectiveCost total
    total_usd: Decimal  # rounded half-up to the cent; the lines add up to it

    def table(self) -> Sequence[Tabular]:
        month = format_ms(self.period.start_ms)[:7]
        rows = tuple(
            (line.label, f"{line.gpu_hours:,.3f}", money(line.amount_usd)) for line in self.lines
        )
        return (
            Tabular(
                f"Invoice {self.invoice_id}: {self.settings.invoice_issuer} to "
                f"{self.settings.billing_account_name}, {month}, {self.settings.currency}",
                (self.by.replace("_", " "), "GPU-hours", "amount"),
                rows,
                (
                    (
                        "total",
                        f"{sum((ln.gpu_hours for ln in self.lines), _ZERO):,.3f}",
                        money(self.total_usd),
                    ),
                ),
                notes=(
                    f"exact total {format(plain(self.exact_total_usd), 'f')} (the chargeback "
                    f"file's EffectiveCost); lines rounded by largest remainder to add up to it",
                ),
            ),
        )

    def records(self) -> list[dict[str, Any]]:
        return [
            {
                self.by: line.key or None,
                "label": line.label,
                "line_kind": line.line_kind,
                "gpu_hours": line.gpu_hours,
                "amount": line.amount_usd,
                "exact_amount": plain(line.exact_usd),
                "charges": line.charges,
            }
            for line in self.lines
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "invoice_id": self.invoice_id,
            "issuer": self.settings.invoice_issuer,
            "billing_account_id": self.settings.billing_account_id,
            "billing_account_name": self.settings.billing_account_name,
            "currency": self.settings.currency,
            "billing_period_start": format_ms(self.period.start_ms),
            "billing_period_end": format_ms(self.period.end_ms),
            "by": self.by,
            "lines": self.records(),
            "total": self.total_usd,
            "exact_total": plain(self.exact_total_usd),
        }


def line_of(charge: AllocatedCharge, by: str) -> tuple[str, str]:
    """(line kind, key) of the invoice line a charge belongs to."""
    owner = charge.owner
    if owner.kind in (HOST_KIND, IDLE_KIND):
        return owner.kind, ""
    value = owner.team if by == "team" else owner.cost_center
    if value is None:
        return ("untagged" if by == "team" else "no_cost_center"), ""
    return "owner", value


def build_invoice(
    charges: Iterable[AllocatedCharge], period: Period, settings: ChargebackSettings, by: str
) -> Invoice:
    sums: dict[tuple[str, str], list[Any]] = {}
    for charge in charges:
        slot = sums.setdefault(line_of(charge, by), [_ZERO, _ZERO, 0])
        slot[0] = EXACT.add(slot[0], charge.effective_cost)
        slot[1] = EXACT.add(slot[1], charge.quantity_hours)
        slot[2] += 1
    keys = sorted(sums, key=lambda k: (_ORDER[k[0]], k[1]))
    exact = [sums[k][0] for k in keys]
    cents = largest_remainder_cents(exact)
    lines = tuple(
        InvoiceLine(k[1], k[0], sums[k][0], c, sums[k][1].quantize(QUANTITY_QUANTUM), sums[k][2])
        for k, c in zip(keys, cents, strict=True)
    )
    total = _ZERO
    for amount in exact:
        total = EXACT.add(total, amount)
    return Invoice(
        settings.invoice_id(period), period, by, settings, lines, total, round_total(total)
    )

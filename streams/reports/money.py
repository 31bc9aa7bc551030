"""Rounding money for people: amounts in cents whose lines add up to the rounded total.

The period total is rounded half-up to the cent; every line is rounded down to the cent, and
the cents still missing go one each to the lines with the largest remainders (ties: the larger
amount, then the earlier line). The lines then add up exactly to the rounded total.
`largest_remainder` is the same method for any quantum and weights: the chargeback's
device-hours and ratios.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Context, Decimal, localcontext

CENT = Decimal("0.01")
_ZERO = Decimal(0)
# Wide enough for exact sums and products of FOCUS amounts (27 decimal places) without
# rounding them, and for the quotients that are then rounded on purpose.
WIDE = Context(prec=80)


def round_total(amount: Decimal) -> Decimal:
    with localcontext(WIDE):
        return amount.quantize(CENT, ROUND_HALF_UP)


def largest_remainder_cents(amounts: Sequence[Decimal]) -> list[Decimal]:
    """Each amount in cents; the results add up to `round_total(sum(amounts))` exactly."""
    if not amounts:
        return []
    with localcontext(WIDE):
        target = round_total(sum(amounts, _ZERO))
        floors = [a.quantize(CENT, ROUND_FLOOR) for a in amounts]
        left = int((target - sum(floors, _ZERO)) / CENT)
        rests = [a - f for a, f in zip(amounts, floors, strict=True)]
    order = sorted(range(len(amounts)), key=lambda i: (-rests[i], -amounts[i], i))
    for n in range(left):
        floors[order[n % len(order)]] += CENT
    return floors


def decimal_text(value: Decimal | None, places: int | None = None) -> str:
    """Plain decimal notation (never exponent), optionally quantised."""
    if value is None:
        return ""
    if places is not None:
        value = value.quantize(Decimal(1).scaleb(-places), ROUND_HALF_UP)
    text = format(value, "f")
    return text


def ratio(numerator: Decimal, denominator: Decimal, places: int = 9) -> Decimal | None:
    if denominator == 0:
        return None
    return (numerator / denominator).quantize(Decimal(1).scaleb(-places), ROUND_HALF_UP)


def largest_remainder(
    total: Decimal, weights: Sequence[Decimal], quantum: Decimal
) -> list[Decimal]:
    """`total` (a multiple of `quantum`) split by non-negative weights into multiples of
    `quantum` that add up to it exactly; equal parts when every weight is zero."""
    if not weights:
        return []
    with localcontext(WIDE):
        whole = sum(weights, _ZERO)
        if whole > 0:
            exact = [total * w / whole for w in weights]
        else:
            exact = [total / len(weights)] * len(weights)
        floors = [e.quantize(quantum, ROUND_FLOOR) for e in exact]
        left = int((total - sum(floors, _ZERO)) / quantum)
        rests = [e - f for e, f in zip(exact, floors, strict=True)]
    order = sorted(range(len(weights)), key=lambda i: (-rests[i], i))
    for n in range(max(0, left)):
        floors[order[n % len(order)]] += quantum
    return floors

"""Rounding money for people: amounts in cents whose lines add up to the rounded total.

The period total is rounded half-up to the cent; every line is rounded down to the cent, and
the cents still missing go one each to the lines with the largest remainders (ties: the larger
amount, then the earlier line). The lines then add up exactly to the rounded total.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Context, Decimal, localcontext

CENT = Decimal("0.01")
_ZERO = Decimal(0)
# Wide enough for exact sums of FOCUS amounts (27 decimal places) without rounding them.
_WIDE = Context(prec=80)


def round_total(amount: Decimal) -> Decimal:
    with localcontext(_WIDE):
        return amount.quantize(CENT, ROUND_HALF_UP)


def largest_remainder_cents(amounts: Sequence[Decimal]) -> list[Decimal]:
    """Each amount in cents; the results add up to `round_total(sum(amounts))` exactly."""
    if not amounts:
        return []
    with localcontext(_WIDE):
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

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from streams.reports.money import largest_remainder_cents, round_total


def test_lines_add_up_to_the_rounded_total() -> None:
    amounts = [Decimal("0.333"), Decimal("0.333"), Decimal("0.334")]
    assert largest_remainder_cents(amounts) == [Decimal("0.33"), Decimal("0.33"), Decimal("0.34")]
    assert largest_remainder_cents([Decimal("0.005"), Decimal("0.005")]) == [
        Decimal("0.01"),
        Decimal("0.00"),
    ]
    assert largest_remainder_cents([]) == []


@given(st.lists(st.decimals(min_value=0, max_value=10**6, places=15), min_size=1, max_size=40))
def test_any_amounts(amounts: list[Decimal]) -> None:
    cents = largest_remainder_cents(amounts)
    assert sum(cents) == round_total(sum(amounts))
    assert all(abs(c - a) < Decimal("0.01") for c, a in zip(cents, amounts, strict=True))

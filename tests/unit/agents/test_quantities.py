"""Kubernetes quantities read exactly: every suffix form, rounding up as the API does, and any
other text refused with ValueError (never another exception, never a guess)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.quantities import millis, parse_quantity, whole_units

GI = 2**30


@pytest.mark.parametrize(
    "text, value",
    [
        ("96", 96),
        ("95500m", Fraction(191, 2)),
        ("1056Gi", 1056 * GI),
        ("2Ti", 2 * 2**40),
        ("500M", 500 * 10**6),
        ("1e3", 1000),
        ("1E3", 1000),
        ("2E", 2 * 10**18),  # exa, not an exponent
        ("1.5Gi", 3 * 2**29),
        ("0.5", Fraction(1, 2)),
        (".5k", 500),
        ("1.", 1),
        ("+8", 8),
        ("12e-1", Fraction(6, 5)),
        ("2147483648Ki", 2 * 2**40),
        ("0", 0),
        ("250u", Fraction(1, 4000)),
        ("100n", Fraction(1, 10**7)),
    ],
)
def test_quantities_are_read_exactly(text: str, value: Fraction | int) -> None:
    assert parse_quantity(text) == value


def test_units_round_up_as_kubernetes_does() -> None:
    assert millis("95500m") == 95_500 and whole_units("95500m") == 96
    assert millis("96") == 96_000 and millis("0.0001") == 1
    assert whole_units("1056Gi") == 1056 * GI and whole_units("1.5") == 2


@pytest.mark.parametrize(
    "text",
    ["", "Gi", "1 Gi", "1gi", "1KiB", "1e", "1e1000000000", "0x10", "one", "1.2.3", ".", "-1"],
)
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        whole_units(text)


@given(st.text(max_size=80))
def test_any_text_is_a_value_or_a_value_error(text: str) -> None:
    try:
        value = millis(text)
    except ValueError:
        return
    assert value >= 0


@given(st.integers(0, 10**12), st.sampled_from(["", "k", "M", "G", "Ki", "Mi", "Gi", "Ti"]))
def test_integer_quantities_with_a_suffix(number: int, suffix: str) -> None:
    scale = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20}
    scale |= {"Gi": 2**30, "Ti": 2**40}
    assert whole_units(f"{number}{suffix}") == number * scale[suffix]

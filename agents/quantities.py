"""Kubernetes resource quantities ("96", "95500m", "1056Gi", "500M", "1e3") read exactly, as
`resource.Quantity` does: a signed decimal number, then a binary-SI suffix (Ki..Ei), a
decimal-SI suffix (n, u, m, k, M..E) or a decimal exponent (e3, E-2). Anything else is refused with
ValueError, never guessed at."""

from __future__ import annotations

import math
import re
from fractions import Fraction

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 1000),
    "": Fraction(1),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
}
_QUANTITY = re.compile(
    r"(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:(?P<binary>[KMGTPE]i)|[eE](?P<exponent>[+-]?[0-9]+)|(?P<decimal>[numkMGTPE]?))"
)
# Kubernetes keeps quantities within about 2^63 nano-units; these bounds refuse input that would
# make exact arithmetic slow (an exponent of a billion) long before it could matter.
MAX_QUANTITY_CHARS = 64
MAX_EXPONENT = 30


def parse_quantity(text: str) -> Fraction:
    """The exact value of a quantity string; ValueError when it is not one."""
    if not isinstance(text, str) or len(text) > MAX_QUANTITY_CHARS:
        raise ValueError("not a quantity of at most 64 characters")
    found = _QUANTITY.fullmatch(text)
    if found is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    number = Fraction(found["number"])
    if found["binary"] is not None:
        return number * _BINARY[found["binary"]]
    if found["exponent"] is not None:
        exponent = int(found["exponent"])
        if abs(exponent) > MAX_EXPONENT:
            raise ValueError(f"{text!r}: exponent beyond ±{MAX_EXPONENT}")
        return number * Fraction(10) ** exponent
    return number * _DECIMAL[found["decimal"]]


def whole_units(text: str) -> int:
    """A quantity in whole units, rounded up as Kubernetes' `Value()` rounds (bytes, GPUs)."""
    return _non_negative(math.ceil(parse_quantity(text)), text)


def millis(text: str) -> int:
    """A quantity in thousandths, rounded up as `MilliValue()` rounds (CPU millicores)."""
    return _non_negative(math.ceil(parse_quantity(text) * 1000), text)


def _non_negative(value: int, text: str) -> int:
    if value < 0:
        raise ValueError(f"{text!r} is negative: no capacity")
    return value

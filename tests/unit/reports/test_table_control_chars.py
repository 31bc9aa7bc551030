"""The text table is for a terminal: a tenant's model name or label holding control characters
(an ANSI escape, a carriage return, a bidirectional override) is shown escaped, never sent raw
to the terminal where it could rewrite or recolour what a person reads."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from streams.reports.params import Period
from streams.reports.render import printable, to_table
from streams.reports.showback import ShowbackLine, ShowbackReport

T0_MS = 1_798_761_600_000
HOSTILE = ("\x1b[2J\x1b[31mteam-a", "fake\rtotal 0.00", "evil\u202etxt.exe", "bell\x07")


def report(names: tuple[str, ...]) -> ShowbackReport:
    amount = Decimal("1.25")
    lines = tuple(
        ShowbackLine(
            n, "allocated", amount, amount, 50.0, 1.0, None, Decimal(0), 10, 1, amount, None
        )
        for n in names
    )
    total = amount * len(lines)
    return ShowbackReport(
        Period(T0_MS, T0_MS + 3_600_000),
        "model",
        lines,
        total,
        Decimal(0),
        Decimal(0),
        Decimal(0),
        total,
        total,
        1.0,
    )


def test_control_characters_in_names_are_escaped_in_the_table() -> None:
    text = to_table(report(HOSTILE))
    assert not any(c in text for c in "\x1b\r\x07\u202e")
    for shown in (
        "\\x1b[2J\\x1b[31mteam-a",
        "fake\\rtotal 0.00",
        "evil\\u202etxt.exe",
        "bell\\x07",
    ):
        assert shown in text


@given(st.text())
def test_printable_text_has_no_control_character_and_keeps_the_rest(text: str) -> None:
    shown = printable(text)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in shown)
    if text.isprintable():
        assert shown == text

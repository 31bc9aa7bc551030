"""The text table is for a terminal: a tenant's model name or label holding control characters
(an ANSI escape, a carriage return, a bidirectional override) is shown escaped, never sent raw
to the terminal where it could rewrite or recolour what a person reads."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from test_csv_injection import line, showback_by_model

from streams.reports.render import printable, to_table
from streams.reports.showback import ShowbackReport

HOSTILE = ("\x1b[2J\x1b[31mteam-a", "fake\rtotal 0.00", "evil\u202etxt.exe", "bell\x07")


def report(names: tuple[str, ...]) -> ShowbackReport:
    return showback_by_model(tuple(line(n, "1.25") for n in names))


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

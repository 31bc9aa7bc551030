"""Renderers shared by every report: a fixed-width text table, CSV and JSON.

A report object offers `table()` (what a person reads: rounded, labelled), `records()` (flat
rows for CSV: exact values) and `to_dict()` (the JSON document). Money is a decimal string in
CSV and JSON, never a float. Every CSV cell goes through `csv_cell`, which keeps a spreadsheet
from running a tenant's text as a formula.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from streams.rows import HOST, IDLE, UNKNOWN, UNTAGGED


@dataclass(frozen=True, slots=True)
class Tabular:
    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    footer: tuple[tuple[str, ...], ...] = ()
    notes: tuple[str, ...] = ()
    right_aligned_from: int = 1  # columns from this index on are numbers


class Report(Protocol):
    def table(self) -> Sequence[Tabular]: ...

    def records(self) -> list[dict[str, Any]]: ...

    def to_dict(self) -> dict[str, Any]: ...


DISPLAY_NAMES = {
    UNTAGGED: "(untagged)",
    UNKNOWN: "(pod unknown)",
    IDLE: "(idle)",
    HOST: "(host processes)",
    "": "(none)",
}


def display(value: str) -> str:
    return DISPLAY_NAMES.get(value, value)


# Control characters (C0, DEL, C1) and the bidirectional overrides: a tenant's label holding
# them could move the cursor, recolour or reorder what a terminal shows.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` for a terminal: each control character written as its escape (`\\x1b`)."""
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text)


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, width: int, right: bool) -> str:
    fill = " " * (width - _width(text))
    return fill + text if right else text + fill


def format_tabular(tab: Tabular) -> str:
    all_rows = [tuple(printable(c) for c in r) for r in (tab.headers, *tab.rows, *tab.footer)]
    widths = [max(_width(r[i]) for r in all_rows) for i in range(len(tab.headers))]

    def line(row: tuple[str, ...]) -> str:
        cells = [_pad(cell, widths[i], i >= tab.right_aligned_from) for i, cell in enumerate(row)]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    headers, rows, footer = (
        all_rows[0],
        all_rows[1 : 1 + len(tab.rows)],
        all_rows[1 + len(tab.rows) :],
    )
    out = [printable(tab.title), "", line(headers), rule]
    out += [line(r) for r in rows]
    if footer:
        out.append(rule)
        out += [line(r) for r in footer]
    out += [f"  {printable(n)}" for n in tab.notes]
    return "\n".join(out) + "\n"


def to_table(report: Report) -> str:
    return "\n".join(format_tabular(t) for t in report.table())


def to_csv(report: Report) -> str:
    records = report.records()
    if not records:
        return ""
    lines = [csv_line(records[0])]
    lines += [csv_line(record.values()) for record in records]
    return "".join(lines)


def csv_line(values: Iterable[Any]) -> str:
    """RFC 4180 quoting: a cell holding a comma, a quote, CR or LF is quoted (the csv module
    leaves a CR bare when lines end in LF, and a reader then splits the row there)."""
    return ",".join(quoted_cell(v) for v in values) + "\n"


def quoted_cell(value: Any) -> str:
    """`csv_cell(value)`, quoted as `csv_line` quotes it."""
    return _quoted(csv_cell(value))


def _quoted(cell: str) -> str:
    if _NEEDS_QUOTES.search(cell):
        return '"' + cell.replace('"', '""') + '"'
    return cell


# OWASP CSV injection: a spreadsheet runs a cell that starts with one of these as a formula.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NEEDS_QUOTES = re.compile(r'[,"\r\n]')


def csv_cell(value: Any) -> str:
    """One CSV cell. Text that a spreadsheet would run as a formula gets a leading `'` (names,
    labels and ids come from tenants' pods and annotations); numbers stay numbers, so a credit
    of -12.50 is still a decimal; None is an empty cell. Quoting is `csv_line`'s."""
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, bool) or not isinstance(value, int | float):
        text = str(value)
        return "'" + text if text.startswith(_FORMULA_STARTS) else text
    return str(value)


def json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json(report: Report) -> str:
    return json.dumps(report.to_dict(), default=json_default, ensure_ascii=False, indent=2) + "\n"


def render(report: Report, fmt: str) -> str:
    if fmt == "csv":
        return to_csv(report)
    if fmt == "json":
        return to_json(report)
    return to_table(report)


def money(value: Decimal) -> str:
    """Cents with thousands separators, for tables."""
    return f"{value:,.2f}"


def pct(value: float | None, places: int = 1) -> str:
    return "-" if value is None else f"{value:.{places}f}%"


def num(value: float | None, places: int = 2) -> str:
    return "-" if value is None else f"{value:,.{places}f}"

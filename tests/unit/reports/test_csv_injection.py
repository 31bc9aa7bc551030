"""CSV cells a spreadsheet would run as a formula (OWASP CSV injection) come out as text: model
names and labels come from tenants' own pods and annotations. Numbers stay numbers, so a
credit of -12.50 is still a decimal and FOCUS numeric columns still parse."""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal

import pytest
from focus_builders import cost_row, token_row

from streams.reports.focus_charges import allocate_hours
from streams.reports.focus_columns import COLUMNS, ChargebackSettings, focus_row
from streams.reports.focus_files import export_bytes
from streams.reports.params import Period, parse_month
from streams.reports.render import csv_cell, to_csv
from streams.reports.showback import ShowbackLine, ShowbackReport

HOSTILE = ['=HYPERLINK("http://x","y")', "@SUM(1)", "+1", "-1+1", "\t=1", "\r=1"]
T0_MS = 1_793_491_200_000


@pytest.mark.parametrize("text", HOSTILE)
def test_a_cell_a_spreadsheet_would_run_gets_a_quote(text: str) -> None:
    assert csv_cell(text) == "'" + text


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        (Decimal("-12.50"), "-12.50"),
        (Decimal("1E+2"), "100"),
        (-3, "-3"),
        (-0.5, "-0.5"),
        (None, ""),
        ("llama-3-70b", "llama-3-70b"),
        ("a=b", "a=b"),
        ("", ""),
    ],
)
def test_numbers_and_harmless_text_are_kept(value: object, cell: str) -> None:
    assert csv_cell(value) == cell


def line(key: str, cost: str) -> ShowbackLine:
    amount = Decimal(cost)
    return ShowbackLine(
        key, "allocated", amount, amount, 50.0, 1.0, None, Decimal(0), 10, 1, amount, None
    )


def showback_by_model(lines: tuple[ShowbackLine, ...]) -> ShowbackReport:
    """An hour's showback by model of `lines`, all allocated."""
    total = sum((ln.cost_usd for ln in lines), Decimal(0))
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


def test_showback_csv_neutralises_hostile_model_names() -> None:
    report = showback_by_model(tuple(line(name, "-12.50") for name in HOSTILE))
    rows = list(csv.DictReader(io.StringIO(to_csv(report), newline="")))
    assert [r["model"] for r in rows] == ["'" + name for name in HOSTILE]
    assert [r["label"] for r in rows] == ["'" + name for name in HOSTILE]
    assert {r["cost_usd"] for r in rows} == {"-12.50"}
    assert all(Decimal(r["cost_usd_cents"]) == Decimal("-12.50") for r in rows)


def test_focus_csv_neutralises_hostile_names_and_keeps_amounts_decimal() -> None:
    rows = [
        cost_row(pod=f"pod-{i}", team=name, product="-1+1", cost_center=name, seconds=600.0)
        for i, name in enumerate(HOSTILE)
    ]
    tokens = [
        token_row(pod=f"pod-{i}", team=name, product="-1+1", cost_center=name, model=name)
        for i, name in enumerate(HOSTILE)
        if i != 1  # pod-1 served no tokens
    ]
    charges = allocate_hours(rows, tokens)
    month = parse_month("2026-11")
    text = export_bytes(
        (focus_row(c, month, ChargebackSettings(), None) for c in charges), "focus-csv"
    ).decode("utf-8")
    rows_read = list(csv.DictReader(io.StringIO(text, newline="")))
    assert rows_read
    dangerous = ("=", "+", "-", "@", "\t", "\r")
    numeric = {c for c, kind in COLUMNS.items() if kind in ("cost", "price", "quantity", "int")}
    for row in rows_read:
        for column, cell in row.items():
            if column in numeric:
                if cell:
                    Decimal(cell)  # still a number
            else:
                assert not cell.startswith(dangerous), (column, cell)
    assert {r["x_Model"] for r in rows_read if r["x_Model"]} == {"'" + n for n in HOSTILE} - {
        "'" + HOSTILE[1]
    }
    assert {r["x_Team"] for r in rows_read} == {"'" + n for n in HOSTILE}
    assert {r["x_Product"] for r in rows_read} == {"'-1+1"}
    # the labels themselves are kept exactly where FOCUS reads them as data: JSON and ids
    tags = [json.loads(r["AllocatedTags"]) for r in rows_read]
    assert {t["team"] for t in tags} == set(HOSTILE)
    assert all(Decimal(r["BilledCost"]) > 0 for r in rows_read)

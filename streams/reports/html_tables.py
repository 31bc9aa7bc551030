"""The HTML report's sections drawn from a report's own table: budgets against the month-end
forecast, and request-based beside usage-based cost. Pure: the reports in, HTML text out; the
rows, totals and notes are the command-line table's, so both say the same."""

from __future__ import annotations

from html import escape

from streams.reports.budget_report import BudgetReport
from streams.reports.render import Tabular
from streams.reports.requests_report import RequestsReport

_STATUS_CLASS = {"on track": "ok", "at risk": "warn", "forecast over": "bad", "over": "bad"}


def tabular_html(tab: Tabular, *, status_column: int | None = None) -> str:
    """A report table as HTML: the headers, a row each, the footer rows, then the notes.
    Columns from `right_aligned_from` on are numbers; a status column's cells carry a class."""

    def cells(row: tuple[str, ...], tag: str) -> str:
        out = []
        for i, value in enumerate(row):
            classes = ["n"] if i >= tab.right_aligned_from else []
            if i == status_column and value in _STATUS_CLASS:
                classes.append(_STATUS_CLASS[value])
            attr = f' class="{" ".join(classes)}"' if classes else ""
            out.append(f"<{tag}{attr}>{escape(value)}</{tag}>")
        return "".join(out)

    head = cells(tab.headers, "th")
    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in tab.rows)
    foot = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in tab.footer)
    notes = "".join(f'<p class="note">{escape(note)}</p>' for note in tab.notes)
    return (
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
        f"{f'<tfoot>{foot}</tfoot>' if foot else ''}</table>{notes}"
    )


def budgets_section(report: BudgetReport) -> str:
    """Each budget against its owner's month to date and month-end forecast, with its status."""
    [tab] = report.table()
    return (
        f"<section><h2>{escape(tab.title)}</h2>"
        f"{tabular_html(tab, status_column=tab.headers.index('status'))}</section>"
    )


def requests_section(report: RequestsReport) -> str:
    """Usage-based cost by team beside what request-based allocation would charge; a note
    instead of the table when no pod held a GPU request in the period."""
    [tab] = report.table()
    if report.unrequested_usd == report.request_total_usd:
        body = (
            '<p class="empty">No pod held a GPU request in this period (or the ledger did not '
            "record them): request-based cost cannot be compared.</p>"
        )
    else:
        body = tabular_html(tab)
    return f"<section><h2>{escape(tab.title)}</h2>{body}</section>"

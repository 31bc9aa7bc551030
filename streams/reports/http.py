"""Reports over HTTP, for the process that owns an embedded data folder (design §6):
`handle_report_request(store, path, query)` answers

    GET /report/showback?from=..&to=..&by=team&format=json|csv|table
    GET /report/tags?from=..&to=..&format=..
    GET /report/unit-economics?from=..&to=..&format=..
    GET /report/html?from=..&to=..
    GET /export/chargeback?period=2026-11&format=focus-csv|focus-parquet|focus-jsonl
    GET /export/invoice?period=2026-11&by=team|cost_center&format=table|csv|json

with (status, content type, body). Bad parameters, and results past the limits of
streams.reports.limits, give 400 and one line of text; a store failure gives 503. Whatever text
a parameter holds, the answer is one of these, never an exception.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from runtime.errors import ConfigError, StoreError
from streams.reports.chargeback import ChargebackSettings, chargeback, invoice
from streams.reports.focus_files import CONTENT_TYPES as FOCUS_CONTENT_TYPES
from streams.reports.focus_files import check_format, export_bytes
from streams.reports.html_report import html_report
from streams.reports.limits import MAX_HTTP_EXPORT_ROWS
from streams.reports.params import FORMATS, check_choice, parse_month, parse_period
from streams.reports.render import Report, render
from streams.reports.showback import showback
from streams.reports.tags import tag_compliance
from streams.reports.unit_economics import unit_economics
from streams.reports.variance import parse_threshold, variance
from streams.store import ClickHouseStore

TEXT = "text/plain; charset=utf-8"
CONTENT_TYPES = {
    "table": TEXT,
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    **FOCUS_CONTENT_TYPES,
}
REPORT_PATHS = (
    "/report/showback",
    "/report/tags",
    "/report/unit-economics",
    "/report/variance",
    "/report/html",
    "/export/chargeback",
    "/export/invoice",
)


def handle_report_request(
    store: ClickHouseStore,
    path: str,
    query: Mapping[str, str],
    *,
    settings: ChargebackSettings | None = None,
    now_ms: int | None = None,
) -> tuple[int, str, bytes]:
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    try:
        if path == "/export/chargeback":
            fmt = check_format(query.get("format", "focus-csv"))
            period = parse_month(query.get("period", ""))
            rows = chargeback(store, period, settings, basis=query.get("basis", "list"))
            body = export_bytes(rows, fmt, max_rows=MAX_HTTP_EXPORT_ROWS)
            return 200, CONTENT_TYPES[fmt], body
        if path == "/export/invoice":
            fmt = check_choice(query.get("format", "json"), FORMATS, "format")
            period = parse_month(query.get("period", ""))
            bill = invoice(
                store, period, settings, query.get("by", "team"), basis=query.get("basis", "list")
            )
            return 200, CONTENT_TYPES[fmt], render(bill, fmt).encode("utf-8")
        period = parse_period(query.get("from"), query.get("to"), now_ms=now)
        if path == "/report/html":
            # The planning sections fit forecasts (seconds of CPU): not served over HTTP.
            html = html_report(store, period, planning=False)
            return 200, "text/html; charset=utf-8", html.encode()
        fmt = check_choice(query.get("format", "json"), FORMATS, "format")
        report: Report
        if path == "/report/showback":
            report = showback(
                store, period, query.get("by", "team"), basis=query.get("basis", "list")
            )
        elif path == "/report/tags":
            report = tag_compliance(store, period)
        elif path == "/report/unit-economics":
            report = unit_economics(store, period)
        elif path == "/report/variance":
            threshold = parse_threshold(query.get("threshold", "5"))
            report = variance(store, period, price_book=None, threshold_pct=threshold)
        else:
            return 404, TEXT, f"no report at {path}; try {', '.join(REPORT_PATHS)}\n".encode()
        return 200, CONTENT_TYPES[fmt], render(report, fmt).encode("utf-8")
    except ConfigError as exc:
        return 400, TEXT, f"{exc}\n".encode()
    except StoreError as exc:
        return 503, TEXT, f"{exc}\n".encode()

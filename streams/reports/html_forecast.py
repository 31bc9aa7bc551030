"""The HTML report's month-end forecast section, for the month the report's period ends in: the
chart of streams/reports/forecast_chart.py (the fleet's spend to date, the path to month end
with its 80 % and 95 % bands) and the forecast by team. `read_forecast_view` reads the store;
`forecast_section` is pure."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from html import escape

from streams.reports.forecast import MonthForecast
from streams.reports.forecast_chart import MonthPath, forecast_chart, forecast_path
from streams.reports.forecast_report import ForecastReport, forecast, metered_from_ms
from streams.reports.money import round_total
from streams.reports.params import DAY_MS, Period, format_ms, parse_month
from streams.reports.render import money
from streams.reports.sources import cost_source, read_plan
from streams.store import ClickHouseStore

_ZERO = Decimal(0)
_HOUR_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class ForecastView:
    """The forecast by team and what the chart draws for the fleet total."""

    report: ForecastReport
    chart: MonthPath


def report_month(period: Period) -> Period:
    """The billing month the period ends in: that of its last instant (its start when empty)."""
    last_ms = max(period.start_ms, period.end_ms - 1)
    return parse_month(datetime.fromtimestamp(last_ms / 1000, UTC).strftime("%Y-%m"))


def read_forecast_view(
    store: ClickHouseStore, month: Period, *, as_of_ms: int, use_rollups: bool = True
) -> ForecastView:
    """The forecast of `month` by team as of `as_of_ms` and the fleet's path to month end,
    forecast from the same hours (the path's last point is the table's total)."""
    report = forecast(store, month, "team", now_ms=as_of_ms, use_rollups=use_rollups)
    end_ms = report.as_of_ms
    plan = read_plan(store, month.start_ms, end_ms, use_rollups=use_rollups)
    costs = cost_source(store.database, plan)
    start_s = month.start_ms // 1000
    by_hour = dict(
        store.query_rows(
            f"SELECT intDiv(toUnixTimestamp(hour) - {start_s}, 3600) AS h, sum(cost_usd) "
            f"FROM {costs} GROUP BY h"
        )
    )
    elapsed_h = (end_ms - month.start_ms) / _HOUR_MS
    hourly = [
        Decimal(by_hour.get(h, _ZERO)) for h in range(-(-(end_ms - month.start_ms) // _HOUR_MS))
    ]
    days_so_far = -(-(end_ms - month.start_ms) // DAY_MS)
    daily = tuple(sum(hourly[d * 24 : d * 24 + 24], _ZERO) for d in range(days_so_far))
    metered_from_h = (metered_from_ms(store, costs, month.start_ms) - month.start_ms) / _HOUR_MS
    path = forecast_path(
        hourly,
        elapsed_hours=elapsed_h,
        days_in_month=(month.end_ms - month.start_ms) // DAY_MS,
        metered_from_hours=metered_from_h,
    )
    return ForecastView(report, MonthPath(month, end_ms, daily, path))


def forecast_section(view: ForecastView) -> str:
    """The section: the chart, then the table by team (to date, forecast, 80 % interval,
    method) with the fleet total in its foot, and the report's notes."""
    report = view.report

    def row(label: str, kind: str, f: MonthForecast) -> str:
        return (
            f'<tr class="{kind}"><td>{escape(label)}</td>'
            f"<td class=n>{money(round_total(f.month_to_date_usd))}</td>"
            f"<td class=n>{money(round_total(f.total_usd))}</td><td class=n>"
            f"{money(round_total(f.low80_usd))}-{money(round_total(f.high80_usd))}</td>"
            f"<td class=n>{escape(f.method)}</td></tr>"
        )

    body = "".join(row(line.label, line.line_kind, line.forecast) for line in report.lines)
    total = report.total
    table = (
        "<table><thead><tr><th>team</th><th>to date USD</th><th>forecast USD</th>"
        f"<th>80 % interval</th><th>method</th></tr></thead><tbody>{body}</tbody>"
        f"<tfoot>{row(total.label, 'total', total.forecast)}</tfoot></table>"
    )
    notes = "".join(
        f'<p class="note">{escape(note)}</p>' for tab in report.table() for note in tab.notes
    )
    return (
        f"<section><h2>Month-end forecast, {format_ms(report.month.start_ms)[:7]}, as of "
        f"{format_ms(report.as_of_ms)}</h2>{forecast_chart(view.chart)}{table}{notes}</section>"
    )

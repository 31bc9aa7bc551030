"""The forecast report on the real embedded ClickHouse: rows for the month so far with a known
shape per team; the month to date is showback's total exactly and the forecast is within a
stated tolerance of the known month-end."""

from __future__ import annotations

from decimal import Decimal

from test_reports_data import HOUR_MS, T0_MS, fresh_store

from streams.reports.forecast_report import forecast
from streams.reports.params import Period, parse_month
from streams.reports.render import to_csv, to_json, to_table
from streams.reports.showback import showback
from streams.rollups import seal_hours
from streams.rows import CostRow

MONTH_H = 720  # November 2026
ELAPSED_H = 15 * 24 + 6


def _hourly(team: str, h: int) -> Decimal:
    """search: 2 USD/h rising 1 cent an hour; recs: a flat 1.50; idle: a flat 0.25."""
    return {"search": Decimal(2) + Decimal(h) / 100, "recs": Decimal("1.5"), "": Decimal("0.25")}[
        team
    ]


def _row(team: str, h: int) -> CostRow:
    w0 = T0_MS + h * HOUR_MS
    return CostRow(
        w0, w0 + 60_000, "c1", "n1", f"GPU-{team or 'idle'}", "GPU-1", "H100", "",
        "ns" if team else "", "p" if team else "", f"uid-{team}" if team else "",
        team or "__idle__", "prod" if team else "", "cc" if team else "",
        "usage" if team else "idle", 60.0, 50.0, 0.0, _hourly(team, h), Decimal(0),
        Decimal("4.0"), "on_demand", 1,
    )  # fmt: skip


def test_forecast_month_to_date_is_showbacks_total_and_the_forecast_the_known_month_end() -> None:
    store = fresh_store()
    store.insert_rows([_row(team, h) for h in range(ELAPSED_H) for team in ("search", "recs", "")])
    seal_hours(store, T0_MS + 12 * 24 * HOUR_MS, retention_s=0)  # rollups, then base rows
    now_ms = T0_MS + ELAPSED_H * HOUR_MS
    month = parse_month("2026-11")
    report = forecast(store, month, "team", now_ms=now_ms)
    shown = showback(store, Period(month.start_ms, now_ms), "team")
    assert report.total.forecast.month_to_date_usd == shown.total_usd
    assert sum(line.forecast.month_to_date_usd for line in report.lines) == shown.total_usd
    by_key = {(line.line_kind, line.key): line.forecast for line in report.lines}
    assert set(by_key) == {("allocated", "search"), ("allocated", "recs"), ("idle", "")}
    for (_, team), f in by_key.items():
        known = sum((_hourly(team, h) for h in range(MONTH_H)), Decimal(0))
        assert abs(f.total_usd - known) <= known * Decimal("0.001"), (team, f)
        # The rest of today follows the fleet's hour-of-day profile, not the line's own: the
        # interval is the model's and covers the known total within 0.05 %.
        slack = known * Decimal("0.0005")
        assert f.low95_usd - slack <= known <= f.high95_usd + slack
        assert f.method == "ets_seasonal"
    assert [line.key for line in report.lines] == ["search", "recs", ""]  # by forecast
    assert "search" in to_table(report) and "method" in to_csv(report).splitlines()[0]
    assert '"report": "forecast"' in to_json(report)

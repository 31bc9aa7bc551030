"""The forecast report reads when metering began this month: from the windows where they are
kept, from the hourly rollups where they are not. A ledger that began at 22:11 on the 2nd
forecasts from the minutes it metered, not from the 46 hours since the month began."""

from __future__ import annotations

from decimal import Decimal

from test_reports_data import HOUR_MS, T0_MS, fresh_store

from streams.reports.forecast_report import forecast
from streams.reports.params import parse_month
from streams.rollups import seal_hours
from streams.rows import CostRow

MINUTE_MS = 60_000


def _row(start_ms: int, cost: Decimal) -> CostRow:
    return CostRow(
        start_ms, start_ms + MINUTE_MS, "c1", "n1", "GPU-a", "GPU-1", "H100", "", "ns", "p",
        "uid-a", "search", "prod", "cc", "usage", 60.0, 50.0, 0.0, cost, Decimal(0),
        Decimal("6.0"), "on_demand", 1,
    )  # fmt: skip


def test_a_ledger_begun_minutes_ago_forecasts_at_the_rate_it_metered() -> None:
    store = fresh_store()
    began_ms = T0_MS + 46 * HOUR_MS + 11 * MINUTE_MS  # the 2nd, 22:11
    store.insert_rows([_row(began_ms + m * MINUTE_MS, Decimal("0.1")) for m in range(10)])
    now_ms = began_ms + 10 * MINUTE_MS
    report = forecast(store, parse_month("2026-11"), "team", now_ms=now_ms)
    f = report.total.forecast
    assert f.method == "run_rate" and f.month_to_date_usd == Decimal(1)
    left_h = (T0_MS + 720 * HOUR_MS - now_ms) / HOUR_MS
    assert abs(f.rest_usd - Decimal(repr(6 * left_h))) < Decimal("0.001")


def test_the_start_survives_sealing_the_windows_into_rollups() -> None:
    store = fresh_store()
    began_ms = T0_MS + 5 * 24 * HOUR_MS  # metering from the 6th, 00:00, 1 USD a minute
    rows = [_row(began_ms + m * MINUTE_MS, Decimal(1)) for m in range(0, 8 * 24 * 60, 60)]
    store.insert_rows(rows)  # one minute an hour: 1 USD/h for 8 days
    seal_hours(store, began_ms + 7 * 24 * HOUR_MS, retention_s=0)  # windows of 7 days gone
    now_ms = began_ms + 8 * 24 * HOUR_MS
    f = forecast(store, parse_month("2026-11"), "team", now_ms=now_ms).total.forecast
    assert f.days_of_history == 8 and f.method == "ets_trend"
    assert abs(f.total_usd - Decimal(25 * 24)) < Decimal("0.5")  # 1 USD/h over 25 days metered

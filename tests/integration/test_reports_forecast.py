"""The forecast report on the real embedded ClickHouse, on generated months with known answers:
a constant spend, a linear trend, a weekly cycle, a step change and the run-rate fallback before
day 3. The month to date is showback's total exactly; the forecast is the known month-end
exactly or within a stated bound."""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import Decimal

import pytest
from test_reports_data import HOUR_MS, T0_MS, fresh_store

from streams.reports.forecast import MonthForecast
from streams.reports.forecast_report import ForecastReport, forecast
from streams.reports.params import Period, parse_month
from streams.reports.render import to_csv, to_json, to_table
from streams.reports.showback import showback
from streams.rollups import seal_hours
from streams.rows import CostRow
from streams.store import ClickHouseStore

MONTH_H = 720  # November 2026, which starts on a Sunday
ELAPSED_H = 15 * 24 + 6
IDLE_USD_H = Decimal("0.25")  # every month below has an idle line at a flat 0.25 USD/h
Shape = Callable[[int], Decimal]  # hour of the month -> the team's spend in that hour


def _hourly(team: str, h: int) -> Decimal:
    """search: 2 USD/h rising 1 cent an hour; recs: a flat 1.50; idle: a flat 0.25."""
    return {"search": Decimal(2) + Decimal(h) / 100, "recs": Decimal("1.5"), "": IDLE_USD_H}[team]


def _row(team: str, h: int, cost_usd: Decimal) -> CostRow:
    w0 = T0_MS + h * HOUR_MS
    return CostRow(
        w0, w0 + 60_000, "c1", "n1", f"GPU-{team or 'idle'}", "GPU-1", "H100", "",
        "ns" if team else "", "p" if team else "", f"uid-{team}" if team else "",
        team or "__idle__", "prod" if team else "", "cc" if team else "",
        "usage" if team else "idle", 60.0, 50.0, 0.0, cost_usd, Decimal(0),
        Decimal("4.0"), "on_demand", 1,
    )  # fmt: skip


def test_forecast_month_to_date_is_showbacks_total_and_the_forecast_the_known_month_end() -> None:
    store = fresh_store()
    store.insert_rows(
        [
            _row(team, h, _hourly(team, h))
            for h in range(ELAPSED_H)
            for team in ("search", "recs", "")
        ]
    )
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


def _month(shape: Shape, elapsed_h: int) -> ForecastReport:
    """The forecast by team as of `elapsed_h` hours into November of a store holding team
    `search` spending `shape(h)` in hour h and an idle line at IDLE_USD_H."""
    store: ClickHouseStore = fresh_store()
    rows = [_row("search", h, shape(h)) for h in range(elapsed_h)]
    store.insert_rows(rows + [_row("", h, IDLE_USD_H) for h in range(elapsed_h)])
    return forecast(store, parse_month("2026-11"), "team", now_ms=T0_MS + elapsed_h * HOUR_MS)


def _search(report: ForecastReport) -> MonthForecast:
    [line] = [line for line in report.lines if line.key == "search"]
    return line.forecast


def _known(shape: Shape) -> Decimal:
    return sum((shape(h) for h in range(MONTH_H)), Decimal(0))


def _width95(f: MonthForecast) -> Decimal:
    return f.high95_usd - f.low95_usd


@pytest.mark.parametrize(
    ("elapsed_h", "method"), [(10 * 24, "ets_trend"), (20 * 24 + 6, "ets_seasonal")]
)
def test_a_constant_spend_forecasts_days_times_the_rate_with_a_narrow_interval(
    elapsed_h: int, method: str
) -> None:
    report = _month(lambda h: Decimal(2), elapsed_h)
    search, total = _search(report), report.total.forecast
    assert search.month_to_date_usd == 2 * elapsed_h  # exact
    assert search.method == total.method == method
    assert abs(search.total_usd - Decimal(30 * 48)) <= Decimal("0.01")  # 30 days x 48 USD
    assert abs(total.total_usd - Decimal(30 * 54)) <= Decimal("0.01")  # idle's 6 USD/day too
    assert _width95(search) <= Decimal("0.01") and _width95(total) <= Decimal("0.01")


def test_a_linear_trend_forecasts_the_sum_of_the_line_to_month_end() -> None:
    def rising(h: int) -> Decimal:
        return Decimal(2) + Decimal(h) / 100

    known = _known(rising)
    assert known == Decimal("4028.40")
    ten = _search(_month(rising, 10 * 24))
    assert ten.method == "ets_trend" and abs(ten.total_usd - known) <= Decimal("0.01")
    twenty = _search(_month(rising, 20 * 24))
    assert twenty.method == "ets_seasonal" and abs(twenty.total_usd - known) <= Decimal("0.01")
    assert twenty.low95_usd <= known <= twenty.high95_usd and _width95(twenty) <= Decimal(1)


def _weekdays(h: int) -> Decimal:
    """3 USD/h on weekdays, 1 USD/h on Saturdays and Sundays (day 0 is a Sunday)."""
    return Decimal(1) if (h // 24) % 7 in (0, 6) else Decimal(3)


def test_a_weekly_cycle_from_three_weeks_is_forecast_to_the_known_month_end() -> None:
    known = _known(_weekdays)
    assert known == Decimal(1728)  # 21 weekdays x 72 + 9 weekend days x 24
    f = _search(_month(_weekdays, 21 * 24))
    assert f.method == "ets_seasonal" and f.fallback is None
    assert abs(f.total_usd - known) <= Decimal("0.01") and _width95(f) <= Decimal("0.01")


def test_a_weekly_cycle_before_two_weeks_still_forecasts_the_rest_of_the_month() -> None:
    f = _search(_month(_weekdays, 7 * 24))
    assert f.method == "ets_trend"
    assert f.rest_usd > 0
    assert f.low95_usd <= _known(_weekdays) <= f.high95_usd


def _step(h: int) -> Decimal:
    """1 USD/h for the first 10 days, 3 USD/h from then on (a team adding GPUs)."""
    return Decimal(1) if h < 10 * 24 else Decimal(3)


def test_a_step_change_mid_month_is_followed_not_averaged_away() -> None:
    f = _search(_month(_step, 20 * 24))
    assert f.month_to_date_usd == 10 * 24 + 10 * 72
    run_rate_usd = f.month_to_date_usd / 20 * 30  # 1,440: the month's average day
    # The new level is followed: the forecast is well above the month's average day and
    # within 3 % of the month-end the new level gives (1,680).
    assert f.method == "ets_seasonal" and f.total_usd > run_rate_usd + 150
    assert abs(f.total_usd - _known(_step)) <= _known(_step) * Decimal("0.03")


def test_a_step_change_held_ten_days_is_forecast_at_its_new_level() -> None:
    f = _search(_month(_step, 20 * 24))
    known = _known(_step)
    assert known == Decimal(1680)  # 10 days x 24 + 20 days x 72
    assert f.low95_usd <= known <= f.high95_usd


def test_before_day_3_the_run_rate_is_used_and_days_alike_give_no_spread() -> None:
    report = _month(lambda h: Decimal(2), 2 * 24 + 12)
    search, total = _search(report), report.total.forecast
    for f, per_hour in ((search, 2), (total, Decimal("2.25"))):
        assert f.method == "run_rate"
        assert f.fallback == "fewer than 3 complete days of history"
        assert f.total_usd == per_hour * MONTH_H  # exactly: the month's hours at the rate
        assert f.low95_usd == f.low80_usd == f.total_usd == f.high80_usd == f.high95_usd
        assert f.days_of_history == 2


def test_with_one_complete_day_the_run_rate_interval_is_that_of_a_day_varying_by_half() -> None:
    f = _search(_month(lambda h: Decimal(2), 36))
    assert f.method == "run_rate" and f.days_of_history == 1
    per_day, left_days, days_seen = 48.0, 30 - 1.5, 1.5
    spread = per_day / 2
    sd = math.sqrt(left_days * spread**2 + left_days**2 * spread**2 / days_seen)
    rest = per_day * left_days  # 1,368
    assert f.month_to_date_usd == 72 and f.rest_usd == Decimal(1368)
    for bound, z in ((f.high80_usd, 1.2815515655446004), (f.high95_usd, 1.959963984540054)):
        assert abs(float(bound) - (72 + rest + z * sd)) < 1e-5
    for bound, z in ((f.low80_usd, 1.2815515655446004), (f.low95_usd, 1.959963984540054)):
        assert abs(float(bound) - (72 + max(0.0, rest - z * sd))) < 1e-5

"""The month-end forecast core on series with known answers."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.reports.forecast import (
    COMPLETE,
    ETS_SEASONAL,
    ETS_TREND,
    MIN_DAYS,
    RUN_RATE,
    forecast_hourly,
    forecast_month_end,
)

MONTH_H = 720  # a 30-day month


def linear(hours: int) -> list[Decimal]:
    return [Decimal(1) + Decimal(h) / 100 for h in range(hours)]


LINEAR_MONTH_END = sum(linear(MONTH_H), Decimal(0))  # 3308.40


def test_linear_series_forecast_equals_the_known_month_end_and_the_interval_covers_it() -> None:
    for days, method in ((7, ETS_TREND), (20, ETS_SEASONAL)):
        f = forecast_hourly(linear(days * 24), elapsed_hours=days * 24, month_hours=MONTH_H)
        assert f.method == method
        assert f.month_to_date_usd == sum(linear(days * 24), Decimal(0))  # exact
        assert abs(f.total_usd - LINEAR_MONTH_END) <= LINEAR_MONTH_END * Decimal("0.0001")
        assert f.low95_usd <= f.low80_usd <= f.total_usd <= f.high80_usd <= f.high95_usd
        assert f.low95_usd - Decimal("0.01") <= LINEAR_MONTH_END <= f.high95_usd + Decimal("0.01")


def test_mid_day_rest_of_today_follows_the_hour_of_day_profile() -> None:
    f = forecast_hourly(linear(20 * 24 + 5), elapsed_hours=20 * 24 + 5, month_hours=MONTH_H)
    assert abs(f.total_usd - LINEAR_MONTH_END) <= LINEAR_MONTH_END * Decimal("0.0001")


def test_constant_series_gives_the_known_total_and_a_narrow_interval() -> None:
    f = forecast_hourly([Decimal(5)] * 480, elapsed_hours=480, month_hours=MONTH_H)
    assert f.month_to_date_usd == Decimal(2400)
    assert abs(f.total_usd - Decimal(3600)) <= Decimal("0.01")
    assert f.high95_usd - f.low95_usd <= Decimal("0.01")


def test_too_little_history_falls_back_to_the_run_rate_and_says_so() -> None:
    f = forecast_hourly([Decimal(2)] * 60, elapsed_hours=60, month_hours=MONTH_H)
    assert MIN_DAYS == 3
    assert f.method == RUN_RATE
    assert f.fallback == "fewer than 3 complete days of history"
    assert f.total_usd == Decimal(1440)  # 2 USD/h x 720 h
    assert f.low95_usd == f.total_usd == f.high95_usd  # days alike: no spread seen
    assert f.method_text.startswith("run rate")
    varied = forecast_hourly(
        [Decimal(2)] * 24 + [Decimal(3)] * 36, elapsed_hours=60, month_hours=MONTH_H
    )
    assert varied.method == RUN_RATE
    assert varied.low95_usd < varied.low80_usd < varied.total_usd < varied.high80_usd


def test_no_hours_yet_and_a_finished_month() -> None:
    empty = forecast_month_end([], Decimal(0), hours_into_today=0, days_in_month=30)
    assert empty.total_usd == 0 and empty.method == RUN_RATE and empty.fallback
    done = forecast_month_end([Decimal(3)] * 30, Decimal(0), hours_into_today=0, days_in_month=30)
    assert done.method == COMPLETE
    assert done.total_usd == done.low95_usd == done.high95_usd == Decimal(90)


def test_same_input_gives_the_same_forecast() -> None:
    noisy = [Decimal(10 + (h * 7919) % 13) / 3 for h in range(16 * 24 + 7)]
    one = forecast_hourly(noisy, elapsed_hours=len(noisy), month_hours=MONTH_H)
    two = forecast_hourly(noisy, elapsed_hours=len(noisy), month_hours=MONTH_H)
    assert one == two


@settings(max_examples=200, deadline=None)
@given(
    rate=st.decimals(min_value="0.01", max_value="10000", places=2),
    elapsed_h=st.integers(min_value=1, max_value=71),
)
def test_before_day_3_a_constant_rate_forecasts_the_rate_times_the_months_hours(
    rate: Decimal, elapsed_h: int
) -> None:
    f = forecast_hourly([rate] * elapsed_h, elapsed_hours=elapsed_h, month_hours=MONTH_H)
    assert f.method == RUN_RATE and f.month_to_date_usd == rate * elapsed_h
    assert abs(f.total_usd - rate * MONTH_H) <= rate * MONTH_H * Decimal("1e-12") + Decimal(
        "0.000001"
    )
    assert f.low95_usd <= f.low80_usd <= f.total_usd <= f.high80_usd <= f.high95_usd
    assert f.low95_usd >= f.month_to_date_usd  # spend to date is spent


@settings(max_examples=25, deadline=None)
@given(
    days=st.integers(min_value=MIN_DAYS, max_value=29),
    daily=st.lists(st.decimals(min_value=0, max_value=5000, places=2), min_size=29, max_size=29),
    hours_into_today=st.integers(min_value=0, max_value=23),
)
def test_any_month_so_far_gives_ordered_bounds_at_or_above_the_month_to_date(
    days: int, daily: list[Decimal], hours_into_today: int
) -> None:
    today = daily[days % 29] * hours_into_today / 24
    f = forecast_month_end(daily[:days], today, hours_into_today=hours_into_today, days_in_month=30)
    assert f.month_to_date_usd == sum(daily[:days], Decimal(0)) + today  # exact
    assert f.rest_usd >= 0
    assert f.month_to_date_usd <= f.low95_usd <= f.low80_usd <= f.total_usd
    assert f.total_usd <= f.high80_usd <= f.high95_usd
    assert f.method in (ETS_TREND, ETS_SEASONAL) and f.days_of_history == days

"""A ledger that began metering mid-month: the time before it is not history. Before this rule
the run rate divided 10 minutes of spend by the 46 hours since the month began, and the model
fitted the zero days before metering as a trend."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from streams.reports.forecast import RUN_RATE, forecast_month_end


def test_the_run_rate_counts_only_the_hours_metered() -> None:
    # 2 days and 22.35 h into a 31-day month; metering began 10 minutes ago at 6 USD/h.
    elapsed_h = 2 * 24 + 22.35
    f = forecast_month_end(
        [Decimal(0), Decimal(0)],
        Decimal(1),
        hours_into_today=22.35,
        days_in_month=31,
        metered_from_hours=elapsed_h - 1 / 6,
    )
    assert f.method == RUN_RATE
    left_h = 31 * 24 - elapsed_h
    assert abs(f.rest_usd - Decimal(6 * left_h)) < Decimal("0.0001")
    assert "0.1667 h metered" in f.method_text


def test_days_before_metering_are_not_fitted() -> None:
    # Metering began at the start of day 10; ten complete days of 24 USD since; day 20, 12 h in.
    daily = [Decimal(0)] * 10 + [Decimal(24)] * 10
    f = forecast_month_end(
        daily,
        Decimal(12),
        hours_into_today=12,
        days_in_month=30,
        metered_from_hours=10 * 24,
    )
    assert f.days_of_history == 10 and f.method == "ets_trend"
    assert abs(f.rest_usd - Decimal(12 + 9 * 24)) < Decimal("0.01")
    # Without the start, the zero days are fitted as history and the forecast is off.
    naive = forecast_month_end(daily, Decimal(12), hours_into_today=12, days_in_month=30)
    assert abs(naive.rest_usd - f.rest_usd) > 10


def test_a_partial_first_day_is_not_a_complete_day_of_history() -> None:
    daily = [Decimal(0)] * 5 + [Decimal(6)] + [Decimal(24)] * 2  # metering from 18:00 on day 5
    f = forecast_month_end(
        daily, Decimal(0), hours_into_today=0, days_in_month=30, metered_from_hours=5 * 24 + 18
    )
    assert f.method == RUN_RATE and f.days_of_history == 2
    assert abs(f.rest_usd - Decimal(22 * 24)) < Decimal("0.0001")  # 54 USD over 54 h metered


@given(
    days=st.integers(0, 29),
    into=st.floats(0, 23.99),
    start=st.floats(-5, 1000),
    rate=st.decimals(min_value=0, max_value=100, places=2),
)
def test_a_start_at_or_before_the_month_changes_nothing(
    days: int, into: float, start: float, rate: Decimal
) -> None:
    daily = [rate * 24] * days
    today = rate * Decimal(repr(into))
    plain = forecast_month_end(daily, today, hours_into_today=into, days_in_month=30)
    early = forecast_month_end(
        daily, today, hours_into_today=into, days_in_month=30, metered_from_hours=min(start, 0)
    )
    assert plain == early
    later = forecast_month_end(
        daily, today, hours_into_today=into, days_in_month=30, metered_from_hours=start
    )
    assert later.month_to_date_usd == plain.month_to_date_usd
    assert later.low95_usd <= later.total_usd <= later.high95_usd

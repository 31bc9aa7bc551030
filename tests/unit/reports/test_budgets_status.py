"""Budget status, threshold and the day the forecast reaches the budget: pure, known answers
and properties."""

from __future__ import annotations

import math
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.reports.budget_report import (
    AT_RISK,
    FORECAST_OVER,
    NO_SPEND_FORECAST,
    ON_TRACK,
    OVER,
    STATUSES,
    assess,
)
from streams.reports.budgets import Budget
from streams.reports.forecast import MonthForecast

DAY_MS = 86_400_000
START_MS = 1_793_491_200_000  # 2026-11-01
END_MS = START_MS + 30 * DAY_MS
AS_OF_MS = START_MS + 10 * DAY_MS


def _forecast(mtd: str, total: str, high80: str | None = None) -> MonthForecast:
    m, t = Decimal(mtd), Decimal(total)
    h = Decimal(high80) if high80 is not None else t
    return MonthForecast(m, t - m, t, h, t, h, "ets_trend", "test", 10)


BUDGET = Budget("team", "search", Decimal(1000), (Decimal(80), Decimal(100)))


def test_on_track_at_risk_forecast_over_and_over() -> None:
    cases = [
        (_forecast("300", "700", "790"), ON_TRACK, None),
        (_forecast("300", "700", "800"), AT_RISK, Decimal(80)),  # reaching is enough
        (_forecast("300", "700", "1200"), AT_RISK, Decimal(100)),
        (_forecast("300", "850", "990"), FORECAST_OVER, Decimal(80)),
        (_forecast("300", "1000", "1100"), FORECAST_OVER, Decimal(100)),
        (_forecast("1000", "1500"), FORECAST_OVER, Decimal(100)),  # at the budget, not past
        (_forecast("1000.01", "1500"), OVER, Decimal(100)),
    ]
    for f, status, threshold in cases:
        line = assess(BUDGET, f, as_of_ms=AS_OF_MS, end_ms=END_MS)
        assert (line.status, line.threshold_pct) == (status, threshold), f


def test_percentages_and_the_day_the_budget_is_reached() -> None:
    # 300 by day 10 and 1,200 by day 30: 45 a day; 1,000 is reached 700/45 = 15.56 days on.
    line = assess(BUDGET, _forecast("300", "1200"), as_of_ms=AS_OF_MS, end_ms=END_MS)
    assert (line.used_pct, line.forecast_pct) == (Decimal("30.00"), Decimal("120.00"))
    assert line.crosses_ms == AS_OF_MS + math.ceil(Decimal(700) / Decimal(900) * 20 * DAY_MS)
    assert line.crosses_ms is not None and line.crosses_ms > START_MS + 25 * DAY_MS
    assert line.crosses_ms < START_MS + 26 * DAY_MS  # on 2026-11-26
    # Not reached, or reached already: no day.
    assert (
        assess(BUDGET, _forecast("300", "999"), as_of_ms=AS_OF_MS, end_ms=END_MS).crosses_ms is None
    )
    assert (
        assess(BUDGET, _forecast("1001", "2000"), as_of_ms=AS_OF_MS, end_ms=END_MS).crosses_ms
        is None
    )


def test_no_spend_is_on_track_at_zero() -> None:
    line = assess(BUDGET, NO_SPEND_FORECAST, as_of_ms=AS_OF_MS, end_ms=END_MS)
    assert (line.status, line.used_pct, line.forecast_pct, line.crosses_ms) == (
        ON_TRACK, Decimal(0), Decimal(0), None
    )  # fmt: skip


_USD = st.decimals(min_value=0, max_value=10_000, places=2)


@settings(max_examples=300, deadline=None)
@given(_USD, _USD, _USD, _USD, st.lists(st.integers(1, 1000), min_size=1, max_size=4, unique=True))
def test_more_spend_never_improves_the_status(
    mtd: Decimal, rest: Decimal, spread: Decimal, more: Decimal, thresholds: list[int]
) -> None:
    budget = Budget("team", "t", Decimal(1000), tuple(Decimal(t) for t in sorted(thresholds)))

    def status(extra: Decimal) -> int:
        f = MonthForecast(mtd + extra, rest, mtd, mtd + extra + rest + spread, mtd, mtd, "x", "", 1)
        line = assess(budget, f, as_of_ms=AS_OF_MS, end_ms=END_MS)
        if line.status in (AT_RISK, FORECAST_OVER):
            assert line.threshold_pct in budget.thresholds_pct
        if line.status == OVER:  # past the budget: a threshold above 100 % need not be reached
            assert line.threshold_pct in (None, *budget.thresholds_pct)
        if line.crosses_ms is not None:
            assert AS_OF_MS <= line.crosses_ms <= END_MS
        return STATUSES.index(line.status)

    assert status(more) >= status(Decimal(0))

"""The HTML report's month-end forecast chart: the cumulative path to month end from one fit per
day left, whose last point is the month-end forecast, and its SVG."""

from __future__ import annotations

import itertools
import re
from decimal import Decimal

from streams.reports.forecast import forecast_hourly
from streams.reports.forecast_chart import MonthPath, forecast_chart, forecast_path
from streams.reports.params import Period

T0_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z, a 30-day month
HOUR_MS, DAY_H, MONTH_H = 3_600_000, 24, 720
NOVEMBER = Period(T0_MS, T0_MS + MONTH_H * HOUR_MS)


def _noisy(hours: int) -> list[Decimal]:
    return [Decimal(10 + (h * 7919) % 13) / 3 + Decimal(h) / 200 for h in range(hours)]


def test_a_constant_spend_walks_up_by_the_day_to_the_known_month_end() -> None:
    path = forecast_path([Decimal(2)] * (16 * DAY_H), elapsed_hours=16 * DAY_H, days_in_month=30)
    assert [p.day for p in path] == list(range(17, 31))
    for p in path:
        assert abs(p.point_usd - 48 * p.day) <= Decimal("0.01"), p
        assert p.high95_usd - p.low95_usd <= Decimal("0.01")


def test_the_last_point_is_the_month_end_forecast_and_the_bands_nest() -> None:
    hourly = _noisy(15 * DAY_H + 7)
    path = forecast_path(hourly, elapsed_hours=len(hourly), days_in_month=30)
    month_end = forecast_hourly(hourly, elapsed_hours=len(hourly), month_hours=MONTH_H)
    last = path[-1]
    assert last.day == 30 and last.point_usd == month_end.total_usd
    assert (last.low80_usd, last.high80_usd) == (month_end.low80_usd, month_end.high80_usd)
    assert (last.low95_usd, last.high95_usd) == (month_end.low95_usd, month_end.high95_usd)
    assert path[0].day == 16  # the rest of today first
    mtd = sum(hourly, Decimal(0))
    for before, after in itertools.pairwise(path):
        assert mtd <= before.point_usd <= after.point_usd
    for p in path:
        assert p.low95_usd <= p.low80_usd <= p.point_usd <= p.high80_usd <= p.high95_usd
    assert last.high95_usd - last.low95_usd > path[0].high95_usd - path[0].low95_usd


def test_a_finished_month_has_no_path() -> None:
    assert forecast_path([Decimal(1)] * MONTH_H, elapsed_hours=MONTH_H, days_in_month=30) == ()


def _svg(data: MonthPath) -> str:
    return forecast_chart(data)


def test_the_chart_draws_a_bar_a_day_to_date_and_the_bands_to_month_end() -> None:
    hourly = _noisy(15 * DAY_H + 7)
    path = forecast_path(hourly, elapsed_hours=len(hourly), days_in_month=30)
    daily = tuple(sum(hourly[d * 24 : d * 24 + 24], Decimal(0)) for d in range(16))
    svg = _svg(MonthPath(NOVEMBER, T0_MS + len(hourly) * HOUR_MS, daily, path))
    assert svg.startswith('<svg class="chart" id="chart-forecast"')
    assert svg.count('<rect class="bar"') == 16  # 15 days and today so far
    assert svg.count('class="band95"') == 1 and svg.count('class="band80"') == 1
    assert svg.count('class="forecast-line"') == 1
    # Every point of the bands lies inside the plot.
    for points in re.findall(r'points="([^"]+)"', svg):
        for pair in points.split():
            x, y = (float(v) for v in pair.split(","))
            assert 60 <= x <= 870 and 0 <= y <= 260
    assert f"{path[-1].point_usd:,.2f}" in svg  # the month-end point forecast is labelled
    assert "2026-11-16: 0" not in svg and "2026-11-16 (so far)" in svg


def test_a_month_without_spend_and_a_finished_month() -> None:
    empty = _svg(MonthPath(NOVEMBER, T0_MS + HOUR_MS, (Decimal(0),), ()))
    assert "<svg" not in empty and "No GPU cost this month" in empty
    done = _svg(MonthPath(NOVEMBER, NOVEMBER.end_ms, (Decimal(5),) * 30, ()))
    assert done.count('<rect class="bar"') == 30 and "band95" not in done

"""The HTML report's time axis: bucket width from the period's length, every bucket drawn,
round y-axis steps."""

from __future__ import annotations

import pytest

from streams.reports.charts import bucket_starts_ms, chart_bucket, nice_axis_top
from streams.reports.params import Period

T0_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z
MIN_MS, HOUR_MS = 60_000, 3_600_000


@pytest.mark.parametrize(
    ("length_ms", "name", "bars"),
    [
        (10 * MIN_MS, "minute", 10),
        (3 * HOUR_MS, "minute", 180),
        (3 * HOUR_MS + MIN_MS, "5 minutes", 37),
        (12 * HOUR_MS, "5 minutes", 144),
        (30 * HOUR_MS, "hour", 30),
        (7 * 24 * HOUR_MS, "hour", 168),
        (30 * 24 * HOUR_MS, "day", 30),
    ],
)
def test_bucket_follows_the_period_length(length_ms: int, name: str, bars: int) -> None:
    period = Period(T0_MS, T0_MS + length_ms)
    bucket = chart_bucket(period)
    assert bucket.name == name
    assert len(bucket_starts_ms(period, bucket)) == bars


def test_buckets_cover_an_unaligned_period() -> None:
    period = Period(T0_MS + 90_500, T0_MS + 5 * MIN_MS + 1)
    starts = bucket_starts_ms(period, chart_bucket(period))
    assert starts[0] <= period.start_ms < starts[0] + MIN_MS
    assert starts[-1] < period.end_ms <= starts[-1] + MIN_MS
    assert len(starts) == 5


@pytest.mark.parametrize(
    ("peak", "top", "places"),
    [
        (0.083, 0.1, 3),
        (1.27, 2.0, 1),
        (7.0, 8.0, 0),
        (99.9, 100.0, 0),
        (0.42, 0.6, 2),
        (0.0, 1.0, 2),
    ],
)
def test_axis_top_is_round_and_above_the_peak(peak: float, top: float, places: int) -> None:
    assert nice_axis_top(peak) == pytest.approx((top, places))

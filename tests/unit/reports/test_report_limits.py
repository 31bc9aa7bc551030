"""Report parameters are bounded: a period of at most 400 days inside the times a report can
read, times in three strict forms, and chart buckets that stay under their cap for any period.
Every bad value is a ConfigError of one line (HTTP 400, exit 2), never another exception."""

from __future__ import annotations

import itertools

import pytest

from runtime.errors import ConfigError
from streams.reports.charts import bucket_starts_ms, chart_bucket, count_buckets
from streams.reports.limits import MAX_CHART_BUCKETS, MAX_PERIOD_DAYS
from streams.reports.params import Period, check_period, parse_instant, parse_month, parse_period

T0_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z
DAY_MS = 86_400_000


def refused(from_text: str | None, to_text: str | None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_period(from_text, to_text, now_ms=T0_MS)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_period_of_centuries_is_refused_naming_the_limit() -> None:
    # was: 9.6 s and 700 MB building one chart bucket per hour of 8,000 years
    assert "outside the times a report reads" in refused("0", "253402300799000")
    assert "at most 400 days" in refused("0", "2026-11-01")
    message = refused("2000-01-01", "2020-01-01")
    assert "7,305 days" in message and f"at most {MAX_PERIOD_DAYS} days" in message
    assert "--from/--to" in message


def test_the_longest_period_is_accepted_and_one_ms_more_is_not() -> None:
    longest = T0_MS + MAX_PERIOD_DAYS * DAY_MS
    period = parse_period(str(T0_MS), str(longest), now_ms=T0_MS)
    assert period.end_ms - period.start_ms == MAX_PERIOD_DAYS * DAY_MS
    assert "at most" in refused(str(T0_MS), str(longest + 1))
    with pytest.raises(ConfigError, match="at most"):
        check_period(Period(T0_MS, longest + 1))


@pytest.mark.parametrize(
    "text",
    [
        "10000000000000000",  # was MemoryError
        "9" * 30,  # was OverflowError
        "9" * 5000,  # longer than int() converts
        "253402300799000",  # 9999-12-31: past what the store holds
        "0001-01-01T00:00:00+23:59",  # was a 500: the offset pushes it before year 1
        "9999-12-31T23:59:59-23:59",  # and past year 9999
        "0000-01-01",
        "9999-12-31",
        "1969-12-31",
        "²",  # str.isdigit() says yes
        "١٧٩٣٤٩١٢٠٠٠٠٠",  # Arabic-Indic digits
        "\uff12\uff10\uff12\uff16-\uff11\uff11-\uff10\uff11",  # fullwidth digits
        "",
        "   ",
        "2026-11-01T00:00:00",  # no offset: not RFC 3339
        "2026-11-01 00:00:00Z",  # RFC 3339 needs the T here, as CloudEvents does
        "2026-11",
        "yesterday",
        "\x00",
    ],
)
def test_bad_times_are_one_line_config_errors(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_instant(text, option="--to")
    assert "\n" not in str(info.value) and str(info.value).startswith("--to")


@pytest.mark.parametrize(
    ("text", "time_ms"),
    [
        ("2026-11-01", T0_MS),
        (str(T0_MS), T0_MS),
        ("0", 0),
        ("2026-11-01T00:00:00Z", T0_MS),
        ("2026-11-01T01:30:00+01:30", T0_MS),
        ("2026-11-01T00:00:00.250Z", T0_MS + 250),
    ],
)
def test_the_three_time_forms(text: str, time_ms: int) -> None:
    assert parse_instant(text, option="--from") == time_ms


@pytest.mark.parametrize("text", ["0000-01", "9999-12", "1969-12", "2026-00", "2026-1", "", "²"])
def test_bad_months_are_config_errors(text: str) -> None:
    # 0000-01 and 9999-12 were HTTP 500s: the month's start or end is not a date
    with pytest.raises(ConfigError, match="--period"):
        parse_month(text)


def test_an_empty_from_or_to_is_refused_and_a_missing_one_defaults() -> None:
    assert "--from" in refused("", None)
    assert "--to" in refused(None, "")
    assert parse_period(None, None, now_ms=T0_MS + DAY_MS) == Period(T0_MS, T0_MS + DAY_MS)


@pytest.mark.parametrize(
    ("length_ms", "name"),
    [
        (30 * DAY_MS, "day"),
        (MAX_CHART_BUCKETS * DAY_MS - DAY_MS, "day"),
        (MAX_PERIOD_DAYS * DAY_MS, "week"),
    ],
)
def test_long_periods_get_coarser_buckets(length_ms: int, name: str) -> None:
    period = Period(T0_MS, T0_MS + length_ms)
    bucket = chart_bucket(period)
    assert bucket.name == name
    assert len(bucket_starts_ms(period, bucket)) <= MAX_CHART_BUCKETS


@pytest.mark.parametrize(
    "period",
    [
        Period(0, 253_402_300_799_000),  # the period that exhausted the worker
        Period(0, 10**17),
        Period(T0_MS + 1, T0_MS + 400 * DAY_MS - 1),
        Period(T0_MS, T0_MS),
    ],
)
def test_buckets_stay_under_the_cap_for_any_period(period: Period) -> None:
    bucket = chart_bucket(period)
    assert count_buckets(period, bucket) <= MAX_CHART_BUCKETS
    if count_buckets(period, bucket) < 10_000:
        starts = bucket_starts_ms(period, bucket)
        assert len(starts) == count_buckets(period, bucket)


def test_weeks_start_on_monday() -> None:
    period = Period(T0_MS, T0_MS + MAX_PERIOD_DAYS * DAY_MS)  # 2026-11-01 is a Sunday
    starts = bucket_starts_ms(period, chart_bucket(period))
    assert starts[0] == T0_MS - 6 * DAY_MS  # Monday 2026-10-26
    assert all(b - a == 7 * DAY_MS for a, b in itertools.pairwise(starts))

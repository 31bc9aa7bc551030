"""Report parameters: periods, dimensions, output formats. Bad values raise ConfigError with a
message fit for one line on a terminal or an HTTP 400 body; every period is bounded
(streams.reports.limits)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from runtime.errors import ConfigError
from schemas.events import parse_time
from schemas.fields import excerpt
from streams.reports.limits import EARLIEST_MS, LATEST_MS, MAX_PERIOD_DAYS, MAX_UNIX_MS_DIGITS

DIMENSIONS = ("team", "product", "model", "namespace", "cost_center")
FORMATS = ("table", "csv", "json")
DAY_MS = 86_400_000
# ASCII digits only: str.isdigit() and \d also take '²' and digits of other scripts.
_DIGITS = re.compile(r"[0-9]+")
_MONTH = re.compile(r"([0-9]{4})-([0-9]{2})")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_RFC3339_DATE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt]")  # the rest: parse_time
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
TIME_FORMS = (
    "a date (2026-11-01), an RFC 3339 time with an offset (2026-11-01T00:00:00Z) or Unix ms"
)


@dataclass(frozen=True, slots=True)
class Period:
    """[start_ms, end_ms) in Unix ms, UTC."""

    start_ms: int
    end_ms: int

    def __post_init__(self) -> None:
        if self.end_ms < self.start_ms:
            raise ConfigError(
                f"the period ends ({_time_text(self.end_ms)}) before it starts "
                f"({_time_text(self.start_ms)})"
            )

    @property
    def hours(self) -> float:
        return (self.end_ms - self.start_ms) / 3_600_000


def format_ms(time_ms: int) -> str:
    """RFC 3339 UTC with second precision, e.g. 2026-11-01T00:00:00Z."""
    return datetime.fromtimestamp(time_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _time_text(time_ms: int) -> str:
    return format_ms(time_ms) if EARLIEST_MS <= time_ms <= LATEST_MS else f"{time_ms} ms"


def parse_instant(text: str, *, option: str) -> int:
    """A date (midnight UTC), a strict RFC 3339 time (T separator, Z or a numeric offset), or
    Unix ms (ASCII digits); between EARLIEST_MS and LATEST_MS."""
    value = text.strip()
    if not value:
        raise ConfigError(f"{option} is empty: give {TIME_FORMS}")
    try:
        if _DIGITS.fullmatch(value):
            # More digits than LATEST_MS has is past it; int() of them is never needed.
            time_ms = int(value) if len(value) <= MAX_UNIX_MS_DIGITS else LATEST_MS + 1
        elif _DATE.fullmatch(value):
            day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
            time_ms = (day - _EPOCH) // _MILLISECOND
        elif _RFC3339_DATE_TIME.match(value):
            time_ms = parse_time(value)
        else:
            raise ValueError(value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{option} {excerpt(text)} is not {TIME_FORMS}") from None
    if not EARLIEST_MS <= time_ms <= LATEST_MS:
        raise ConfigError(
            f"{option} {excerpt(text)} is outside the times a report reads, "
            f"{format_ms(EARLIEST_MS)} to {format_ms(LATEST_MS)}"
        )
    return time_ms


def check_period(period: Period) -> Period:
    """The period itself, if a report may cover it: at most MAX_PERIOD_DAYS, inside the times
    a report reads."""
    if period.start_ms < EARLIEST_MS or period.end_ms > LATEST_MS:
        raise ConfigError(
            f"the period {_time_text(period.start_ms)} to {_time_text(period.end_ms)} is outside "
            f"the times a report reads, {format_ms(EARLIEST_MS)} to {format_ms(LATEST_MS)}"
        )
    length_ms = period.end_ms - period.start_ms
    if length_ms > MAX_PERIOD_DAYS * DAY_MS:
        days = length_ms / DAY_MS
        text = f"{length_ms // DAY_MS:,}" if length_ms % DAY_MS == 0 else f"{days:,.2f}"
        raise ConfigError(
            f"the period is {text} days; reports cover at most {MAX_PERIOD_DAYS} days (--from/--to)"
        )
    return period


def parse_period(from_text: str | None, to_text: str | None, *, now_ms: int) -> Period:
    """--from/--to; when not given: the start of the current UTC month, and now."""
    if from_text is not None:
        start = parse_instant(from_text, option="--from")
    else:
        now = datetime.fromtimestamp(now_ms / 1000, UTC)
        start = int(datetime(now.year, now.month, 1, tzinfo=UTC).timestamp() * 1000)
    end = parse_instant(to_text, option="--to") if to_text is not None else now_ms
    return check_period(Period(start, end))


def parse_month(text: str) -> Period:
    """A billing period YYYY-MM: [first day, first day of the next month)."""
    match = _MONTH.fullmatch(text.strip())
    try:
        if not match:
            raise ValueError(text)
        year, month = int(match.group(1)), int(match.group(2))
        start = datetime(year, month, 1, tzinfo=UTC)
        end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
    except ValueError:
        raise ConfigError(f"--period {excerpt(text)} is not a month like 2026-11") from None
    period = Period((start - _EPOCH) // _MILLISECOND, (end - _EPOCH) // _MILLISECOND)
    if period.start_ms < EARLIEST_MS or period.end_ms > LATEST_MS:
        raise ConfigError(
            f"--period {excerpt(text)} is outside the months a report reads, "
            f"{format_ms(EARLIEST_MS)[:7]} to {format_ms(LATEST_MS - 1)[:7]}"
        )
    return check_period(period)


def check_choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise ConfigError(f"{option} {excerpt(value)} is not one of {', '.join(choices)}")
    return value

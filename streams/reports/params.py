"""Report parameters: periods, dimensions, output formats. Bad values raise ConfigError with a
message fit for one line on a terminal or an HTTP 400 body."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from runtime.errors import ConfigError

DIMENSIONS = ("team", "product", "model", "namespace", "cost_center")
FORMATS = ("table", "csv", "json")
EXPORT_FORMATS = ("focus-csv", "focus-parquet", "json")
_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True, slots=True)
class Period:
    """[start_ms, end_ms) in Unix ms, UTC."""

    start_ms: int
    end_ms: int

    def __post_init__(self) -> None:
        if self.end_ms < self.start_ms:
            raise ConfigError(
                f"the period ends ({format_ms(self.end_ms)}) before it starts "
                f"({format_ms(self.start_ms)})"
            )

    @property
    def hours(self) -> float:
        return (self.end_ms - self.start_ms) / 3_600_000


def format_ms(time_ms: int) -> str:
    """RFC 3339 UTC with second precision, e.g. 2026-11-01T00:00:00Z."""
    return datetime.fromtimestamp(time_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_instant(text: str, *, option: str) -> int:
    """A date (midnight UTC), an RFC 3339 time, or Unix ms."""
    value = text.strip()
    try:
        if value.isdigit():
            return int(value)
        if _DATE.match(value):
            day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
            return int(day.timestamp() * 1000)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"{option} {text!r} is not a date (2026-11-01), an RFC 3339 time or Unix ms"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def parse_period(from_text: str | None, to_text: str | None, *, now_ms: int) -> Period:
    """--from/--to; defaults: the start of the current UTC month, and now."""
    if from_text:
        start = parse_instant(from_text, option="--from")
    else:
        now = datetime.fromtimestamp(now_ms / 1000, UTC)
        start = int(datetime(now.year, now.month, 1, tzinfo=UTC).timestamp() * 1000)
    end = parse_instant(to_text, option="--to") if to_text else now_ms
    return Period(start, end)


def parse_month(text: str) -> Period:
    """A billing period YYYY-MM: [first day, first day of the next month)."""
    match = _MONTH.match(text.strip())
    if not match or not 1 <= int(match.group(2)) <= 12:
        raise ConfigError(f"--period {text!r} is not a month like 2026-11")
    year, month = int(match.group(1)), int(match.group(2))
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
    return Period(int(start.timestamp() * 1000), int(end.timestamp() * 1000))


def check_choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise ConfigError(f"{option} {value!r} is not one of {', '.join(choices)}")
    return value

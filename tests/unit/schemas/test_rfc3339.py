"""Event times are RFC 3339 date-times (section 5.6) and nothing else.

`parse_time` once took whatever `datetime.fromisoformat` takes (ISO 8601 week dates, the basic
format, a space for the `T`); it now takes `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)`
with its components in range, and raises ValueError (never anything else) for any other text.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import (
    GPU_SAMPLE_TYPE,
    TOKENS_TYPE,
    Ok,
    Rejected,
    TokenDelta,
    _decode_slowly,
    decode_event,
    event_to_dict,
    format_time,
    make_event,
    parse_time,
)

TOKENS = TokenDelta("prod-eu", "search", "vllm-0", "uid-1", "llama-3-70b", 10, 5, 1, 15.0)


def document() -> dict[str, Any]:
    return event_to_dict(make_event(TOKENS, event_id="t-1", source="a", time_ms=0))


NOT_RFC_3339 = [
    "2026-W44-1T00:00Z",  # ISO 8601 week date
    "20261101T000000Z",  # ISO 8601 basic format
    "2026-11-01 00:00:00Z",  # a space for the T: RFC 3339 leaves that to applications
    "2026-11-01T00:00:00",  # no offset
    "2026-11-01",  # a date alone
    "2026-11-01T00:00Z",  # no seconds
    "2026-11-01T00:00:00.Z",  # a dot without digits
    "2026-11-01T00:00:00,5Z",  # a comma for the dot
    "2026-11-01T00:00:00+0100",  # an offset without its colon
    "2026-11-01T00:00:00+01",  # an offset without minutes
    "2026-11-01T00:00:00UTC",
    "2026-305T00:00:00Z",  # ordinal date
    "+2026-11-01T00:00:00Z",
    "\uff12\uff10\uff12\uff16-11-01T00:00:00Z",  # fullwidth digits
    "2026-11-01T00:00:00Z\n",
    " 2026-11-01T00:00:00Z",
    "2026-13-01T00:00:00Z",
    "2026-00-01T00:00:00Z",
    "2026-11-31T00:00:00Z",
    "2025-02-29T00:00:00Z",
    "2026-11-00T00:00:00Z",
    "2026-11-01T24:00:00Z",
    "2026-11-01T00:60:00Z",
    "2026-11-01T00:00:60Z",  # a leap second has no Unix time
    "2026-11-01T00:00:00+24:00",
    "2026-11-01T00:00:00+01:60",
    "0000-01-01T00:00:00Z",
    "0001-01-01T00:00:00+00:01",  # before year 1 in UTC
    "9999-12-31T23:59:59-00:01",  # after year 9999 in UTC
    "",
]

RFC_3339 = [
    ("2026-11-26T10:00:00.000Z", 1_795_687_200_000),
    ("2026-11-26T10:00:00Z", 1_795_687_200_000),
    ("2026-11-26t10:00:00z", 1_795_687_200_000),
    ("2026-11-26T11:00:00+01:00", 1_795_687_200_000),
    ("2026-11-26T09:30:00-00:30", 1_795_687_200_000),
    ("2026-11-26T10:00:00-00:00", 1_795_687_200_000),
    ("2026-11-26T10:00:00.1Z", 1_795_687_200_100),
    ("2026-11-26T10:00:00.123456789Z", 1_795_687_200_123),
    ("2026-11-26T10:00:00.9999Z", 1_795_687_200_999),
    ("2024-02-29T00:00:00Z", 1_709_164_800_000),
    ("1970-01-01T00:00:00Z", 0),
    ("1969-12-31T23:59:59.999Z", -1),
    ("0001-01-01T00:00:00Z", -62_135_596_800_000),
    ("9999-12-31T23:59:59.999Z", 253_402_300_799_999),
]


@pytest.mark.parametrize("text", NOT_RFC_3339)
def test_what_is_not_rfc_3339_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text)


@pytest.mark.parametrize("text, time_ms", RFC_3339)
def test_rfc_3339_date_times_are_read_to_the_millisecond(text: str, time_ms: int) -> None:
    assert parse_time(text) == time_ms


@settings(max_examples=500)
@given(st.text(max_size=40) | st.from_regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9:.+Zz-]{8,20}"))
def test_any_text_gives_milliseconds_or_a_value_error(text: str) -> None:
    try:
        time_ms = parse_time(text)
    except ValueError:
        return
    assert type(time_ms) is int


@settings(max_examples=300)
@given(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59),
    st.sampled_from(["T", "t"]),
    st.integers(min_value=0, max_value=9),
)
def test_any_rfc_3339_date_time_means_what_datetime_says(
    moment: datetime, offset_min: int, t: str, digits: int
) -> None:
    zone = timezone(timedelta(minutes=offset_min))
    local = moment.replace(tzinfo=zone)
    sign = "-" if offset_min < 0 else "+"
    offset = f"{sign}{abs(offset_min) // 60:02d}:{abs(offset_min) % 60:02d}"
    fraction = f"{local.microsecond:06d}000"[:digits]
    text = (
        f"{local.year:04d}-{local.month:02d}-{local.day:02d}{t}"
        f"{local.hour:02d}:{local.minute:02d}:{local.second:02d}"
        + (f".{fraction}" if digits else "")
        + offset
    )
    truncated = local.replace(microsecond=int((fraction + "000000")[:6]))
    expected = (truncated - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    assert parse_time(text) == expected


@given(st.integers(min_value=-62_135_596_800_000, max_value=253_402_300_799_999))
def test_format_time_round_trips_through_parse_time(time_ms: int) -> None:
    assert parse_time(format_time(time_ms)) == time_ms


@pytest.mark.parametrize("text", NOT_RFC_3339)
@pytest.mark.parametrize("expect", [None, GPU_SAMPLE_TYPE, TOKENS_TYPE])
def test_an_event_with_a_bad_time_is_rejected_with_a_reason(text: str, expect: str | None) -> None:
    doc = document()
    doc["time"] = text
    raw = orjson.dumps(doc)
    answer = decode_event(raw, expect)
    assert isinstance(answer, Rejected)
    assert answer == _decode_slowly(raw)
    assert answer.reason == "wrong_type"
    assert answer.detail.startswith("time: ")
    assert "\n" not in answer.detail and len(answer.detail) <= 200


def test_an_event_with_a_good_time_is_accepted() -> None:
    doc = document()
    doc["time"] = "2026-11-26t11:00:00.5+01:00"
    answer = decode_event(orjson.dumps(doc), TOKENS_TYPE)
    assert isinstance(answer, Ok)
    assert answer.event.time_ms == 1_795_687_200_500


@pytest.mark.parametrize("time_ms", [-62_135_596_800_001, 253_402_300_800_000, 10**20, -(10**20)])
def test_format_time_refuses_a_time_outside_the_years_1_to_9999(time_ms: int) -> None:
    with pytest.raises(ValueError):
        format_time(time_ms)

"""How much one report or export may cover and return, so that no request can exhaust the
process that serves it. A request past a limit is refused with a ConfigError naming the limit
(HTTP 400, exit 2), except chart buckets, which grow coarser instead."""

from __future__ import annotations

from typing import Any

from runtime.errors import ConfigError
from streams.store import ClickHouseStore

MAX_PERIOD_DAYS = 400  # a year and a month: a year-over-year comparison still fits
EARLIEST_MS = 0  # 1970-01-01T00:00:00Z: no window starts before the Unix epoch
LATEST_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z, well inside ClickHouse's DateTime
MAX_UNIX_MS_DIGITS = 13  # Unix ms up to LATEST_MS have 13 digits
MAX_RESULT_ROWS = 10_000  # lines of a report, pods of the tags report
MAX_SERIES_POINTS = 50_000  # (line, bucket) points behind a trend or a chart over time
MAX_SOURCE_ROWS = 200_000  # (hour, device, pod, labels) parts of one day of an export
MAX_HTTP_EXPORT_ROWS = 200_000  # FOCUS rows one HTTP answer holds (a file has no limit)
MAX_CHART_BUCKETS = 200  # bars of a chart over time; the bucket widens to stay under it


def query_bounded(
    store: ClickHouseStore, sql: str, *, limit: int, what: str, narrow: str
) -> list[tuple[Any, ...]]:
    """The rows of `sql`, read with LIMIT limit + 1 so that no more than that is ever built;
    more than `limit` rows is refused, saying what was counted and how to ask for less."""
    rows = store.query_rows(f"{sql} LIMIT {int(limit) + 1}")
    if len(rows) > limit:
        raise ConfigError(
            f"{what} has more than {limit:,} rows, the most one report returns; {narrow}"
        )
    return rows

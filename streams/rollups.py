"""Sealed hourly rollups of the cost tables, so reports over a month stay fast.

An hour is *sealed* once no correction can reach it any more (it ended more than the correction
retention ago, design §5): its rows are aggregated from the base tables read with FINAL, so
each key counts once with its latest version, and written to `gpu_cost_hourly` and
`token_cost_hourly`. The horizon (`rollup_horizon`) says up to where hours are sealed. Sealing
is idempotent: an hour sealed twice writes the same keys and values, and the rollups are read
with FINAL. Reports read rollups before the horizon and base rows after it
(`streams.reports.sources`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from streams.store import ClickHouseStore

HOUR_MS = 3_600_000
DEFAULT_RETENTION_S = 3600
HORIZON_NAME = "hourly"
_SEAL_CHUNK_HOURS = 24  # one INSERT ... SELECT per day of hours

COST_DIMENSIONS = (
    "cluster",
    "node",
    "device_uuid",
    "gpu_model",
    "mig_profile",
    "pricing",
    "price_per_hour",
    "namespace",
    "pod",
    "pod_uid",
    "team",
    "product",
    "cost_center",
    "kind",
)
TOKEN_DIMENSIONS = (
    "cluster",
    "namespace",
    "pod",
    "pod_uid",
    "team",
    "product",
    "cost_center",
    "model",
)


@dataclass(frozen=True, slots=True)
class SealResult:
    """Hours sealed by one call: [sealed_from_ms, sealed_until_ms), possibly empty."""

    sealed_from_ms: int
    sealed_until_ms: int

    @property
    def hours(self) -> int:
        return max(0, (self.sealed_until_ms - self.sealed_from_ms) // HOUR_MS)


def ms_literal(time_ms: int) -> str:
    """A DateTime64(3, 'UTC') literal; the value is an int, so nothing can be injected."""
    return f"fromUnixTimestamp64Milli(toInt64({int(time_ms)}), 'UTC')"


def floor_hour(time_ms: int) -> int:
    return time_ms - time_ms % HOUR_MS


def ceil_hour(time_ms: int) -> int:
    return -(-time_ms // HOUR_MS) * HOUR_MS


def read_horizon(store: ClickHouseStore) -> int | None:
    """Unix ms before which every hour is sealed, or None when nothing is."""
    rows = store.query_rows(
        f"SELECT sealed_until_ms FROM {store.database}.rollup_horizon FINAL "
        f"WHERE name = '{HORIZON_NAME}'"
    )
    return int(rows[0][0]) if rows else None


def _write_horizon(store: ClickHouseStore, sealed_until_ms: int) -> None:
    version = time.time_ns()
    store.command(
        f"INSERT INTO {store.database}.rollup_horizon (name, sealed_until_ms, version) "
        f"VALUES ('{HORIZON_NAME}', {int(sealed_until_ms)}, {version})"
    )


def cost_hourly_select(database: str, where: str) -> str:
    """Base cost rows aggregated per hour, with the rollup table's columns."""
    dims = ", ".join(COST_DIMENSIONS)
    window_s = "dateDiff('millisecond', window_start, window_end) / 1000.0"
    return (
        f"SELECT toStartOfHour(window_start) AS hour, {dims}, "
        f"sum(device_seconds) AS device_seconds, "
        f"sum(sm_util_avg * {window_s}) AS sm_pct_window_s, "
        f"sum({window_s}) AS window_s, "
        f"sum(cost_usd) AS cost_usd, sum(idle_cost_usd) AS idle_cost_usd, "
        f"count() AS windows "
        f"FROM {database}.gpu_cost_windows FINAL WHERE {where} GROUP BY hour, {dims}"
    )


def token_hourly_select(database: str, where: str) -> str:
    """Base cost-per-token rows aggregated per hour, with the rollup table's columns."""
    dims = ", ".join(TOKEN_DIMENSIONS)
    return (
        f"SELECT toStartOfHour(window_start) AS hour, {dims}, "
        f"sum(cost_usd) AS cost_usd, sum(prompt_tokens) AS prompt_tokens, "
        f"sum(completion_tokens) AS completion_tokens, sum(requests) AS requests, "
        f"sum(cached_tokens) AS cached_tokens, sum(prefill_s) AS prefill_s, "
        f"sum(decode_s) AS decode_s, count() AS windows "
        f"FROM {database}.cost_per_token_windows FINAL WHERE {where} GROUP BY hour, {dims}"
    )


def _earliest_window_ms(store: ClickHouseStore, since_ms: int = 0) -> int | None:
    """The earliest window start at or after `since_ms` in either base table, if any (an
    empty table has no earliest window: its `min` would read as 1970)."""
    db = store.database
    since = f"window_start >= {ms_literal(since_ms)} AND window_start > 0"
    rows = store.query_rows(
        f"SELECT (SELECT toUnixTimestamp64Milli(minOrNull(window_start)) "
        f"FROM {db}.gpu_cost_windows WHERE {since}), "
        f"(SELECT toUnixTimestamp64Milli(minOrNull(window_start)) "
        f"FROM {db}.cost_per_token_windows WHERE {since})"
    )
    found = [int(value) for value in (rows[0] if rows else ()) if value is not None]
    return min(found) if found else None


def seal_hours(
    store: ClickHouseStore, now_ms: int, *, retention_s: int = DEFAULT_RETENTION_S
) -> SealResult:
    """Seal every whole hour that ended at least `retention_s` before `now_ms` (event time of
    the stream, or the wall clock). Safe to call often and from a restarted process."""
    target = floor_hour(now_ms - retention_s * 1000)
    horizon = read_horizon(store)
    if horizon is None:
        earliest = _earliest_window_ms(store)
        if earliest is None:
            return SealResult(target, target)
        horizon = floor_hour(earliest)
    start = horizon
    db = store.database
    while horizon < target:
        data_from = _earliest_window_ms(store, since_ms=horizon)
        if data_from is None or data_from >= target:
            _write_horizon(store, target)  # nothing left to roll up below the target
            horizon = target
            break
        horizon = max(horizon, floor_hour(data_from))  # skip empty hours at once
        chunk_end = min(target, horizon + _SEAL_CHUNK_HOURS * HOUR_MS)
        where = f"window_start >= {ms_literal(horizon)} AND window_start < {ms_literal(chunk_end)}"
        store.command(f"INSERT INTO {db}.gpu_cost_hourly {cost_hourly_select(db, where)}")
        store.command(f"INSERT INTO {db}.token_cost_hourly {token_hourly_select(db, where)}")
        _write_horizon(store, chunk_end)
        horizon = chunk_end
    return SealResult(start, max(start, horizon))


def unseal_from(store: ClickHouseStore, from_ms: int) -> None:
    """Move the horizon back to the hour of `from_ms` and drop the rollups from there, for a
    backfill or re-pricing of already sealed hours; the next `seal_hours` rebuilds them."""
    horizon = read_horizon(store)
    hour = floor_hour(from_ms)
    if horizon is None or horizon <= hour:
        return
    _write_horizon(store, hour)
    db = store.database
    for table in ("gpu_cost_hourly", "token_cost_hourly"):
        store.command(
            f"ALTER TABLE {db}.{table} DELETE WHERE hour >= toDateTime({hour // 1000}, 'UTC') "
            f"SETTINGS mutations_sync = 1"
        )

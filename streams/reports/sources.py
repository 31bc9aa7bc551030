"""Where a report reads a period from: sealed hourly rollups before the horizon, base rows
(FINAL) for the rest. Both are shaped as hourly rows with the same columns, so every report
query is `SELECT ... FROM (<source>) GROUP BY ...` and gives the same numbers either way."""

from __future__ import annotations

from dataclasses import dataclass

from streams.rollups import (
    COST_DIMENSIONS,
    TOKEN_DIMENSIONS,
    ceil_hour,
    cost_hourly_select,
    floor_hour,
    ms_literal,
    read_horizon,
    token_hourly_select,
)
from streams.store import ClickHouseStore


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """[rollup_from_ms, rollup_to_ms) from the rollups (empty when equal); base_ranges_ms from
    the base tables."""

    rollup_from_ms: int
    rollup_to_ms: int
    base_ranges_ms: tuple[tuple[int, int], ...]


def plan_ranges(start_ms: int, end_ms: int, horizon_ms: int | None) -> ReadPlan:
    """Split [start, end) into whole sealed hours and the rest."""
    r_from = ceil_hour(start_ms)
    r_to = min(floor_hour(end_ms), horizon_ms if horizon_ms is not None else r_from)
    if horizon_ms is None or r_to <= r_from:
        return ReadPlan(start_ms, start_ms, ((start_ms, end_ms),) if end_ms > start_ms else ())
    base = tuple((a, b) for a, b in ((start_ms, r_from), (r_to, end_ms)) if b > a)
    return ReadPlan(r_from, r_to, base)


def read_plan(store: ClickHouseStore, start_ms: int, end_ms: int, *, use_rollups: bool) -> ReadPlan:
    horizon = read_horizon(store) if use_rollups else None
    return plan_ranges(start_ms, end_ms, horizon)


def _base_where(plan: ReadPlan) -> str | None:
    if not plan.base_ranges_ms:
        return None
    return " OR ".join(
        f"(window_start >= {ms_literal(a)} AND window_start < {ms_literal(b)})"
        for a, b in plan.base_ranges_ms
    )


def _rollup_where(plan: ReadPlan) -> str | None:
    if plan.rollup_to_ms <= plan.rollup_from_ms:
        return None
    return (
        f"hour >= toDateTime({plan.rollup_from_ms // 1000}, 'UTC') "
        f"AND hour < toDateTime({plan.rollup_to_ms // 1000}, 'UTC')"
    )


def _union(parts: list[str], empty: str) -> str:
    return "(" + (" UNION ALL ".join(parts) if parts else empty) + ")"


def cost_source(database: str, plan: ReadPlan) -> str:
    """A subquery of hourly cost rows: hour, the COST_DIMENSIONS, device_seconds,
    sm_pct_window_s, window_s, cost_usd, idle_cost_usd, windows, and metered_cost_usd (the
    same as cost_usd here; the billed basis's source has both)."""
    cols = (
        "hour, " + ", ".join(COST_DIMENSIONS) + ", device_seconds, sm_pct_window_s, window_s, "
        "cost_usd, idle_cost_usd, windows"
    )
    parts = []
    rollup = _rollup_where(plan)
    if rollup:
        parts.append(f"SELECT {cols} FROM {database}.gpu_cost_hourly FINAL WHERE {rollup}")
    base = _base_where(plan)
    if base:
        parts.append(f"SELECT {cols} FROM ({cost_hourly_select(database, base)})")
    empty = f"SELECT {cols} FROM {database}.gpu_cost_hourly WHERE 0"
    return f"(SELECT *, cost_usd AS metered_cost_usd FROM {_union(parts, empty)})"


def token_source(database: str, plan: ReadPlan) -> str:
    """A subquery of hourly cost-per-token rows: hour, the TOKEN_DIMENSIONS, cost_usd,
    prompt_tokens, completion_tokens, requests, cached_tokens, prefill_s, decode_s, windows."""
    cols = (
        "hour, " + ", ".join(TOKEN_DIMENSIONS) + ", cost_usd, prompt_tokens, completion_tokens, "
        "requests, cached_tokens, prefill_s, decode_s, windows"
    )
    parts = []
    rollup = _rollup_where(plan)
    if rollup:
        parts.append(f"SELECT {cols} FROM {database}.token_cost_hourly FINAL WHERE {rollup}")
    base = _base_where(plan)
    if base:
        parts.append(f"SELECT {cols} FROM ({token_hourly_select(database, base)})")
    empty = f"SELECT {cols} FROM {database}.token_cost_hourly WHERE 0"
    return _union(parts, empty)

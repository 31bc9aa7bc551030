"""Reading closed windows' checkpoints back (design §5): the stages emit them with their rows
(`WindowStateRow`, table `window_state`), the sinks write them, and this restores them when a
sample or token delta arrives for a window no longer (or not yet) in memory.

A checkpoint not yet written is still in the outbox: the write and the handling of input never
overlap (streams.worker.runner), so the outbox and the table together hold every checkpoint
emitted, and the outbox's is the newer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from runtime.errors import StoreError
from streams.rows import WindowStateRow
from streams.store import ClickHouseStore
from streams.worker.outbox import Outbox
from streams.worker.sinks import Backoff

log = logging.getLogger("gpuledger.worker")

T = TypeVar("T")
Key = tuple[int, str]  # (window start ms, unit)
UNITS_PER_QUERY = 2_000


def mark_rows(stage: str, marks: dict[str, int]) -> list[WindowStateRow]:
    """Marks a stage keeps beside its checkpoints, the highest value per unit winning: its
    replay floor per input partition ("floor@<stage>", unit "p"), how far it had read the
    pods topic ("pods@<stage>", unit "p/q": input partition p, pods partition q)."""
    return [WindowStateRow(stage, 0, unit, value, b"") for unit, value in sorted(marks.items())]


class Checkpoints:
    def __init__(self, store: ClickHouseStore, stopping: asyncio.Event) -> None:
        self.store = store
        self.stopping = stopping
        self.loaded = 0  # checkpoints restored from the table, for the benchmarks and tests

    async def set_ttl(self, horizon_s: float) -> None:
        """Keep checkpoints for the late horizon and an hour more after they were written
        (whole hourly parts go)."""
        ttl_s = int(horizon_s) + 3600
        sql = (
            f"ALTER TABLE {self.store.database}.window_state MODIFY TTL "
            f"written + INTERVAL {ttl_s} SECOND "
            "SETTINGS materialize_ttl_after_modify = 0"
        )
        await self._retrying(lambda: self.store.command(sql))

    async def frontier_ms(self, stage: str) -> int | None:
        """The start of the latest window of `stage` with a checkpoint, if any; None also when
        stopped while ClickHouse was unreachable."""
        sql = (
            "SELECT toUnixTimestamp64Milli(maxOrNull(window_start)) "
            f"FROM {self.store.database}.window_state WHERE stage = {{stage:String}}"
        )
        rows = await self._retrying(lambda: self.store.query_rows(sql, {"stage": stage}))
        if not rows or rows[0][0] is None:
            return None
        return int(rows[0][0])

    async def marks(self, stage: str) -> dict[str, int] | None:
        """The latest mark of `stage` per unit (`mark_rows`); None if stopped."""
        sql = (
            "SELECT unit, max(version) "
            f"FROM {self.store.database}.window_state WHERE stage = {{stage:String}} GROUP BY unit"
        )
        rows = await self._retrying(lambda: self.store.query_rows(sql, {"stage": stage}))
        if rows is None:
            return None
        return {str(unit): int(version) for unit, version in rows}

    async def load_touching(
        self, stage: str, since_ms: int, sources: set[int], uids: set[str]
    ) -> dict[Key, tuple[int, bytes]] | None:
        """The latest checkpoint, with its source partition, of each window of `stage` from
        `since_ms` on, fed by `sources`, whose rows name one of `uids`; None if stopped."""
        found: dict[Key, tuple[int, bytes]] = {}
        if not sources or not uids:
            return found
        names = sorted(uids)
        for i in range(0, len(names), UNITS_PER_QUERY):
            call = functools.partial(
                self._query_touching, stage, since_ms, sources, names[i : i + UNITS_PER_QUERY]
            )
            rows = await self._retrying(call)
            if rows is None:
                return None
            for start, unit, source, state in rows:
                found[(int(start), str(unit))] = (int(source), bytes.fromhex(state))
        self.loaded += len(found)
        return found

    def _query_touching(
        self, stage: str, since_ms: int, sources: set[int], uids: list[str]
    ) -> list[tuple[Any, ...]]:
        sql = (
            "SELECT toUnixTimestamp64Milli(window_start), unit, argMax(source, version), "
            "hex(argMax(state, version)) "
            f"FROM {self.store.database}.window_state "
            "WHERE stage = {stage:String} "
            "AND window_start >= fromUnixTimestamp64Milli({since:Int64}) "
            "AND source IN {sources:Array(Int32)} AND hasAny(owners, {uids:Array(String)}) "
            "GROUP BY window_start, unit"
        )
        parameters = {"stage": stage, "since": since_ms, "sources": sorted(sources), "uids": uids}
        return self.store.query_rows(sql, parameters)

    async def load(self, stage: str, keys: set[Key], outbox: Outbox) -> dict[Key, bytes] | None:
        """The latest checkpoint of each of `keys` that has one (the outbox's first); None if
        stopped while ClickHouse was unreachable."""
        found: dict[Key, bytes] = {}
        rest: list[Key] = []
        for key in keys:
            pending = outbox.states.get((stage, *key))
            if pending is not None:
                found[key] = pending
            else:
                rest.append(key)
        rest.sort(key=lambda k: k[1])
        for i in range(0, len(rest), UNITS_PER_QUERY):
            chunk = rest[i : i + UNITS_PER_QUERY]
            rows = await self._retrying(functools.partial(self._query, stage, chunk))
            if rows is None:
                return None
            wanted = set(chunk)
            for start, unit, state in rows:
                key = (int(start), str(unit))
                if key in wanted:
                    found[key] = bytes.fromhex(state)
                    self.loaded += 1
        return found

    def _query(self, stage: str, keys: list[Key]) -> list[tuple[Any, ...]]:
        sql = (
            "SELECT toUnixTimestamp64Milli(window_start), unit, hex(argMax(state, version)) "
            f"FROM {self.store.database}.window_state "
            "WHERE stage = {stage:String} AND unit IN {units:Array(String)} "
            "AND toUnixTimestamp64Milli(window_start) IN {starts:Array(Int64)} "
            "GROUP BY window_start, unit"
        )
        parameters = {
            "stage": stage,
            "units": sorted({unit for _, unit in keys}),
            "starts": sorted({start for start, _ in keys}),
        }
        return self.store.query_rows(sql, parameters)

    async def _retrying(self, call: Callable[[], T]) -> T | None:
        """`call` in a thread, retried with the sinks' backoff while ClickHouse is unreachable
        (None once stopping); a permanent error is raised."""
        backoff = Backoff(self.stopping)
        while True:
            try:
                return await asyncio.to_thread(call)
            except StoreError as exc:
                if not exc.retriable:
                    raise
                log.warning(
                    "reading window checkpoints failed, retrying in %.1f s: %s",
                    backoff.delay_s,
                    exc,
                )
            if not await backoff.wait():
                return None

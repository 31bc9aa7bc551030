"""What both stages' handlers do with checkpoints (design §5), in one place: on assignment,
read how far the last owners got (the latest checkpointed window, the replay floors, the pods
positions) and restore the retained windows that pod events changed meanwhile; per batch,
restore the closed windows its records correct; per poll, write the marks a restart reads.

The stages stay pure (streams.worker.device_stage, pod_stage); this is their I/O edge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from streams.rows import WindowStateRow
from streams.worker.checkpoints import Checkpoints, Key, mark_rows
from streams.worker.device_stage import StreamSettings
from streams.worker.outbox import Outbox
from streams.worker.watermark import Partition

log = logging.getLogger("gpuledger.worker")


class PodTracker(Protocol):
    """How far the pods topic has been used, and which pods changed since a position
    (streams.worker.tables.PodsTable)."""

    handled: dict[int, int]

    def changed_since(self, positions: dict[int, int]) -> set[str]: ...


class RestorableStage(Protocol):
    """What `DeviceStage` and `PodStage` both offer for restoring windows."""

    @property
    def settings(self) -> StreamSettings: ...

    def raise_lookup_floor(self, end_ms: int | None) -> None: ...

    def set_replay_floor(self, partition: Partition, floor_ms: int) -> None: ...

    def restore(
        self, partition: Partition, keys: set[Key], found: dict[Key, bytes]
    ) -> list[Key]: ...

    def recheck(self, keys: Iterable[Key]) -> None: ...


class Restorer:
    """Checkpoints for one stage (`name`: "device" or "pod"). `partitions_of(p)` are the
    input partitions numbered p the stage reads (stage two reads two co-partitioned topics)."""

    def __init__(
        self,
        name: str,
        stage: RestorableStage,
        checkpoints: Checkpoints,
        partitions_of: Callable[[int], list[Partition]],
        *,
        pods: PodTracker | None = None,
        restored: Callable[[int], None] = lambda count: None,
    ) -> None:
        self.name = name
        self.stage = stage
        self.checkpoints = checkpoints
        self.partitions_of = partitions_of
        self.pods = pods
        self.restored = restored  # a metrics hook
        self.owned: list[int] = []
        self.due = True  # an assignment not yet prepared for
        self._floor_at_poll: int | None = None  # the stage's replay floor at the last poll
        self._floor_committed: int | None = None  # ... at the last commit
        self._floor_written: int | None = None
        self._pods_written: dict[int, int] = {}

    @property
    def floor_mark(self) -> str:
        return f"floor@{self.name}"

    @property
    def pods_mark(self) -> str:
        return f"pods@{self.name}"

    def assigned(self, numbers: Iterable[int]) -> None:
        self.owned = sorted(set(numbers))
        self.due = True
        self._floor_written = None
        self._pods_written = {}

    async def prepare(self) -> bool:
        """What newly owned partitions need before their records (False if stopped): the
        lookup floor, their replay floors, and the windows pod events changed meanwhile."""
        if not self.due:
            return True
        checkpoints = self.checkpoints
        latest = await checkpoints.frontier_ms(self.name)
        floors = await checkpoints.marks(self.floor_mark)
        if floors is None or checkpoints.stopping.is_set():
            return False
        window_ms = self.stage.settings.window_ms
        if latest is not None:
            self.stage.raise_lookup_floor(latest + window_ms)
        for number in self.owned:
            if str(number) in floors:
                for partition in self.partitions_of(number):
                    self.stage.set_replay_floor(partition, floors[str(number)])
        if latest is not None and not await self._recheck(latest):
            return False
        self.due = False
        return True

    async def _recheck(self, latest_start_ms: int) -> bool:
        """Restore the retained windows of the owned partitions naming a pod with an event
        past the pods position their last owner wrote, and re-emit those it changed."""
        if self.pods is None:
            return True
        marks = await self.checkpoints.marks(self.pods_mark)
        if marks is None:
            return False
        settings = self.stage.settings
        since = latest_start_ms - settings.retention_ms - settings.window_ms
        keys: set[Key] = set()
        for number in self.owned:
            uids = self.pods.changed_since(_positions(marks, number))
            found = await self.checkpoints.load_touching(self.name, since, {number}, uids)
            if found is None:
                return False
            [partition, *_] = self.partitions_of(number)
            self.stage.restore(partition, set(found), {k: blob for k, (_, blob) in found.items()})
            keys |= set(found)
        if keys:
            self.restored(len(keys))
            log.info("%s stage: %d closed windows restored for pod changes", self.name, len(keys))
        self.stage.recheck(keys)
        return True

    async def load(self, partition: Partition, keys: set[Key], outbox: Outbox) -> bool:
        """Restore the closed windows `keys` that records of `partition` correct (the outbox's
        pending checkpoints first); False if stopped while ClickHouse was unreachable."""
        if not keys:
            return True
        found = await self.checkpoints.load(self.name, keys, outbox)
        if found is None:
            return False
        self.restored(len(found))
        for start, unit in self.stage.restore(partition, keys, found):
            log.error(
                "the checkpoint of window %d of %s %s does not decode: taken as a new window",
                start,
                self.name,
                unit,
            )
        return True

    def marks(self, floor: int | None) -> list[WindowStateRow]:
        """At a poll: the rows that record, beside the checkpoints of this write, the replay
        floor of the last commit (one commit late: a write whose commit is lost must not leave
        a floor above what the records after the commit in force first met) and how far the
        pods topic had been used (every retained window emitted by now has seen that)."""
        self._floor_at_poll = floor
        rows: list[WindowStateRow] = []
        committed = self._floor_committed
        if committed is not None and committed != self._floor_written:
            rows += mark_rows(self.floor_mark, {str(n): committed for n in self.owned})
            self._floor_written = committed
        if self.pods is not None and self.pods.handled != self._pods_written:
            self._pods_written = dict(self.pods.handled)
            for n in self.owned:
                rows += mark_rows(
                    self.pods_mark, {f"{n}/{q}": at for q, at in self._pods_written.items()}
                )
        return rows

    def committed(self) -> None:
        self._floor_committed = self._floor_at_poll


def _positions(marks: dict[str, int], number: int) -> dict[int, int]:
    """The pods-topic positions (by pods partition) written for input partition `number`."""
    positions = {}
    for unit, offset in marks.items():
        p, _, q = unit.partition("/")
        if p == str(number) and q.isdigit():
            positions[int(q)] = offset
    return positions

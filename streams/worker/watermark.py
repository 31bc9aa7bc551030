"""Event-time watermarks and commit positions, per input partition (design §5).

As in Flink, the watermark is the minimum over the input partitions that carry data of the
latest event time each has shown; a partition silent (by wall clock) for `idle_after_s` stops
holding the others back. It never goes backwards, per partition or overall: a partition that
speaks again after a silence, behind the others, does not step it back (what closed stays
closed), and the stages observe only the times of events they accepted. Commit positions
(`HeldOffsets`) follow the earliest offset still needed to rebuild the state a restart would
lose.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

Partition = tuple[str, int]  # (topic, partition)


@dataclass
class _PartitionClock:
    max_time_ms: int
    last_seen_wall_s: float


class Watermark:
    """Tracks the latest event time per partition; `value()` is the stream's watermark."""

    def __init__(self, idle_after_s: float) -> None:
        self.idle_after_s = idle_after_s
        self._clocks: dict[Partition, _PartitionClock] = {}
        self._floor: int | None = None  # the highest value returned: it never goes back

    def observe(self, partition: Partition, time_ms: int, now_s: float) -> None:
        clock = self._clocks.get(partition)
        if clock is None:
            self._clocks[partition] = _PartitionClock(time_ms, now_s)
        else:
            clock.max_time_ms = max(clock.max_time_ms, time_ms)
            clock.last_seen_wall_s = now_s

    def value(self, now_s: float) -> int | None:
        """Minimum over active partitions; None before any data. When every partition is idle
        the maximum is taken, so a quiet stream still closes what it has. Never less than a
        value returned before (until every partition is forgotten)."""
        if not self._clocks:
            return self._floor
        active = [
            c.max_time_ms
            for c in self._clocks.values()
            if now_s - c.last_seen_wall_s < self.idle_after_s
        ]
        value = min(active) if active else max(c.max_time_ms for c in self._clocks.values())
        if self._floor is None or value > self._floor:
            self._floor = value
        return self._floor

    def all_idle(self, now_s: float) -> bool:
        return bool(self._clocks) and all(
            now_s - c.last_seen_wall_s >= self.idle_after_s for c in self._clocks.values()
        )

    def forget(self, partitions: set[Partition]) -> None:
        """Drop lost partitions' clocks. Once none is left the stage holds no state the
        watermark guarded, and the next owner's replay starts it again from its data."""
        for p in partitions:
            self._clocks.pop(p, None)
        if not self._clocks:
            self._floor = None


class HeldOffsets:
    """What a restart must replay, per input partition: the commit positions of one stage.

    A stage's state is made of units (a (window, device) or (window, pod) slot) grouped by
    window start. Each unit keeps, in a dict of its own, the earliest offset per partition it
    was fed from; this type keeps the same per window (the minimum over the window's units)
    and the next offset to read. The commit position of a partition is the smallest offset any
    window still holds there, or the next offset to read when nothing is held: committing it
    loses nothing a crash would, since replaying from it rebuilds every open or retained window.
    """

    def __init__(self) -> None:
        self._next: dict[Partition, int] = {}
        self._windows: dict[int, dict[Partition, int]] = {}

    def consumed(self, partition: Partition, offset: int) -> None:
        """`offset` was read (used, rejected or dead-lettered): the position moves past it."""
        if offset + 1 > self._next.get(partition, -1):
            self._next[partition] = offset + 1

    def hold(
        self, window: int, unit: dict[Partition, int], partition: Partition, offset: int
    ) -> None:
        """`unit` of `window` was fed `offset` of `partition`: keep the earliest, in both."""
        current = unit.get(partition)
        if current is not None and current <= offset:
            return  # the window holds at most what its unit holds: nothing changes there either
        unit[partition] = offset
        held = self._windows.get(window)
        if held is None:
            self._windows[window] = {partition: offset}
            return
        current = held.get(partition)
        if current is None or offset < current:
            held[partition] = offset

    def last_read(self, partition: Partition) -> int | None:
        """The highest offset read from `partition`, if any."""
        next_ = self._next.get(partition)
        return None if next_ is None else next_ - 1

    def rebuild(self, window: int, units: Iterable[dict[Partition, int]]) -> None:
        """`window` lost a unit (dropped, not expired): its holds become those of `units`, the
        units it still has; with none left it holds nothing."""
        held: dict[Partition, int] = {}
        for unit in units:
            for partition, offset in unit.items():
                current = held.get(partition)
                if current is None or offset < current:
                    held[partition] = offset
        if held:
            self._windows[window] = held
        else:
            self._windows.pop(window, None)

    def windows(self) -> list[int]:
        """Starts of the windows that hold offsets."""
        return list(self._windows)

    def release(self, window: int) -> None:
        """`window` expired with all its units: it holds nothing any more."""
        self._windows.pop(window, None)

    def positions(self) -> dict[Partition, int]:
        """Commit position per partition read so far (see the class)."""
        held: dict[Partition, int] = {}
        for by_partition in self._windows.values():
            for partition, offset in by_partition.items():
                current = held.get(partition)
                if current is None or offset < current:
                    held[partition] = offset
        return {p: min(next_, held.get(p, next_)) for p, next_ in self._next.items()}

    def revoke(
        self, lost: set[Partition], kept: Iterable[tuple[int, dict[Partition, int]]]
    ) -> None:
        """Forget the partitions this worker lost. `kept` are the (window, unit holds) the
        stage kept; each window's holds are rebuilt from them, since a dropped unit may have
        held a partition this worker keeps too."""
        self._windows = {}
        for window, unit in kept:
            held = self._windows.setdefault(window, {})
            for partition, offset in unit.items():
                current = held.get(partition)
                if current is None or offset < current:
                    held[partition] = offset
        for partition in lost:
            self._next.pop(partition, None)

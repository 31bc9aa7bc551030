"""Event-time watermarks and commit positions, per input partition (design §5).

As in Flink, the watermark is the minimum over the input partitions that carry data of the
latest event time each has shown; a partition silent (by wall clock) for `idle_after_s` stops
holding the others back. Commit positions follow the earliest offset still needed to rebuild
the state a restart would lose.
"""

from __future__ import annotations

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

    def observe(self, partition: Partition, time_ms: int, now_s: float) -> None:
        clock = self._clocks.get(partition)
        if clock is None:
            self._clocks[partition] = _PartitionClock(time_ms, now_s)
        else:
            clock.max_time_ms = max(clock.max_time_ms, time_ms)
            clock.last_seen_wall_s = now_s

    def value(self, now_s: float) -> int | None:
        """Minimum over active partitions; None before any data. When every partition is idle
        the maximum is returned, so a quiet stream still closes what it has."""
        if not self._clocks:
            return None
        active = [
            c.max_time_ms
            for c in self._clocks.values()
            if now_s - c.last_seen_wall_s < self.idle_after_s
        ]
        if active:
            return min(active)
        return max(c.max_time_ms for c in self._clocks.values())

    def all_idle(self, now_s: float) -> bool:
        return bool(self._clocks) and all(
            now_s - c.last_seen_wall_s >= self.idle_after_s for c in self._clocks.values()
        )

    def forget(self, partitions: set[Partition]) -> None:
        for p in partitions:
            self._clocks.pop(p, None)


class OffsetTracker:
    """Next offset to read per partition, and the earliest offset each held unit still needs.

    A unit is anything whose inputs must be replayed after a crash (an open or retained
    window). The commit position of a partition is the smallest offset any unit holds there,
    or the next offset to read when nothing is held."""

    def __init__(self) -> None:
        self._next: dict[Partition, int] = {}

    def consumed(self, partition: Partition, offset: int) -> None:
        if offset + 1 > self._next.get(partition, -1):
            self._next[partition] = offset + 1

    def positions(self, held: dict[Partition, int]) -> dict[Partition, int]:
        out = {}
        for partition, next_offset in self._next.items():
            out[partition] = min(next_offset, held.get(partition, next_offset))
        return out

    def forget(self, partitions: set[Partition]) -> None:
        for p in partitions:
            self._next.pop(p, None)


def hold(held: dict[Partition, int], partition: Partition, offset: int) -> None:
    """Record that `offset` of `partition` is still needed (keeps the minimum)."""
    current = held.get(partition)
    if current is None or offset < current:
        held[partition] = offset

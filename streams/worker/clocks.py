"""Event times judged against the worker's clock and the Kafka record timestamp (design §5)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import ConsumerRecord

from schemas.events import (
    CloudEvent,
    GpuSample,
)
from streams.worker.intake import CLOCK_SKEW, Intake, moment
from streams.worker.outbox import Outbox

log = logging.getLogger("gpuledger.worker")

# Event times outside these are no clock's reading: refused whatever the skew allows.
EARLIEST_EVENT_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
LATEST_EVENT_MS = 7_258_118_400_000  # 2200-01-01T00:00:00Z
LOG_APPEND_TIME = 1  # ConsumerRecord.timestamp_type when the broker stamped the record


class ClockCheck:
    """Event times against the worker's clock and the Kafka record timestamp (design §5).

    An event stamped more than `max_skew_s` ahead of the worker's clock is refused, unless its
    record timestamp is the broker's (`message.timestamp.type=LogAppendTime`) and the event is
    not that far ahead of it either: a producer's timestamp (CreateTime) comes from the same
    clock as the event, so it vouches for nothing. Times before 2000 or after 2200 are refused
    whatever the skew. A refused event is dead-lettered as `clock_skew` and never reaches a
    stage, so it moves no clock. With `offsets`, each event's offset from its record timestamp
    is exported per source (`gpuledger_clock_offset_seconds`): not for pod events, which carry
    the pod's creation time from the Kubernetes API, not a reading of the sender's clock."""

    def __init__(self, intake: Intake, max_skew_s: float, *, offsets: bool = True) -> None:
        self.intake = intake
        self.metrics = intake.metrics
        self.max_skew_s = max_skew_s
        self.skew_ms = max_skew_s * 1000
        self.offsets = offsets

    def latest_ms(self, now_s: float) -> float:
        """Event times up to this pass without looking at the record."""
        return min(now_s * 1000 + self.skew_ms, LATEST_EVENT_MS)

    def _broker_vouches(self, msg: ConsumerRecord, time_ms: int) -> bool:
        return (
            msg.timestamp_type == LOG_APPEND_TIME
            and msg.timestamp >= 0
            and EARLIEST_EVENT_MS <= time_ms <= LATEST_EVENT_MS
            and time_ms <= msg.timestamp + self.skew_ms
        )

    def check(
        self, msg: ConsumerRecord, event: CloudEvent[Any], now_s: float, outbox: Outbox
    ) -> bool:
        """One event: True if its time is sane, else it is dead-lettered."""
        time_ms = event.time_ms
        if self.offsets and msg.timestamp >= 0:
            self.metrics.clock_offset(event.source, (time_ms - msg.timestamp) / 1000, now_s)
        if EARLIEST_EVENT_MS <= time_ms <= self.latest_ms(now_s) or self._broker_vouches(
            msg, time_ms
        ):
            return True
        self.refuse(msg, event, now_s, outbox)
        return False

    def sort(
        self,
        records: Sequence[ConsumerRecord],
        events: list[CloudEvent[GpuSample]],
        indices: list[int],
        now_s: float,
        outbox: Outbox,
    ) -> tuple[list[CloudEvent[GpuSample]], list[ConsumerRecord]]:
        """A batch's decoded samples (from `records[indices[i]]`): those whose time is sane
        and their records; the others are dead-lettered."""
        latest = self.latest_ms(now_s)
        offsets: dict[str, int] = {}
        kept_events: list[CloudEvent[GpuSample]] = []
        kept: list[ConsumerRecord] = []
        for event, index in zip(events, indices, strict=True):
            msg = records[index]
            time_ms = event.time_ms
            if msg.timestamp >= 0:
                offsets[event.source] = time_ms - msg.timestamp  # the source's latest
            if EARLIEST_EVENT_MS <= time_ms <= latest or self._broker_vouches(msg, time_ms):
                kept_events.append(event)
                kept.append(msg)
            else:
                self.refuse(msg, event, now_s, outbox)
        for source, offset_ms in offsets.items():
            self.metrics.clock_offset(source, offset_ms / 1000, now_s)
        return kept_events, kept

    def refuse(
        self, msg: ConsumerRecord, event: CloudEvent[Any], now_s: float, outbox: Outbox
    ) -> None:
        self.metrics.clock_skewed(msg.topic, event.source)
        self.intake.reject(msg, outbox, CLOCK_SKEW, self.detail(msg, event.time_ms, now_s))

    def detail(self, msg: ConsumerRecord, time_ms: int, now_s: float) -> str:
        now_ms = int(now_s * 1000)
        record_ms = msg.timestamp if msg.timestamp >= 0 else None
        if time_ms < EARLIEST_EVENT_MS:
            why = "is before 2000-01-01"
        elif time_ms > LATEST_EVENT_MS:
            why = "is after 2200-01-01"
        else:
            why = f"is {(time_ms - now_ms) / 1000:.0f} s ahead of the worker's clock"
            if record_ms is not None:
                why += f" and {(time_ms - record_ms) / 1000:.0f} s ahead of its record timestamp"
            why += f" (at most {self.max_skew_s:g} s is accepted)"
        stamp = "the broker's" if msg.timestamp_type == LOG_APPEND_TIME else "the producer's"
        return (
            f"event time {moment(time_ms)} {why}; record time {moment(record_ms)} ({stamp}), "
            f"worker time {moment(now_ms)}"
        )

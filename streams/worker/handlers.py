"""What the worker does with each record: decode it, dead-letter what is unusable, count it in
the metrics, and feed the rest to a stage; and what it does with a stage's output.

`DeviceHandler` and `TokenCostHandler` are the `Stage`s the runners drive
(streams.worker.runner); `PodHandler` feeds pod metadata, which every worker reads whole, to
both stages. They share an `Intake`: the decoding, dead letters and counters; each checks
event times with a `ClockCheck` (design §5).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import ConsumerRecord, TopicPartition

from schemas.events import (
    COST_WINDOWS_TOPIC,
    DEAD_LETTER_TOPIC,
    GPU_SAMPLES_TOPIC,
    POD_TYPE,
    TOKEN_COST_WINDOWS_TOPIC,
    TOKENS_TYPE,
    CloudEvent,
    Decoded,
    GpuSample,
    Ok,
    Rejected,
    decode_event,
    decode_samples,
    format_time,
)
from streams.labels import PodHistory
from streams.metrics import WorkerMetrics
from streams.rows import CostRow, TokenCostRow
from streams.worker.device_stage import DUPLICATE, LATE, TOO_LATE, DeviceStage, Unemittable
from streams.worker.pod_stage import (
    MARKER_ALL_IDLE_MS,
    InvalidInternal,
    PodStage,
    decode_internal,
    encode_marker,
)
from streams.worker.sinks import (
    Message,
    Outbox,
    dead_letter_key,
    dead_letter_message,
    row_message,
)
from streams.worker.watermark import HeldOffsets, Partition

log = logging.getLogger("gpuledger.worker")

TOO_LATE_DETAIL = "event time is older than the retention"
CLOCK_SKEW = "clock_skew"
UNEMITTABLE = "unemittable"
# Event times outside these are no clock's reading: refused whatever the skew allows.
EARLIEST_EVENT_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
LATEST_EVENT_MS = 7_258_118_400_000  # 2200-01-01T00:00:00Z
LOG_APPEND_TIME = 1  # ConsumerRecord.timestamp_type when the broker stamped the record


def moment(time_ms: int | None) -> str:
    """A time for a detail text; one that is no date says so instead of raising."""
    if time_ms is None:
        return "none"
    try:
        return format_time(time_ms)
    except (ValueError, OverflowError, OSError):
        return f"{time_ms} ms since 1970 (not a date)"


@dataclass
class DeadLetterLog:
    """Keys already in the dead-letter topic, so a replay does not write a record twice."""

    seen: set[bytes] = field(default_factory=set)

    def add(self, outbox: Outbox, msg: ConsumerRecord, reason: str, detail: str) -> bool:
        key = dead_letter_key(msg.topic, msg.partition, msg.offset)
        if key in self.seen:
            return False
        self.seen.add(key)
        outbox.messages.append(
            dead_letter_message(
                msg.topic,
                msg.partition,
                msg.offset,
                msg.key,
                msg.value,
                reason,
                detail,
                time.time(),
            )
        )
        return True

    def add_window(
        self,
        outbox: Outbox,
        partition: Partition,
        first: int,
        last: int | None,
        window: str,
        reason: str,
        detail: str,
    ) -> bool:
        """A letter for a window's inputs on one partition, offsets `first` to `last` (their
        bytes stay in the input topic); keyed by the window too, so a replay writes it once."""
        topic, number = partition
        key = dead_letter_key(topic, number, first) + b"|window|" + window.encode()
        if key in self.seen:
            return False
        self.seen.add(key)
        _, _, body, _ = dead_letter_message(
            topic, number, first, None, None, reason, detail, time.time()
        )
        doc = orjson.loads(body)
        doc["last_offset"] = last
        doc["window"] = window
        outbox.messages.append((DEAD_LETTER_TOPIC, key, orjson.dumps(doc), key))
        return True


class Intake:
    """Decoding, dead letters and input counters, shared by every handler."""

    def __init__(self, metrics: WorkerMetrics, dead_letters: DeadLetterLog) -> None:
        self.metrics = metrics
        self.dead_letters = dead_letters

    def reject(self, msg: ConsumerRecord, outbox: Outbox, reason: str, detail: str) -> None:
        self.metrics.event_rejected(msg.topic, reason)
        if self.dead_letters.add(outbox, msg, reason, detail):
            self.metrics.dead_lettered(msg.topic, reason)

    def decode(self, msg: ConsumerRecord, expected_type: str, outbox: Outbox) -> Ok | None:  # type: ignore[type-arg]
        decoded = decode_event(msg.value)
        if isinstance(decoded, Ok) and decoded.event.type == expected_type:
            return decoded
        self.reject_decoded(msg, decoded, outbox)
        return None

    def reject_decoded(self, msg: ConsumerRecord, decoded: Decoded, outbox: Outbox) -> None:
        """Dead-letter a record that did not decode, or decoded to another topic's type."""
        if isinstance(decoded, Rejected):
            self.reject(msg, outbox, decoded.reason, decoded.detail)
        else:
            kind = decoded.event.type
            self.reject(msg, outbox, "wrong_topic", f"{kind} does not belong on {msg.topic}")

    def reject_window(
        self, outbox: Outbox, failed: Unemittable, held: HeldOffsets, what: str
    ) -> None:
        """Dead-letter the inputs of a window whose rows cannot be emitted (the stage dropped
        it and released its offsets): one letter per input partition it held."""
        window = f"{failed.window_start_ms}|{failed.unit}"
        log.warning(
            "%s %s, window %s: rows cannot be emitted, inputs dead-lettered: %s",
            what,
            failed.unit,
            moment(failed.window_start_ms),
            failed.error,
        )
        for partition, first in sorted(failed.held.items()):
            last = held.last_read(partition)
            detail = (
                f"the rows of {what} {failed.unit} in the window starting "
                f"{moment(failed.window_start_ms)} cannot be emitted ({failed.error}); its "
                f"inputs are among offsets {first} to {last} of {partition[0]} partition "
                f"{partition[1]}"
            )
            self.metrics.event_rejected(partition[0], UNEMITTABLE)
            if self.dead_letters.add_window(
                outbox, partition, first, last, window, UNEMITTABLE, detail
            ):
                self.metrics.dead_lettered(partition[0], UNEMITTABLE)

    def count(self, status: str, msg: ConsumerRecord, outbox: Outbox) -> None:
        """Count one event by what the stage made of it (a too-late one is dead-lettered)."""
        if status == DUPLICATE:
            self.metrics.events_duplicate(msg.topic)
        elif status == TOO_LATE:
            self.reject(msg, outbox, "too_late", TOO_LATE_DETAIL)
        else:
            self.metrics.events_used(msg.topic)
            if status == LATE:
                self.metrics.events_late(msg.topic)


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


class DeviceHandler:
    """Stage one's `Stage`: GPU samples in; cost rows, pod-cost partials and markers out."""

    def __init__(
        self,
        devices: DeviceStage,
        intake: Intake,
        internal_topic: str,
        *,
        sample_partitions: int,
        internal_partitions: int,
    ) -> None:
        self.devices = devices
        self.intake = intake
        self.metrics = intake.metrics
        self.internal_topic = internal_topic
        self.sample_partitions = sample_partitions
        self.internal_partitions = internal_partitions
        self.window_s = devices.settings.allocation.window_s
        self.clock = ClockCheck(intake, devices.settings.max_clock_skew_s)
        self._owned: list[int] = []  # sample partitions this worker owns
        self._markers_sent: dict[int, int] = {}
        self._idle_since_s: float | None = None

    def assigned(self, partitions: set[Partition]) -> None:
        self._owned = sorted(p for topic, p in partitions if topic == GPU_SAMPLES_TOPIC)

    def handle(
        self, tp: TopicPartition, records: list[ConsumerRecord], now_s: float, outbox: Outbox
    ) -> None:
        """Decode a batch of one partition, dead-letter what is unusable, fold in the rest."""
        if not records:
            return
        partition = (tp.topic, tp.partition)
        events, indices, others = decode_samples([msg.value for msg in records])
        for index, decoded in others.items():
            self.intake.reject_decoded(records[index], decoded, outbox)
        self.devices.skip(partition, records[-1].offset)
        events, kept = self.clock.sort(records, events, indices, now_s, outbox)
        counts = self.devices.add_samples(partition, [msg.offset for msg in kept], events, now_s)
        topic = tp.topic
        if counts.ok or counts.late:
            self.metrics.events_used(topic, counts.ok + counts.late)
        if counts.late:
            self.metrics.events_late(topic, counts.late)
        if counts.duplicates:
            self.metrics.events_duplicate(topic, counts.duplicates)
        for index in counts.too_late:
            self.intake.reject(kept[index], outbox, "too_late", TOO_LATE_DETAIL)
        for model in counts.unknown_models:
            self.metrics.unknown_gpu_model(model)

    def poll(self, now_s: float, drain: bool, outbox: Outbox) -> None:
        if drain:
            now_s += self.devices.settings.idle_flush_s + 1
        out = self.devices.poll(now_s)
        failed = list(out.unemittable)
        broken: dict[tuple[int, str], str] = {}  # (window, device) -> why it did not encode
        rows: list[tuple[CostRow, Message]] = []
        for row in out.rows:
            try:
                rows.append((row, row_message(COST_WINDOWS_TOPIC, row, row.device_uuid.encode())))
            except Exception as exc:  # a window that cannot be written must not stop the stage
                broken.setdefault((row.window_start_ms, row.device_uuid), repr(exc))
        partials: list[tuple[tuple[int, str], Message]] = []
        for partial in out.partials:
            key = (partial.window_start_ms, partial.device_uuid)
            route = partial.pod_uid.encode()
            try:
                partials.append((key, (self.internal_topic, route, partial.encode(), route)))
            except Exception as exc:
                broken.setdefault(key, repr(exc))
        if broken:
            rows = [(r, m) for r, m in rows if (r.window_start_ms, r.device_uuid) not in broken]
            partials = [(k, m) for k, m in partials if k not in broken]
            for (start, device), error in broken.items():
                failed.append(
                    Unemittable(start, device, self.devices.discard(start, device), error)
                )
        for row, message in rows:
            outbox.rows.append(row)
            outbox.messages.append(message)
        outbox.messages += [message for _, message in partials]
        for window in failed:
            self.intake.reject_window(outbox, window, self.devices.held, "device")
        if rows:
            self.metrics.rows_emitted([row for row, _ in rows], self.window_s, time.time())
        self.metrics.windows_open(self.devices.open_windows)
        self._send_markers(now_s, drain, outbox)

    def positions(self) -> dict[Partition, int]:
        return self.devices.held.positions()

    def revoke(self, partitions: set[Partition]) -> None:
        self.intake.metrics.devices_revoked(self.devices.revoke(partitions))
        lost = {p for topic, p in partitions if topic == GPU_SAMPLES_TOPIC}
        self._owned = [p for p in self._owned if p not in lost]

    def _send_markers(self, now_s: float, drain: bool, outbox: Outbox) -> None:
        """Tell stage two, on every internal partition, how far each owned sample partition
        has emitted. A worker with no sample data says so once it has been idle a while."""
        owned = self._owned
        if not owned or not self.sample_partitions:
            return
        closed = self.devices.closed_until_ms()
        if closed is None:
            if self._idle_since_s is None:
                self._idle_since_s = now_s
            if not drain and now_s - self._idle_since_s < self.devices.settings.idle_flush_s:
                return
            closed = MARKER_ALL_IDLE_MS
        for source in owned:
            if self._markers_sent.get(source) == closed:
                continue
            self._markers_sent[source] = closed
            body = encode_marker(source, self.sample_partitions, closed)
            for partition in range(self.internal_partitions):
                outbox.messages.append((self.internal_topic, b"marker", body, partition))


class TokenCostHandler:
    """Stage two's `Stage`: token deltas and pod-cost partials in; token and cost-per-token
    rows out."""

    def __init__(self, stage: PodStage, intake: Intake, internal_topic: str) -> None:
        self.stage = stage
        self.intake = intake
        self.internal_topic = internal_topic
        self.clock = ClockCheck(intake, stage.settings.max_clock_skew_s)

    def assigned(self, partitions: set[Partition]) -> None:
        pass  # co-partitioned inputs: what the records say is all this stage needs

    def handle(
        self, tp: TopicPartition, records: list[ConsumerRecord], now_s: float, outbox: Outbox
    ) -> None:
        for msg in records:
            self.handle_one(msg, now_s, outbox)

    def handle_one(self, msg: ConsumerRecord, now_s: float, outbox: Outbox) -> None:
        tp = (msg.topic, msg.partition)
        if msg.topic == self.internal_topic:
            try:
                message = decode_internal(msg.value)
            except InvalidInternal as exc:
                # Only stage one writes here; anything else is still data, not a crash.
                detail = f"not a pod-cost message: {exc}"
                self.intake.reject(msg, outbox, "invalid_internal", detail)
                self.stage.skip(tp, msg.offset)
                return
            self.stage.add_internal(tp, msg.offset, message, now_s)
            return
        decoded = self.intake.decode(msg, TOKENS_TYPE, outbox)
        if decoded is None or not self.clock.check(msg, decoded.event, now_s, outbox):
            self.stage.skip(tp, msg.offset)
            return
        status = self.stage.add_tokens(tp, msg.offset, decoded.event, now_s)
        self.intake.count(status, msg, outbox)

    def poll(self, now_s: float, drain: bool, outbox: Outbox) -> None:
        if drain:
            now_s += self.stage.settings.idle_flush_s + 1
        out = self.stage.poll(now_s)
        failed = list(out.unemittable)
        broken: dict[tuple[int, str], str] = {}  # (window, pod) -> why it did not encode
        rows: list[tuple[TokenCostRow, Message]] = []
        for row in out.cost_rows:
            try:
                message = row_message(TOKEN_COST_WINDOWS_TOPIC, row, row.pod_uid.encode())
            except Exception as exc:  # a window that cannot be written must not stop the stage
                broken.setdefault((row.window_start_ms, row.pod_uid), repr(exc))
                continue
            rows.append((row, message))
        token_rows = out.token_rows
        if broken:
            token_rows = [r for r in token_rows if (r.window_start_ms, r.pod_uid) not in broken]
            rows = [(r, m) for r, m in rows if (r.window_start_ms, r.pod_uid) not in broken]
            for (start, pod_uid), error in broken.items():
                failed.append(
                    Unemittable(start, pod_uid, self.stage.discard(start, pod_uid), error)
                )
        outbox.rows += token_rows
        for row, message in rows:
            outbox.rows.append(row)
            outbox.messages.append(message)
        for window in failed:
            self.intake.reject_window(outbox, window, self.stage.held, "pod")

    def positions(self) -> dict[Partition, int]:
        return self.stage.held.positions()

    def revoke(self, partitions: set[Partition]) -> None:
        self.stage.revoke(partitions)


class PodHandler:
    """Pod metadata, from the compacted pods topic every worker reads whole, to both stages."""

    def __init__(
        self, pods: PodHistory, devices: DeviceStage, pod_stage: PodStage, intake: Intake
    ) -> None:
        self.pods = pods
        self.devices = devices
        self.pod_stage = pod_stage
        self.intake = intake
        self.clock = ClockCheck(intake, devices.settings.max_clock_skew_s, offsets=False)

    def handle(self, msg: ConsumerRecord, outbox: Outbox) -> None:
        decoded = self.intake.decode(msg, POD_TYPE, outbox)
        if decoded is None or not self.clock.check(msg, decoded.event, time.time(), outbox):
            return
        event = decoded.event
        if not self.pods.add(event.id, event.time_ms, event.data):
            self.intake.metrics.events_duplicate(msg.topic)
            return
        self.intake.metrics.events_used(msg.topic)
        self.devices.on_pod_event(event.data.uid, event.time_ms)
        self.pod_stage.on_pod_event(event.data.uid, event.time_ms)

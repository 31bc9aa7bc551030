"""What the worker does with each record: decode it, dead-letter what is unusable, count it in
the metrics, and feed the rest to a stage; and what it does with a stage's output.

`DeviceHandler` and `TokenCostHandler` are the `Stage`s the runners drive
(streams.worker.runner); `PodHandler` feeds pod metadata, which every worker reads whole, to
both stages. They share an `Intake`: the decoding, dead letters and counters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from decimal import InvalidOperation

from aiokafka import ConsumerRecord, TopicPartition

from schemas.events import (
    COST_WINDOWS_TOPIC,
    GPU_SAMPLES_TOPIC,
    POD_TYPE,
    TOKEN_COST_WINDOWS_TOPIC,
    TOKENS_TYPE,
    Decoded,
    Ok,
    Rejected,
    decode_event,
    decode_samples,
)
from streams.labels import PodHistory
from streams.metrics import WorkerMetrics
from streams.worker.device_stage import DUPLICATE, LATE, TOO_LATE, DeviceStage
from streams.worker.pod_stage import PodStage, decode_internal, encode_marker
from streams.worker.sinks import Outbox, dead_letter_key, dead_letter_message, row_message
from streams.worker.watermark import Partition

MARKER_ALL_IDLE_MS = 2**62  # "this sample partition has nothing": lets stage two move on
TOO_LATE_DETAIL = "event time is older than the retention"


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
        kept = [records[index] for index in indices]
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
        for row in out.rows:
            outbox.rows.append(row)
            outbox.messages.append(row_message(COST_WINDOWS_TOPIC, row, row.device_uuid.encode()))
        for partial in out.partials:
            route = partial.pod_uid.encode()
            outbox.messages.append((self.internal_topic, route, partial.encode(), route))
        if out.rows:
            self.metrics.rows_emitted(out.rows, self.window_s, time.time())
        self.metrics.windows_open(self.devices.open_windows)
        self._send_markers(now_s, drain, outbox)

    def positions(self) -> dict[Partition, int]:
        return self.devices.held.positions()

    def revoke(self, partitions: set[Partition]) -> None:
        self.devices.revoke(partitions)
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
            except (ValueError, KeyError, TypeError, InvalidOperation) as exc:
                # Only stage one writes here; anything else is still data, not a crash.
                detail = f"not a pod-cost message: {exc!r}"
                self.intake.reject(msg, outbox, "invalid_internal", detail)
                self.stage.skip(tp, msg.offset)
                return
            self.stage.add_internal(tp, msg.offset, message, now_s)
            return
        decoded = self.intake.decode(msg, TOKENS_TYPE, outbox)
        if decoded is None:
            self.stage.skip(tp, msg.offset)
            return
        status = self.stage.add_tokens(tp, msg.offset, decoded.event, now_s)
        self.intake.count(status, msg, outbox)

    def poll(self, now_s: float, drain: bool, outbox: Outbox) -> None:
        if drain:
            now_s += self.stage.settings.idle_flush_s + 1
        out = self.stage.poll(now_s)
        outbox.rows += out.token_rows
        for row in out.cost_rows:
            outbox.rows.append(row)
            outbox.messages.append(row_message(TOKEN_COST_WINDOWS_TOPIC, row, row.pod_uid.encode()))

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

    def handle(self, msg: ConsumerRecord, outbox: Outbox) -> None:
        decoded = self.intake.decode(msg, POD_TYPE, outbox)
        if decoded is None:
            return
        event = decoded.event
        if not self.pods.add(event.id, event.time_ms, event.data):
            self.intake.metrics.events_duplicate(msg.topic)
            return
        self.intake.metrics.events_used(msg.topic)
        self.devices.on_pod_event(event.data.uid, event.time_ms)
        self.pod_stage.on_pod_event(event.data.uid, event.time_ms)

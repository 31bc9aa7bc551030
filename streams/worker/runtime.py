"""The worker's I/O: Kafka consumers feeding the two stages, the sinks, offsets and shutdown.

Three loops share one event loop: the pods loop reads the compacted pods topic from the start
(every worker holds all pod metadata, as a global table would), and one runner per stage
consumes its topics in a consumer group, flushes output and commits what is durable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import InvalidOperation

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, KafkaError
from prometheus_client import Counter

from runtime.kafka import KafkaSettings
from schemas.events import (
    COST_WINDOWS_TOPIC,
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
from streams.worker.sinks import Outbox, Sinks, dead_letter_key, dead_letter_message, row_message

log = logging.getLogger("gpuledger.worker")

MARKER_ALL_IDLE_MS = 2**62  # "this sample partition has nothing": lets stage two move on


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


class RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Makes a runner's output durable and drops the state of partitions it loses."""

    def __init__(self, runner: StageRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.runner.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.runner.assigned_at_s = time.monotonic()


class StageRunner:
    """Consumes one stage's topics, feeds the stage, flushes the outbox, commits offsets."""

    def __init__(
        self,
        name: str,
        consumer: AIOKafkaConsumer,
        handle: Callable[[TopicPartition, list[ConsumerRecord], float, Outbox], None],
        poll: Callable[[float, bool, Outbox], None],
        positions: Callable[[], dict[tuple[str, int], int]],
        revoke: Callable[[set[tuple[str, int]]], None],
        sinks: Sinks,
        metrics: WorkerMetrics,
        *,
        flush_interval_s: float,
        max_outbox: int,
    ) -> None:
        self.name = name
        self.consumer = consumer
        self.handle = handle
        self.poll = poll
        self.positions = positions
        self.revoke = revoke
        self.sinks = sinks
        self.metrics = metrics
        self.flush_interval_s = flush_interval_s
        self.max_outbox = max_outbox
        self.outbox = Outbox()
        self.lock = asyncio.Lock()
        self.assigned_at_s: float | None = None  # monotonic time of the last assignment
        self.last_record_s = 0.0
        self.records = 0
        self._last_flush_s = time.monotonic()

    def quiet_for_s(self) -> float:
        """How long this runner has had partitions and no records; 0 before an assignment."""
        if self.assigned_at_s is None:
            return 0.0
        return time.monotonic() - max(self.last_record_s, self.assigned_at_s)

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                batch = await self.consumer.getmany(timeout_ms=200, max_records=5000)
            except KafkaError as exc:
                log.warning("%s: fetch failed: %s", self.name, exc)
                await asyncio.sleep(1)
                continue
            async with self.lock:
                now = time.time()
                for tp, records in batch.items():
                    self.handle(tp, records, now, self.outbox)
                    self.records += len(records)
                    if records:
                        self._update_lag(tp, records[-1].offset + 1)
                self.poll(now, False, self.outbox)
                due = time.monotonic() - self._last_flush_s >= self.flush_interval_s
                if len(self.outbox) >= self.max_outbox or due:
                    await self._flush()
                if batch:
                    # Quiet time counts from the end of the work a batch caused, flush included.
                    self.last_record_s = time.monotonic()

    async def drain(self) -> None:
        """Close every open window now (end of a bounded run) and make it durable."""
        async with self.lock:
            self.poll(time.time(), True, self.outbox)
            await self._flush()

    async def final_flush(self) -> None:
        async with self.lock:
            await self._flush()

    async def on_revoked(self, revoked: list[TopicPartition]) -> None:
        async with self.lock:
            await self._flush()
            self.revoke({(tp.topic, tp.partition) for tp in revoked})

    async def _flush(self) -> None:
        self._last_flush_s = time.monotonic()
        outbox = self.outbox.take()
        try:
            durable = not len(outbox) or await self.sinks.write(outbox, self.name)
        except BaseException:
            self._restore(outbox)  # cancelled mid-write: keep it for the final flush
            raise
        if not durable:
            self._restore(outbox)  # stopping before it was durable: nothing is committed
            return
        await self._commit()

    def _restore(self, outbox: Outbox) -> None:
        self.outbox.rows[:0] = outbox.rows
        self.outbox.messages[:0] = outbox.messages

    async def _commit(self) -> None:
        assigned = self.consumer.assignment()
        offsets = {
            TopicPartition(topic, partition): offset
            for (topic, partition), offset in self.positions().items()
            if TopicPartition(topic, partition) in assigned
        }
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            log.info("%s: commit deferred (%s); the next flush retries", self.name, exc)

    def _update_lag(self, tp: TopicPartition, next_offset: int) -> None:
        highwater = self.consumer.highwater(tp)
        if highwater is not None:
            lag = max(highwater - next_offset, 0)
            self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)


class StageHandlers:
    """Record handling and polling for both stages: decode, dead-letter, count, feed."""

    def __init__(
        self,
        devices: DeviceStage,
        pods_stage: PodStage,
        pods: PodHistory,
        metrics: WorkerMetrics,
        dead_letters: DeadLetterLog,
        internal_topic: str,
        sample_partitions: Callable[[], int],
        owned_sample_partitions: Callable[[], list[int]],
        internal_partitions: Callable[[], int],
    ) -> None:
        self.devices = devices
        self.pods_stage = pods_stage
        self.pods = pods
        self.metrics = metrics
        self.dead_letters = dead_letters
        self.internal_topic = internal_topic
        self.sample_partitions = sample_partitions
        self.owned_sample_partitions = owned_sample_partitions
        self.internal_partitions = internal_partitions
        self.window_s = devices.settings.allocation.window_s
        self._markers_sent: dict[int, int] = {}
        self._children: dict[tuple[int, str], Counter] = {}
        self._idle_since_s: float | None = None

    def _reject(self, msg: ConsumerRecord, outbox: Outbox, reason: str, detail: str) -> None:
        self.metrics.rejected.labels(msg.topic, reason).inc()
        if self.dead_letters.add(outbox, msg, reason, detail):
            self.metrics.dead_letters.labels(msg.topic, reason).inc()

    def _decode(self, msg: ConsumerRecord, expected_type: str, outbox: Outbox) -> Ok | None:  # type: ignore[type-arg]
        decoded = decode_event(msg.value)
        if isinstance(decoded, Ok) and decoded.event.type == expected_type:
            return decoded
        self._reject_decoded(msg, decoded, outbox)
        return None

    def _reject_decoded(self, msg: ConsumerRecord, decoded: Decoded, outbox: Outbox) -> None:
        """Dead-letter a record that did not decode, or decoded to another topic's type."""
        if isinstance(decoded, Rejected):
            self._reject(msg, outbox, decoded.reason, decoded.detail)
        else:
            kind = decoded.event.type
            self._reject(msg, outbox, "wrong_topic", f"{kind} does not belong on {msg.topic}")

    def _count(self, topic: str, status: str, msg: ConsumerRecord, outbox: Outbox) -> None:
        if status == DUPLICATE:
            self._child(self.metrics.duplicates, topic).inc()
        elif status == TOO_LATE:
            self._reject(msg, outbox, "too_late", "event time is older than the retention")
        else:
            self._child(self.metrics.events, topic).inc()
            if status == LATE:
                self._child(self.metrics.late, topic).inc()

    def _child(self, metric: Counter, topic: str) -> Counter:
        """`metric.labels(topic)`, cached: labels() costs microseconds on a per-event path."""
        key = (id(metric), topic)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(topic)
        return child

    # ------------------------------------------------------------------ stage one

    def handle_samples(
        self, tp: TopicPartition, records: list[ConsumerRecord], now_s: float, outbox: Outbox
    ) -> None:
        """Decode a batch of one partition, dead-letter what is unusable, fold in the rest."""
        if not records:
            return
        partition = (tp.topic, tp.partition)
        events, indices, others = decode_samples([msg.value for msg in records])
        for index, decoded in others.items():
            self._reject_decoded(records[index], decoded, outbox)
        self.devices.skip(partition, records[-1].offset)
        kept = [records[index] for index in indices]
        counts = self.devices.add_samples(partition, [msg.offset for msg in kept], events, now_s)
        topic = tp.topic
        if counts.ok or counts.late:
            self._child(self.metrics.events, topic).inc(counts.ok + counts.late)
        if counts.late:
            self._child(self.metrics.late, topic).inc(counts.late)
        if counts.duplicates:
            self._child(self.metrics.duplicates, topic).inc(counts.duplicates)
        for index in counts.too_late:
            self._reject(kept[index], outbox, "too_late", "event time is older than the retention")
        for model in counts.unknown_models:
            self.metrics.unknown_model.labels(model).inc()

    def poll_devices(self, now_s: float, drain: bool, outbox: Outbox) -> None:
        if drain:
            now_s += self.devices.settings.idle_flush_s + 1
        out = self.devices.poll(now_s)
        for row in out.rows:
            outbox.rows.append(row)
            outbox.messages.append(row_message(COST_WINDOWS_TOPIC, row, row.device_uuid.encode()))
        for partial in out.partials:
            outbox.messages.append(
                (
                    self.internal_topic,
                    partial.pod_uid.encode(),
                    partial.encode(),
                    partial.pod_uid.encode(),
                )
            )
        if out.rows:
            self.metrics.rows_emitted(out.rows, self.window_s, time.time())
        self.metrics.open_windows.set(self.devices.open_windows)
        self._send_markers(now_s, drain, outbox)

    def _send_markers(self, now_s: float, drain: bool, outbox: Outbox) -> None:
        """Tell stage two, on every internal partition, how far each owned sample partition
        has emitted. A worker with no sample data says so once it has been idle a while."""
        owned = self.owned_sample_partitions()
        total = self.sample_partitions()
        if not owned or not total:
            return
        closed = self.devices.closed_until_ms()
        if closed is None:
            if self._idle_since_s is None:
                self._idle_since_s = now_s
            if not drain and now_s - self._idle_since_s < self.devices.settings.idle_flush_s:
                return
            closed = MARKER_ALL_IDLE_MS
        internal_partitions = self.internal_partitions()
        for source in owned:
            if self._markers_sent.get(source) == closed:
                continue
            self._markers_sent[source] = closed
            body = encode_marker(source, total, closed)
            for partition in range(internal_partitions):
                outbox.messages.append((self.internal_topic, b"marker", body, partition))

    # ------------------------------------------------------------------ stage two

    def handle_pod_stage_batch(
        self, tp: TopicPartition, records: list[ConsumerRecord], now_s: float, outbox: Outbox
    ) -> None:
        for msg in records:
            self.handle_pod_stage(msg, now_s, outbox)

    def handle_pod_stage(self, msg: ConsumerRecord, now_s: float, outbox: Outbox) -> None:
        tp = (msg.topic, msg.partition)
        if msg.topic == self.internal_topic:
            try:
                message = decode_internal(msg.value)
            except (ValueError, KeyError, TypeError, InvalidOperation) as exc:
                # Only stage one writes here; anything else is still data, not a crash.
                self._reject(msg, outbox, "invalid_internal", f"not a pod-cost message: {exc!r}")
                self.pods_stage.skip(tp, msg.offset)
                return
            self.pods_stage.add_internal(tp, msg.offset, message, now_s)
            return
        decoded = self._decode(msg, TOKENS_TYPE, outbox)
        if decoded is None:
            self.pods_stage.skip(tp, msg.offset)
            return
        status = self.pods_stage.add_tokens(tp, msg.offset, decoded.event, now_s)
        self._count(msg.topic, status, msg, outbox)

    def poll_pod_stage(self, now_s: float, drain: bool, outbox: Outbox) -> None:
        if drain:
            now_s += self.devices.settings.idle_flush_s + 1
        out = self.pods_stage.poll(now_s)
        outbox.rows += out.token_rows
        for row in out.cost_rows:
            outbox.rows.append(row)
            outbox.messages.append(row_message(TOKEN_COST_WINDOWS_TOPIC, row, row.pod_uid.encode()))

    # ------------------------------------------------------------------ pods

    def handle_pod(self, msg: ConsumerRecord, outbox: Outbox) -> None:
        decoded = self._decode(msg, POD_TYPE, outbox)
        if decoded is None:
            return
        event = decoded.event
        if not self.pods.add(event.id, event.time_ms, event.data):
            self.metrics.duplicates.labels(msg.topic).inc()
            return
        self.metrics.events.labels(msg.topic).inc()
        self.devices.on_pod_event(event.data.uid, event.time_ms)
        self.pods_stage.on_pod_event(event.data.uid, event.time_ms)


def stage_consumer(
    settings: KafkaSettings, group_id: str, *, co_partitioned: bool, **kwargs: object
) -> AIOKafkaConsumer:
    strategy = (RangePartitionAssignor,) if co_partitioned else None
    extra: dict[str, object] = {"partition_assignment_strategy": strategy} if strategy else {}
    return AIOKafkaConsumer(
        **settings.client_kwargs(),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_interval_ms=3_600_000,  # a sink retrying through an outage is not a dead worker
        isolation_level="read_committed" if settings.idempotent else "read_uncommitted",
        **extra,
        **kwargs,
    )


def all_partitions_consumer(settings: KafkaSettings) -> AIOKafkaConsumer:
    """A consumer outside any group, for topics every worker reads whole."""
    return AIOKafkaConsumer(
        **settings.client_kwargs(),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        group_id=None,
    )

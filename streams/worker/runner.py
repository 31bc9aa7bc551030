"""Stage runners: one consumer group per stage, its consume loop, its flushes and its commits.

A runner knows Kafka and the sinks, not what the records mean: it drives a `Stage` (the
handlers, streams.worker.handlers) through five calls, and makes the stage's output durable
before it commits the offsets the stage says a restart no longer needs (design §5).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, KafkaError

from runtime.kafka import KafkaSettings
from streams.metrics import WorkerMetrics
from streams.worker.sinks import Outbox, Sinks
from streams.worker.watermark import Partition

log = logging.getLogger("gpuledger.worker")

FETCH_TIMEOUT_MS = 200
FETCH_MAX_RECORDS = 5000


class Stage(Protocol):
    """What a runner drives: one stage's record handling, output and offsets."""

    def assigned(self, partitions: set[Partition]) -> None:
        """The consumer group gave this worker `partitions` (all it owns now)."""

    def handle(
        self, tp: TopicPartition, records: list[ConsumerRecord], now_s: float, outbox: Outbox
    ) -> None:
        """Use one partition's fetched records, in offset order; output goes to `outbox`."""

    def poll(self, now_s: float, drain: bool, outbox: Outbox) -> None:
        """Emit what is due at `now_s` (with `drain`: every open window, at once)."""

    def positions(self) -> dict[Partition, int]:
        """The offset to commit per partition: the earliest one a restart must replay."""

    def revoke(self, partitions: set[Partition]) -> None:
        """Drop the state fed by `partitions`: another worker owns them now."""


async def write_then_commit(
    pending: Outbox, sinks: Sinks, label: str, commit: Callable[[], Awaitable[None]] | None
) -> bool:
    """Make `pending` durable, then commit the input it came from: the worker's exactly-once
    order, and the only place that writes output.

    1. Insert the rows into ClickHouse (retried; every attempt of a batch carries one
       deduplication token).
    2. Produce the messages (billing topics, the internal pod-costs topic, dead letters) and
       wait until Kafka acknowledged every one.
    3. Only then commit the input offsets `commit` reads from the stage.

    A crash, a kill or a lost partition anywhere before step 3 leaves the offsets where they
    were, and the input is read again from there. The stages are deterministic and a row's
    version only grows with the inputs it saw, so the replay rebuilds the same windows and
    writes the same keys with the same versions (higher ones where input arrived since):
    ClickHouse keeps one row per key (the highest version) and a billing consumer keeps the
    highest version per key, so a row written twice counts once; a dead letter's key is its
    source (topic, partition, offset), and the worker skips keys already in the dead-letter
    topic. Committing before step 2 completed could lose output (the offsets would move past
    input whose rows never arrived), and Kafka after ClickHouse means a row on a billing topic
    is already in the store. The committed offset is not the last one read but the earliest
    that an open or retained window still needs (design §5): the state a restart loses is
    rebuilt from the replay, corrections included.

    If `stopping` interrupts a sink's retries, or the write is cancelled, nothing is committed
    and the batch goes back to the front of `pending` for a final flush. Returns whether the
    batch became durable. `commit` is None for input that is not committed (read whole again
    at every start).
    """
    batch = pending.take()
    try:
        durable = (not batch.rows or await sinks.insert(batch.rows, label)) and (
            not batch.messages or await sinks.produce(batch.messages)
        )
    except BaseException:
        pending.restore(batch)
        raise
    if not durable:
        pending.restore(batch)
        return False
    if commit is not None:
        await commit()
    return True


class StageRunner:
    """Consumes one stage's topics in its consumer group, feeds the stage, and flushes its
    output (when it is large or a flush interval passed) before committing offsets."""

    def __init__(
        self,
        name: str,
        consumer: AIOKafkaConsumer,
        stage: Stage,
        sinks: Sinks,
        metrics: WorkerMetrics,
        *,
        flush_interval_s: float,
        max_outbox: int,
    ) -> None:
        self.name = name
        self.consumer = consumer
        self.stage = stage
        self.sinks = sinks
        self.metrics = metrics
        self.flush_interval_s = flush_interval_s
        self.max_outbox = max_outbox
        self.outbox = Outbox()
        self.lock = asyncio.Lock()  # one of: a batch, a flush, a revoke
        self.assigned_at_s: float | None = None  # monotonic time of the last assignment
        self.last_record_s = 0.0
        self.records = 0
        self._last_flush_s = time.monotonic()

    def listener(self) -> ConsumerRebalanceListener:
        return _Rebalance(self)

    def quiet_for_s(self) -> float:
        """How long this runner has had partitions and no records; 0 before an assignment."""
        if self.assigned_at_s is None:
            return 0.0
        return time.monotonic() - max(self.last_record_s, self.assigned_at_s)

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                batch = await self.consumer.getmany(
                    timeout_ms=FETCH_TIMEOUT_MS, max_records=FETCH_MAX_RECORDS
                )
            except KafkaError as exc:
                log.warning("%s: fetch failed: %s", self.name, exc)
                await asyncio.sleep(1)
                continue
            async with self.lock:
                now = time.time()
                for tp, records in batch.items():
                    self.stage.handle(tp, records, now, self.outbox)
                    self.records += len(records)
                    if records:
                        self._record_lag(tp, records[-1].offset + 1)
                self.stage.poll(now, False, self.outbox)
                due = time.monotonic() - self._last_flush_s >= self.flush_interval_s
                if len(self.outbox) >= self.max_outbox or due:
                    await self._flush()
                if batch:
                    # Quiet time counts from the end of the work a batch caused, flush included.
                    self.last_record_s = time.monotonic()

    async def drain(self) -> None:
        """Close every open window now (end of a bounded run) and make it durable."""
        async with self.lock:
            self.stage.poll(time.time(), True, self.outbox)
            await self._flush()

    async def final_flush(self) -> None:
        async with self.lock:
            await self._flush()

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.assigned_at_s = time.monotonic()
        self.stage.assigned({(tp.topic, tp.partition) for tp in assigned})

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Make what the lost partitions fed durable, then drop their state and series."""
        lost = {(tp.topic, tp.partition) for tp in revoked}
        async with self.lock:
            await self._flush()
            self.stage.revoke(lost)
            self.metrics.partitions_revoked(lost)

    async def _flush(self) -> None:
        self._last_flush_s = time.monotonic()
        await write_then_commit(self.outbox, self.sinks, self.name, self._commit)

    async def _commit(self) -> None:
        assigned = self.consumer.assignment()
        offsets = {
            TopicPartition(topic, partition): offset
            for (topic, partition), offset in self.stage.positions().items()
            if TopicPartition(topic, partition) in assigned
        }
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            log.info("%s: commit deferred (%s); the next flush retries", self.name, exc)

    def _record_lag(self, tp: TopicPartition, next_offset: int) -> None:
        highwater = self.consumer.highwater(tp)
        if highwater is not None:
            self.metrics.partition_lag(tp.topic, tp.partition, max(highwater - next_offset, 0))


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands a consumer group's rebalances to the runner."""

    def __init__(self, runner: StageRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.runner.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.runner.on_assigned(assigned)


def stage_consumer(
    settings: KafkaSettings, group_id: str, *, co_partitioned: bool, **kwargs: object
) -> AIOKafkaConsumer:
    """A consumer in `group_id` that commits only what `write_then_commit` made durable."""
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

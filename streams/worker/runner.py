"""Stage runners: one consumer group per stage, its consume loop, its flushes and its commits.

A runner knows Kafka and the sinks, not what the records mean: it drives a `Stage` (the
handlers, streams.worker.handlers) through five calls, and makes the stage's output durable
before it commits the offsets the stage says a restart no longer needs (design §5).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from runtime.kafka import KafkaSettings
from streams.metrics import WorkerMetrics
from streams.rows import Row, WindowStateRow
from streams.worker.outbox import Outbox
from streams.worker.sinks import Sinks
from streams.worker.watermark import Partition

log = logging.getLogger("gpuledger.worker")

FETCH_TIMEOUT_MS = 200
FETCH_MAX_RECORDS = 5000
REVOKE_WAIT_S = 2.0  # how long a revoke waits for a write in flight that is not failing


class Stage(Protocol):
    """What a runner drives: one stage's record handling, output and offsets."""

    def assigned(self, partitions: set[Partition]) -> None:
        """The consumer group gave this worker `partitions` (all it owns now)."""

    async def prepare(self) -> None:
        """Before each batch, records or none: what an assignment left to do (restoring the
        windows that pod events changed while nobody held them)."""

    async def handle(
        self, tp: TopicPartition, records: list[ConsumerRecord], now_s: float, outbox: Outbox
    ) -> None:
        """Use one partition's fetched records, in offset order; output goes to `outbox`. It
        may wait for the window checkpoints the records need (streams.worker.checkpoints)."""

    def poll(self, now_s: float, drain: bool, outbox: Outbox) -> None:
        """Emit what is due at `now_s` (with `drain`: every open window, at once)."""

    def positions(self) -> dict[Partition, int]:
        """The offset to commit per partition: the earliest one a restart must replay."""

    def committed(self) -> None:
        """The positions last read were committed."""

    def revoke(self, partitions: set[Partition]) -> None:
        """Drop the state fed by `partitions`: another worker owns them now."""


async def write_then_commit(
    pending: Outbox,
    sinks: Sinks,
    label: str,
    commit: Callable[[], Awaitable[None]] | None,
    *,
    patient: bool = True,
    on_retry: Callable[[], None] | None = None,
) -> bool:
    """Make `pending` durable, then commit the input it came from: the worker's exactly-once
    order, and the only place that writes output.

    1. Insert the rows into ClickHouse (retried; every attempt of a batch carries one
       deduplication token). Rows ClickHouse refuses for what they are become dead letters,
       produced and acknowledged here (streams.worker.sinks).
    2. Produce the messages (billing topics, the internal pod-costs topic, dead letters) and
       wait until Kafka acknowledged every one (one the broker refuses for its size is
       replaced by a dead letter).
    3. Insert the checkpoints of the windows those rows and messages came from (design §5),
       last: a checkpoint says its window's output is durable, and a restart that finds one
       refuses the window's inputs as duplicates instead of emitting it again.
    4. Only then commit the input offsets `commit` reads from the stage.

    A crash, a kill or a lost partition anywhere before step 4 leaves the offsets where they
    were, and the input is read again from there. The stages are deterministic and a row's
    version only grows with the inputs it saw, so the replay rebuilds the same windows and
    writes the same keys with the same versions (higher ones where input arrived since):
    ClickHouse keeps one row per key (the highest version) and a billing consumer keeps the
    highest version per key, so a row written twice counts once; a dead letter's key is its
    source (topic, partition, offset), and the worker skips keys already in the dead-letter
    topic. Committing, or checkpointing, before step 2 completed could lose output (the
    offsets would move past input whose rows never arrived, or a restart would take the
    window's inputs for duplicates), and Kafka after ClickHouse means a row on a billing topic
    is already in the store. The committed offset is not the last one read but the earliest
    that an open window, or a closed one not checkpointed since its last input, still needs
    (design §5): the state a restart loses is rebuilt from the replay and the checkpoints,
    which travel in the same batch as the output they describe.

    If `stopping` interrupts a sink's retries (or, without `patient`, a transient failure
    ends the one attempt each sink makes), or the write is cancelled, nothing is committed and
    the batch goes back to the front of `pending`, for a later flush. `on_retry` runs at each
    transient failure. Returns whether the batch became durable. `commit` is None for input
    that is not committed (read whole again at every start).
    """
    batch = pending.take()
    rows: list[Row] = [row for row in batch.rows if not isinstance(row, WindowStateRow)]
    states: list[Row] = [row for row in batch.rows if isinstance(row, WindowStateRow)]
    try:
        durable = (
            (not rows or await sinks.insert(rows, label, patient=patient, on_retry=on_retry))
            and (
                not batch.messages
                or await sinks.produce(batch.messages, patient=patient, on_retry=on_retry)
            )
            and (
                not states
                or await sinks.insert(states, f"{label}:state", patient=patient, on_retry=on_retry)
            )
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
    output (when it is large or a flush interval passed) before committing offsets.

    While its output cannot be written (a sink retries a transient failure) the runner pauses
    its partitions and waits for the write, but holds no lock a rebalance needs: a revoke
    writes and commits what it can in one attempt, and otherwise drops the lost partitions'
    state without committing them (their new owner reads them again from the last commit; the
    pending output is written later, and a replay rewrites the same keys, so it counts once).
    """

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
        revoke_wait_s: float = REVOKE_WAIT_S,
    ) -> None:
        self.name = name
        self.consumer = consumer
        self.stage = stage
        self.sinks = sinks
        self.metrics = metrics
        self.flush_interval_s = flush_interval_s
        self.max_outbox = max_outbox
        self.revoke_wait_s = revoke_wait_s
        self.outbox = Outbox()
        self.lock = asyncio.Lock()  # the stage's state: a batch's handling, a poll, a revoke
        # A write (take, write, commit) and the handling that feeds the outbox, never two at
        # once; a revoke waits for it only briefly, and not at all while it is stalled.
        self.writing = asyncio.Lock()
        self.stalled = False  # a write is retrying a transient failure: partitions paused
        self.assigned_at_s: float | None = None  # monotonic time of the last assignment
        self.last_record_s = 0.0
        self.records = 0
        self._last_flush_s = time.monotonic()
        self._flowing_since_s = 0.0  # monotonic time the last stall ended

    def listener(self) -> ConsumerRebalanceListener:
        return _Rebalance(self)

    def quiet_for_s(self) -> float:
        """How long this runner has had partitions and no records; 0 before an assignment and
        while its output cannot be written (a stalled runner is not idle)."""
        if self.assigned_at_s is None or self.stalled:
            return 0.0
        since = max(self.last_record_s, self.assigned_at_s, self._flowing_since_s)
        return time.monotonic() - since

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
            # No record is handled while a write (a drain's, a revoke's) is between its take and
            # its commit: the positions it commits must not pass output it does not hold.
            async with self.writing:
                async with self.lock:
                    await self.stage.prepare()
                    now = time.time()
                    for tp, records in batch.items():
                        await self.stage.handle(tp, records, now, self.outbox)
                        self.records += len(records)
                        if records:
                            self._record_lag(tp, records[-1].offset + 1)
                    self.stage.poll(now, False, self.outbox)
                due = time.monotonic() - self._last_flush_s >= self.flush_interval_s
                if len(self.outbox) >= self.max_outbox or due:
                    await self._write(patient=True)
            if batch:
                # Quiet time counts from the end of the work a batch caused, flush included.
                self.last_record_s = time.monotonic()

    async def drain(self) -> None:
        """Close every open window now (end of a bounded run) and make it durable."""
        async with self.writing:
            async with self.lock:
                self.stage.poll(time.time(), True, self.outbox)
            await self._write(patient=True)

    async def final_flush(self) -> None:
        await self._flush()

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.assigned_at_s = time.monotonic()
        self.stage.assigned({(tp.topic, tp.partition) for tp in assigned})
        if self.stalled:
            self._pause(assigned)

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Make what the lost partitions fed durable and commit, if the sinks can do it now;
        then drop their state and series. Never waits out an outage: the rebalance, and with
        it the whole group, would wait too."""
        lost = {(tp.topic, tp.partition) for tp in revoked}
        if await self._writing_soon():
            try:
                if not await self._write(patient=False):
                    log.warning(
                        "%s: partitions revoked while output cannot be written: nothing "
                        "committed for them; %d entries stay pending",
                        self.name,
                        len(self.outbox),
                    )
            finally:
                self.writing.release()
        else:
            log.warning(
                "%s: partitions revoked during a write that is failing: nothing committed "
                "for them; their new owner reads them again",
                self.name,
            )
        async with self.lock:
            self.stage.revoke(lost)
            self.metrics.partitions_revoked(lost)

    async def _writing_soon(self) -> bool:
        """Acquire `writing` at once, or within `revoke_wait_s` if the write in flight is not
        failing. True if acquired."""
        if self.writing.locked() and self.stalled:
            return False
        try:
            return await asyncio.wait_for(self.writing.acquire(), timeout=self.revoke_wait_s)
        except TimeoutError:
            return False

    async def _flush(self) -> None:
        async with self.writing:
            await self._write(patient=True)

    async def _write(self, *, patient: bool) -> bool:
        """Write the outbox and commit (`writing` held); the partitions stay paused from the
        first transient failure until the write succeeds."""
        self._last_flush_s = time.monotonic()
        durable = await write_then_commit(
            self.outbox,
            self.sinks,
            self.name,
            self._commit,
            patient=patient,
            on_retry=self._stall,
        )
        if durable:
            self._flow()
        return durable

    def _stall(self) -> None:
        if self.stalled:
            return
        self.stalled = True
        self._pause(self.consumer.assignment())
        log.warning("%s: output cannot be written; consumption paused", self.name)

    def _flow(self) -> None:
        if not self.stalled:
            return
        self.stalled = False
        self._flowing_since_s = time.monotonic()
        assigned = self.consumer.assignment()
        if assigned:
            with contextlib.suppress(IllegalStateError):  # a rebalance took them meanwhile
                self.consumer.resume(*assigned)
        log.info("%s: output written again; consumption resumed", self.name)

    def _pause(self, partitions: set[TopicPartition]) -> None:
        if partitions:
            with contextlib.suppress(IllegalStateError):  # a rebalance took them meanwhile
                self.consumer.pause(*partitions)

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
            return
        self.stage.committed()

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

"""Where the worker's output goes: ClickHouse (batched, off the event loop) and Kafka (billing
topics, the internal pod-costs topic, dead letters), and what a sink does when a write fails.

- A transient failure (ClickHouse or Kafka unreachable, a timeout, an overloaded server: the
  error's `retriable`) is retried with backoff, 0.2 s doubling to 30 s, until it succeeds or
  the worker stops. The caller's `on_retry` runs at each one (a runner pauses its partitions:
  back-pressure, not memory). With `patient=False` a write makes one attempt and says whether
  it succeeded (a runner giving up partitions does not wait out an outage).
- A permanent failure is never retried unchanged. A batch ClickHouse refuses (a block over the
  partitions limit, a value its column cannot take, an unknown column) is split: one insert per
  (table, month) partition, then halves of a part still refused, down to the rows it refuses
  (at most `MAX_SPLITS` halvings per batch, so at most its partitions and twice that many
  inserts; past them a refused part goes whole). Those rows are dead-lettered (reason
  `unstorable`), the rest is stored. A message the broker refuses for its size is replaced by
  a small dead letter (`message_too_large`). Dead letters are built within the broker's limit
  (`outbox.MAX_LETTER_BYTES`: a larger record is dead-lettered by reference); one refused for
  its size all the same is sent again without the original bytes.
- Each sink counts its consecutive failed attempts and refusals; a write that succeeds clears
  them. `unhealthy()` names the sinks at or past the threshold, with the last error (/healthz).

The order in which the runner uses the sinks, and why it makes the output exactly-once, is
`streams.worker.runner.write_then_commit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError
from aiokafka.partitioner import DefaultPartitioner

from runtime.errors import GpuledgerError, StoreError
from schemas.events import DEAD_LETTER_TOPIC, format_time
from streams.metrics import WorkerMetrics
from streams.rows import Row
from streams.store import ClickHouseStore
from streams.worker.outbox import (
    CLICKHOUSE,
    KAFKA,
    MESSAGE_TOO_LARGE,
    UNSTORABLE,
    Message,
    describe,
    refused_message_letter,
    unstorable_row_message,
)

log = logging.getLogger("gpuledger.worker")

FIRST_BACKOFF_S = 0.2
MAX_BACKOFF_S = 30.0
MAX_SPLITS = 64  # halvings per batch: past them a part ClickHouse refuses is dead-lettered whole
UNHEALTHY_AFTER = 5  # consecutive failures of a sink before /healthz says unhealthy
# Refused by the broker for that message alone: sent again, it is refused again.
REFUSED_BY_BROKER = (MessageSizeTooLargeError, RecordTooLargeError)


class Backoff:
    """The delays between attempts: 0.2 s, doubling to 30 s."""

    def __init__(self, stopping: asyncio.Event) -> None:
        self.stopping = stopping
        self.delay_s = FIRST_BACKOFF_S

    async def wait(self) -> bool:
        """Sleep the current delay and lengthen the next; False (at once) if stopping is set."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=self.delay_s)
        if self.stopping.is_set():
            return False
        self.delay_s = min(self.delay_s * 2, MAX_BACKOFF_S)
        return True


def is_retriable(exc: BaseException) -> bool:
    """gpuledger errors say so themselves (`retriable`); a message the broker refuses for its
    size is refused again; any other failure may pass on a later attempt."""
    if isinstance(exc, GpuledgerError):
        return exc.retriable
    return not isinstance(exc, REFUSED_BY_BROKER)


def month_of(row: Row) -> int:
    """The partition of a row's table: toYYYYMM(window_start) (schemas/clickhouse.sql)."""
    moment = time.gmtime(row.window_start_ms // 1000)
    return moment.tm_year * 100 + moment.tm_mon


@dataclass
class SinkHealth:
    """One sink's current run of failures (attempts that failed, batches or messages refused)."""

    failures: int = 0
    last_error: str = ""
    failing_since_s: float | None = None  # wall time of the first failure of the run


class Sinks:
    """Writes rows and messages durably under the failure policy above. While a transient
    failure is retried the caller does not consume: back-pressure, not memory."""

    def __init__(
        self,
        store: ClickHouseStore,
        producer: AIOKafkaProducer,
        metrics: WorkerMetrics,
        stopping: asyncio.Event,
        *,
        unhealthy_after: int = UNHEALTHY_AFTER,
    ) -> None:
        self.store = store
        self.producer = producer
        self.metrics = metrics
        self.stopping = stopping
        self.unhealthy_after = unhealthy_after
        self.health = {CLICKHOUSE: SinkHealth(), KAFKA: SinkHealth()}
        self._batch = 0
        self._partitioner = DefaultPartitioner()
        self._partitions: dict[str, list[int]] = {}
        self._routes: dict[tuple[str, bytes], int] = {}

    def unhealthy(self) -> dict[str, dict[str, Any]]:
        """The sinks that failed `unhealthy_after` times in a row or more, with their last
        error (no credentials) and since when (RFC 3339)."""
        out: dict[str, dict[str, Any]] = {}
        for sink, health in self.health.items():
            if health.failures >= self.unhealthy_after:
                since = health.failing_since_s or time.time()
                out[sink] = {
                    "consecutive_failures": health.failures,
                    "last_error": health.last_error,
                    "failing_since": format_time(int(since * 1000)),
                }
        return out

    def failing(self, sink: str) -> bool:
        """Whether the last attempt to write to `sink` failed."""
        return self.health[sink].failures > 0

    async def insert(
        self,
        rows: list[Row],
        label: str,
        *,
        patient: bool = True,
        on_retry: Callable[[], None] | None = None,
    ) -> bool:
        """Store `rows` in ClickHouse, or dead-letter those it refuses (see the module): True
        once done, False if stopping (or, without `patient`, a transient failure) interrupted
        it. Every attempt of a batch, or of a part of it, carries the same deduplication token,
        so an attempt that failed after ClickHouse had stored the block does not store it
        twice."""
        self._batch += 1
        token = f"{label}:{time.time_ns()}:{self._batch}"
        try:
            return await self._insert(rows, token, patient, on_retry)
        except StoreError as refused:
            log.warning(
                "ClickHouse refused a batch of %d rows, inserting it per partition: %s",
                len(rows),
                refused,
            )
        parts: dict[tuple[str, int], list[Row]] = {}
        for row in rows:
            parts.setdefault((row.TABLE, month_of(row)), []).append(row)
        queue = deque((f"{table}:{month}", part) for (table, month), part in parts.items())
        splits = 0
        letters: list[Message] = []
        tables: Counter[str] = Counter()
        while queue:
            name, part = queue.popleft()
            try:
                if not await self._insert(part, f"{token}:{name}", patient, on_retry):
                    return False
                continue
            except StoreError as exc:
                error = exc
            if len(part) > 1 and splits < MAX_SPLITS:
                splits += 1
                half = len(part) // 2
                queue.extendleft([(f"{name}b", part[half:]), (f"{name}a", part[:half])])
                continue
            log.error("ClickHouse refused %d rows; dead-lettering them: %s", len(part), error)
            now = time.time()
            letters += [unstorable_row_message(row, describe(error), now) for row in part]
            tables.update(row.TABLE for row in part)
        if not letters:
            return True
        if not await self.produce(letters, patient=patient, on_retry=on_retry):
            return False
        for table in tables.elements():
            self.metrics.dead_lettered(table, UNSTORABLE)
        return True

    async def _insert(
        self, rows: list[Row], token: str, patient: bool, on_retry: Callable[[], None] | None
    ) -> bool:
        """One insert, retried while its failure is transient; a permanent one is raised."""
        return await self._retry(
            CLICKHOUSE,
            lambda: asyncio.to_thread(self.store.insert_rows, rows, dedup_token=token),
            patient,
            on_retry,
        )

    async def produce(
        self,
        messages: list[Message],
        *,
        patient: bool = True,
        on_retry: Callable[[], None] | None = None,
    ) -> bool:
        """Produce `messages` and wait for every acknowledgement: True once all are
        acknowledged or, refused for their size, replaced by dead letters (see the module);
        False if stopping (or, without `patient`, a transient failure) interrupted it."""
        pending = messages
        for round_ in range(3):
            refused: list[tuple[Message, BaseException]] = []

            async def attempt(
                batch: list[Message] = pending, out: list[tuple[Message, BaseException]] = refused
            ) -> None:
                out[:] = await self._produce(batch)

            if not await self._retry(KAFKA, attempt, patient, on_retry):
                return False
            if not refused:
                return True
            self._failed(KAFKA, refused[-1][1])
            if round_ == 2:
                log.error("Kafka refused %d shrunk dead letters; dropped", len(refused))
                return True
            now = time.time()
            pending = []
            for message, exc in refused:
                topic = message[0]
                log.error("Kafka refused a %d-byte message to %s: %s", len(message[2]), topic, exc)
                pending.append(refused_message_letter(message, describe(exc), now))
                if topic != DEAD_LETTER_TOPIC:
                    self.metrics.dead_lettered(topic, MESSAGE_TOO_LARGE)
        return True

    async def _produce(self, messages: list[Message]) -> list[tuple[Message, BaseException]]:
        """One record batch per partition: far cheaper than a `send` per message. Returns the
        messages the broker refused for their size; raises a transient failure."""
        grouped: dict[tuple[str, int], list[Message]] = {}
        for message in messages:
            topic, _, _, route = message
            partition = route if isinstance(route, int) else await self._route(topic, route)
            grouped.setdefault((topic, partition), []).append(message)
        sent: list[_Sent] = []
        for (topic, partition), group in grouped.items():
            sent += await self._send(topic, partition, group)
        refused: list[tuple[Message, BaseException]] = []
        while sent:
            results = await asyncio.gather(*(s[3] for s in sent), return_exceptions=True)
            again: list[_Sent] = []
            for (topic, partition, group, _), result in zip(sent, results, strict=True):
                if not isinstance(result, BaseException):
                    continue
                if not isinstance(result, REFUSED_BY_BROKER):
                    raise result
                if len(group) == 1:
                    refused.append((group[0], result))
                    continue
                for message in group:  # a batch over the broker's limit: one by one
                    again += await self._send(topic, partition, [message])
            sent = again
        return refused

    async def _send(self, topic: str, partition: int, group: list[Message]) -> list[_Sent]:
        sent: list[_Sent] = []
        batch = self.producer.create_batch()
        in_batch: list[Message] = []
        for message in group:
            if batch.append(key=message[1], value=message[2], timestamp=None) is None:  # full
                future = await self.producer.send_batch(batch, topic, partition=partition)
                sent.append((topic, partition, in_batch, future))
                batch, in_batch = self.producer.create_batch(), []
                # an empty batch takes any one message, however large
                batch.append(key=message[1], value=message[2], timestamp=None)
            in_batch.append(message)
        future = await self.producer.send_batch(batch, topic, partition=partition)
        sent.append((topic, partition, in_batch, future))
        return sent

    async def _route(self, topic: str, route: bytes) -> int:
        """The partition Kafka's default partitioner gives `route` (cached: murmur2 in Python
        is slow, and device and pod uids repeat every window)."""
        cached = self._routes.get((topic, route))
        if cached is not None:
            return cached
        partitions = self._partitions.get(topic)
        if partitions is None:
            partitions = self._partitions[topic] = sorted(await self.producer.partitions_for(topic))
        chosen: int = self._partitioner(route, partitions, partitions)
        if len(self._routes) > 1_000_000:
            self._routes.clear()
        self._routes[(topic, route)] = chosen
        return chosen

    async def _retry(
        self,
        sink: str,
        attempt: Callable[[], Awaitable[object]],
        patient: bool,
        on_retry: Callable[[], None] | None,
    ) -> bool:
        """Run `attempt` until it succeeds (True) or stopping interrupts the backoff (False);
        without `patient`, once. A permanent failure is raised at once."""
        backoff = Backoff(self.stopping)
        while True:
            started = time.perf_counter()
            try:
                await attempt()
            except Exception as exc:
                self._failed(sink, exc)
                if not is_retriable(exc):
                    raise
                if on_retry is not None:
                    on_retry()
                if not patient:
                    log.warning("%s write failed: %s", sink, exc)
                    return False
                log.warning("%s write failed, retrying in %.1f s: %s", sink, backoff.delay_s, exc)
                if not await backoff.wait():
                    return False
                continue
            self._wrote(sink, time.perf_counter() - started)
            return True

    def _failed(self, sink: str, exc: BaseException) -> None:
        self.metrics.sink_failed(sink)
        health = self.health[sink]
        health.failures += 1
        health.last_error = describe(exc)
        if health.failing_since_s is None:
            health.failing_since_s = time.time()
        if health.failures == self.unhealthy_after:
            log.error(
                "%s failed %d times in a row; /healthz says unhealthy: %s",
                sink,
                health.failures,
                health.last_error,
            )

    def _wrote(self, sink: str, seconds: float) -> None:
        self.metrics.sink_wrote(sink, seconds)
        health = self.health[sink]
        if health.failures >= self.unhealthy_after:
            log.warning("%s writes again after %d failures", sink, health.failures)
        self.health[sink] = SinkHealth()


_Sent = tuple[str, int, list[Message], "asyncio.Future[Any]"]

"""Where the worker's output goes: ClickHouse (batched, off the event loop, retried) and Kafka
(billing topics, the internal pod-costs topic, dead letters).

Each sink retries until it succeeds or the worker stops. The order in which the runner uses
them, and why it makes the output exactly-once, is `streams.worker.runner.write_then_commit`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from schemas.events import DEAD_LETTER_TOPIC, format_time
from streams.metrics import WorkerMetrics
from streams.rows import Row, as_json
from streams.store import ClickHouseStore

log = logging.getLogger("gpuledger.worker")

MAX_BACKOFF_S = 30.0


@dataclass
class Outbox:
    """Output waiting for the next flush."""

    rows: list[Row] = field(default_factory=list)
    # (topic, key, value, route): route is a partition number, or the bytes whose hash picks
    # the partition as Kafka's default partitioner would (murmur2)
    messages: list[tuple[str, bytes, bytes, int | bytes]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows) + len(self.messages)

    def take(self) -> Outbox:
        taken = Outbox(self.rows, self.messages)
        self.rows, self.messages = [], []
        return taken

    def restore(self, taken: Outbox) -> None:
        """Put back what `take` took (it was not written), before what was added since."""
        self.rows[:0] = taken.rows
        self.messages[:0] = taken.messages


Message = tuple[str, bytes, bytes, int | bytes]


def row_message(topic: str, row: Row, route: bytes) -> Message:
    """A billing-topic message; `route` (device or pod uid) keeps a key on one partition."""
    return topic, row.key.encode(), orjson.dumps(as_json(row)), route


def dead_letter_message(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    reason: str,
    detail: str,
    now_s: float,
) -> Message:
    """The original bytes travel base64-encoded beside where they came from and why."""
    body = {
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "reason": reason,
        "detail": detail,
        "key_base64": base64.b64encode(key).decode() if key is not None else None,
        "value_base64": base64.b64encode(value).decode() if value is not None else None,
        "dead_lettered_at": format_time(int(now_s * 1000)),
    }
    key = dead_letter_key(topic, partition, offset)
    return DEAD_LETTER_TOPIC, key, orjson.dumps(body), key


def dead_letter_key(topic: str, partition: int, offset: int) -> bytes:
    return f"{topic}|{partition}|{offset}".encode()


class Sinks:
    """Writes rows and messages durably, retrying with backoff until it succeeds or `stopping`
    is set. While a write is retried the caller does not consume: back-pressure, not memory."""

    def __init__(
        self,
        store: ClickHouseStore,
        producer: AIOKafkaProducer,
        metrics: WorkerMetrics,
        stopping: asyncio.Event,
    ) -> None:
        self.store = store
        self.producer = producer
        self.metrics = metrics
        self.stopping = stopping
        self._batch = 0
        self._partitioner = DefaultPartitioner()
        self._partitions: dict[str, list[int]] = {}
        self._routes: dict[tuple[str, bytes], int] = {}

    async def insert(self, rows: list[Row], label: str) -> bool:
        """Insert `rows` into ClickHouse: True once they are stored, False if stopping
        interrupted the retries. Every attempt carries the same deduplication token, so an
        attempt that failed after ClickHouse had stored the block does not store it twice."""
        self._batch += 1
        token = f"{label}:{time.time_ns()}:{self._batch}"
        return await self._retry(
            "clickhouse", lambda: asyncio.to_thread(self.store.insert_rows, rows, dedup_token=token)
        )

    async def produce(self, messages: list[Message]) -> bool:
        """Produce `messages` and wait for every acknowledgement: True once all are
        acknowledged, False if stopping interrupted the retries."""
        return await self._retry("kafka", lambda: self._produce(messages))

    async def _produce(self, messages: list[Message]) -> None:
        """One record batch per partition: far cheaper than a `send` per message."""
        grouped: dict[tuple[str, int], list[tuple[bytes, bytes]]] = {}
        for topic, key, value, route in messages:
            partition = route if isinstance(route, int) else await self._route(topic, route)
            grouped.setdefault((topic, partition), []).append((key, value))
        futures = []
        for (topic, partition), records in grouped.items():
            batch = self.producer.create_batch()
            for key, value in records:
                if batch.append(key=key, value=value, timestamp=None) is None:  # batch full
                    futures.append(
                        await self.producer.send_batch(batch, topic, partition=partition)
                    )
                    batch = self.producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
            futures.append(await self.producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*futures)

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

    async def _retry(self, sink: str, attempt: Callable[[], Awaitable[object]]) -> bool:
        backoff = 0.2
        while True:
            started = time.perf_counter()
            try:
                await attempt()
            except Exception as exc:  # any failure of the sink is retried, never dropped
                self.metrics.sink_failed(sink)
                log.warning("%s write failed, retrying in %.1f s: %s", sink, backoff, exc)
                try:
                    await asyncio.wait_for(self.stopping.wait(), timeout=backoff)
                    return False
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            self.metrics.sink_wrote(sink, time.perf_counter() - started)
            return True

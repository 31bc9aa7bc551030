"""Getting producer events out: a bounded local buffer drained into Kafka by one owned task, or
printed as JSON lines in `--dry-run`.

The buffer is what makes a broker outage of minutes lose nothing: producers append without ever
waiting on the broker; the sender takes batches, and puts a batch back at the head when the broker
does not acknowledge it, so events go out in order once it is back. Only when the buffer is full
are the oldest events dropped (and counted). A re-sent event keeps its id, so a batch sent twice
changes nothing downstream. The buffer reports the event time of its oldest event, so an outage
can be caught before what it holds gets older than the worker's late horizon (runtime/horizon.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from aiokafka.errors import KafkaError

from agents.metrics import BufferMetrics
from runtime.errors import BrokerError
from runtime.horizon import AGENT_BUFFER_EVENTS
from runtime.kafka import KafkaSettings, TopicSpec, ensure_topics, make_producer
from schemas.events import CloudEvent, encode_event

log = logging.getLogger(__name__)

DEFAULT_BUFFER_MAX_EVENTS = AGENT_BUFFER_EVENTS  # runtime/horizon.py sizes the late horizon from it


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One encoded event; `event_time_ms` is its CloudEvent time, kept so the buffer can tell
    how old its oldest event is without decoding `value`."""

    topic: str
    key: bytes
    value: bytes
    event_time_ms: int


class EventBuffer:
    """A FIFO of encoded events bounded by count; overflow drops the oldest.

    The sender has one batch out at a time: from `take` until `acknowledge` or `put_back` its
    events still count as buffered for the oldest event time, since Kafka does not hold them yet.
    Each producer enqueues in event-time order, so the oldest event is the head (or the batch
    out, taken from the head).
    """

    def __init__(self, max_events: int, metrics: BufferMetrics | None = None) -> None:
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        self.max_events = max_events
        self.metrics = metrics
        self.dropped = 0
        self._items: deque[Outgoing] = deque()
        self._out_oldest_ms: int | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, items: Iterable[Outgoing]) -> None:
        self._items.extend(items)
        self._enforce_bound()

    def take(self, max_items: int) -> list[Outgoing]:
        count = min(max_items, len(self._items))
        batch = [self._items.popleft() for _ in range(count)]
        if batch and self._out_oldest_ms is None:
            self._out_oldest_ms = batch[0].event_time_ms
        self._report()
        return batch

    def acknowledge(self) -> None:
        """The batch out is in Kafka: the oldest event is now the head's."""
        self._out_oldest_ms = None
        self._report()

    def put_back(self, batch: Sequence[Outgoing]) -> None:
        """Return an unacknowledged batch to the head, in its original order."""
        self._out_oldest_ms = None
        self._items.extendleft(reversed(batch))
        self._enforce_bound()

    def oldest_event_time_ms(self) -> int | None:
        """Event time of the oldest event not yet acknowledged by Kafka; None when there is none."""
        times = [t for t in (self._out_oldest_ms, self._head_time_ms()) if t is not None]
        return min(times) if times else None

    def _head_time_ms(self) -> int | None:
        return self._items[0].event_time_ms if self._items else None

    def _enforce_bound(self) -> None:
        overflow = len(self._items) - self.max_events
        if overflow > 0:
            for _ in range(overflow):
                self._items.popleft()
            self.dropped += overflow
            if self.metrics is not None:
                self.metrics.dropped(overflow)
        self._report()

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.buffer_size(len(self._items))
            self.metrics.oldest_event(self.oldest_event_time_ms())


class Publisher(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def publish(self, topic: str, key: str, event: CloudEvent[Any]) -> None: ...

    def check(self) -> None:
        """Raise if the background work died."""


class DryRunPublisher:
    """Prints each event as one JSON line instead of sending it."""

    def __init__(self, metrics: BufferMetrics | None = None, out: TextIO | None = None) -> None:
        self.metrics = metrics
        self.out = out if out is not None else sys.stdout

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self.out.flush()

    def publish(self, topic: str, key: str, event: CloudEvent[Any]) -> None:
        self.out.write(encode_event(event).decode() + "\n")
        self.out.flush()
        if self.metrics is not None:
            self.metrics.published(1, time.time())

    def check(self) -> None:
        return None


class KafkaPublisher:
    """Owns the buffer and the sender task; `stop()` flushes within `flush_timeout_s`."""

    def __init__(
        self,
        settings: KafkaSettings,
        topics: Sequence[TopicSpec],
        metrics: BufferMetrics,
        *,
        max_buffer_events: int = DEFAULT_BUFFER_MAX_EVENTS,
        max_batch_events: int = 500,
        retry_max_s: float = 30.0,
        flush_timeout_s: float = 10.0,
        producer_factory: Callable[[KafkaSettings], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.topics = list(topics)
        self.metrics = metrics
        self.buffer = EventBuffer(max_buffer_events, metrics)
        self.max_batch_events = max_batch_events
        self.retry_max_s = retry_max_s
        self.flush_timeout_s = flush_timeout_s
        self._producer_factory = producer_factory or (
            lambda s: make_producer(s, request_timeout_ms=15_000)
        )
        self._producer: Any = None
        self._topics_ready = False
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.connected = False

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("publisher already started")
        self._task = asyncio.create_task(self._run(), name="gpuledger-publisher")

    def publish(self, topic: str, key: str, event: CloudEvent[Any]) -> None:
        self.buffer.put([Outgoing(topic, key.encode(), encode_event(event), event.time_ms)])
        self._wakeup.set()

    def check(self) -> None:
        task = self._task
        if task is not None and task.done() and not task.cancelled():
            exc = task.exception()
            if exc is not None:
                raise BrokerError(f"the Kafka sender died: {exc!r}", retriable=False) from exc

    async def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(task, timeout=self.flush_timeout_s)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            except Exception as exc:  # already raised to the owner by check()
                log.error("the Kafka sender had died: %r", exc)
        await self._close_producer()
        if len(self.buffer):
            log.warning("stopping with %d events not acknowledged by Kafka", len(self.buffer))

    async def _run(self) -> None:
        backoff_s = 0.5
        while True:
            if self._stopping and not len(self.buffer):
                return
            if self._producer is None:
                try:
                    await self._connect()
                    backoff_s = 0.5
                except (KafkaError, BrokerError, OSError, TimeoutError) as exc:
                    self.metrics.publish_error()
                    log.warning("Kafka unreachable (%s); retrying in %.1f s", exc, backoff_s)
                    await self._close_producer()
                    await self._pause(backoff_s)
                    backoff_s = min(backoff_s * 2, self.retry_max_s)
                    continue
            self._wakeup.clear()
            batch = self.buffer.take(self.max_batch_events)
            if not batch:
                if self._stopping:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=1.0)
                continue
            try:
                futures = [
                    await self._producer.send(item.topic, item.value, key=item.key)
                    for item in batch
                ]
                await asyncio.gather(*futures)
            except (KafkaError, OSError, TimeoutError) as exc:
                self.buffer.put_back(batch)
                self.metrics.publish_error()
                log.warning("Kafka send failed (%s); %d events kept", exc, len(self.buffer))
                await self._close_producer()
                await self._pause(backoff_s)
                backoff_s = min(backoff_s * 2, self.retry_max_s)
                continue
            self.buffer.acknowledge()
            self.metrics.published(len(batch), time.time())

    async def _connect(self) -> None:
        if not self._topics_ready and self.topics:
            await ensure_topics(self.settings, self.topics)
            self._topics_ready = True
        producer = self._producer_factory(self.settings)
        self._producer = producer
        await producer.start()
        self.connected = True

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        self.connected = False
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), timeout=5.0)

    async def _pause(self, seconds: float) -> None:
        self._wakeup.clear()
        if self._stopping and seconds > 0.5:
            seconds = 0.5  # while flushing on stop, retry promptly
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout=seconds)

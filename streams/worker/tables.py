"""Topics every worker reads outside any consumer group, as a global table would be.

The compacted pods topic is read from the start before the stages begin, then followed (the
pod events of pods that request GPU resources are stored as they are read, in
`pod_gpu_requests`); the dead-letter topic's recent keys are read once at start-up, so a replay
does not write a letter twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from runtime.kafka import KafkaSettings
from schemas.events import DEAD_LETTER_TOPIC, PODS_TOPIC, Ok, PodInfo, decode_event
from streams.worker.handlers import PodHandler
from streams.worker.intake import DeadLetterLog
from streams.worker.outbox import Outbox
from streams.worker.pod_requests import PodRequests
from streams.worker.runner import FETCH_MAX_RECORDS, all_partitions_consumer, write_then_commit
from streams.worker.sinks import Sinks


class _GpuRequests(msgspec.Struct):
    uid: str = ""
    gpu_requests: dict[str, object] = {}


class _GpuRequestsEvent(msgspec.Struct):
    data: _GpuRequests


# Reads only whether a pod event names GPU requests: most pods have none, and a used event is
# decoded in full a second time only when it is stored.
_GPU_REQUESTS = msgspec.json.Decoder(_GpuRequestsEvent)


class PodsTable:
    """Reads the pods topic into the pod history (through `PodHandler`), and the events of pods
    that request GPU resources into `pod_gpu_requests`; its dead letters and rows are written
    at once. Nothing is committed: every start reads the topic whole again (a row read again
    is the same row)."""

    def __init__(
        self, settings: KafkaSettings, partitions: int, handler: PodHandler, sinks: Sinks
    ) -> None:
        self.consumer = all_partitions_consumer(settings)
        self.tps = [TopicPartition(PODS_TOPIC, p) for p in range(partitions)]
        self.handler = handler
        self.sinks = sinks
        self.outbox = Outbox()
        self._started = False
        self.handled: dict[int, int] = {}  # next offset per partition, its events all used
        self._latest: dict[str, tuple[int, int]] = {}  # uid -> (partition, offset) of its last
        self.requests = PodRequests(handler.devices.settings.allocation.labels)

    def changed_since(self, positions: dict[int, int]) -> set[str]:
        """Pods with an event at or after `positions` (per partition; 0 where absent): those
        whose metadata may have changed since a stage last wrote its checkpoints."""
        return {
            uid
            for uid, (partition, offset) in self._latest.items()
            if offset >= positions.get(partition, 0)
        }

    def forget(self, known: Callable[[str], bool]) -> None:
        """Drop the pods the history no longer knows (it is bounded; this follows it)."""
        self._latest = {uid: at for uid, at in self._latest.items() if known(uid)}
        self.requests.forget(known)

    async def catch_up(self, stopping: asyncio.Event) -> bool:
        """Read from the start to the end the topic had when this began: True once there,
        False if `stopping` was set first."""
        await self.consumer.start()
        self._started = True
        self.consumer.assign(self.tps)
        await self.consumer.seek_to_beginning(*self.tps)
        end = await self.consumer.end_offsets(self.tps)
        while not stopping.is_set():
            await self._step()
            positions = {tp: await self.consumer.position(tp) for tp in self.tps}
            if all(positions[tp] >= end[tp] for tp in self.tps):
                return True
        return False

    async def follow(self, stopping: asyncio.Event) -> None:
        """Keep reading (pod changes re-emit the windows they correct) until `stopping`."""
        while not stopping.is_set():
            await self._step()

    async def stop(self) -> None:
        if self._started:
            await _stop(self.consumer)

    async def _step(self) -> None:
        batch = await self.consumer.getmany(timeout_ms=200, max_records=FETCH_MAX_RECORDS)
        for records in batch.values():
            for msg in records:
                uid = self.handler.handle(msg, self.outbox)
                if uid is not None:
                    self._latest[uid] = (msg.partition, msg.offset)
                    self._store_requests(msg, uid)
                self.handled[msg.partition] = msg.offset + 1
        if len(self.outbox) and not await write_then_commit(self.outbox, self.sinks, "pods", None):
            self.outbox = Outbox()  # stopping: the next start reads the topic again

    def _store_requests(self, msg: ConsumerRecord, uid: str) -> None:
        """The `pod_gpu_requests` row of a used pod event, if its pod requests GPUs or did."""
        try:
            named = bool(_GPU_REQUESTS.decode(msg.value).data.gpu_requests)
        except msgspec.MsgspecError:
            named = True  # the full decode below says what it holds
        if not named and not self.requests.requesting(uid):
            return
        decoded = decode_event(msg.value)
        if isinstance(decoded, Ok) and isinstance(decoded.event.data, PodInfo):
            row = self.requests.row(decoded.event)
            if row is not None:
                self.outbox.rows.append(row)


async def load_dead_letter_keys(
    settings: KafkaSettings,
    partitions: int,
    dead_letters: DeadLetterLog,
    *,
    topic: str = DEAD_LETTER_TOPIC,
    now_s: float | None = None,
) -> int:
    """The keys of the dead letters written within `dead_letters.horizon_s` of `now_s`, into
    `dead_letters`; returns how many records were read.

    Each partition is read from its first record stamped at or after that time (Kafka's
    offsets for times); where it has none, every record there is older, and none is read.
    Records stamped earlier than that further on (a producer's clock) are read, not kept.
    """
    now = dead_letters.clock() if now_s is None else now_s
    since_ms = max(0, int((now - dead_letters.horizon_s) * 1000))
    consumer = all_partitions_consumer(settings)
    await consumer.start()
    read = 0
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        starts = await consumer.offsets_for_times({tp: since_ms for tp in tps})
        for tp in tps:
            found = starts.get(tp)
            consumer.seek(tp, end[tp] if found is None else found.offset)
        while True:
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= end[tp] for pos, tp in zip(positions, tps, strict=True)):
                break
            batch = await consumer.getmany(timeout_ms=500, max_records=10000)
            for records in batch.values():
                read += len(records)
                for msg in records:
                    if msg.key:
                        dead_letters.remember(msg.key, msg.timestamp / 1000, now)
    finally:
        await _stop(consumer)
    return read


async def _stop(consumer: AIOKafkaConsumer) -> None:
    # aiokafka's group-less consumer cancels a task it just created; let it start first, or
    # stopping right after starting raises CancelledError.
    await asyncio.sleep(0)
    await consumer.stop()

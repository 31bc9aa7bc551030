"""`Worker`: builds the stages, consumers, sinks and HTTP endpoint, and owns their tasks."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry

from runtime.errors import GpuledgerError
from runtime.kafka import (
    KafkaSettings,
    TopicSpec,
    default_topics,
    ensure_topics,
    make_producer,
    partition_counts,
)
from schemas.events import DEAD_LETTER_TOPIC, GPU_SAMPLES_TOPIC, PODS_TOPIC, TOKENS_TOPIC
from streams.labels import PodHistory
from streams.metrics import WorkerMetrics
from streams.pricing import PriceBook
from streams.rollups import seal_hours
from streams.store import OWNER_FILE, ClickHouseStore
from streams.worker.device_stage import DeviceStage, StreamSettings
from streams.worker.http import HttpEndpoint
from streams.worker.pod_stage import PodStage
from streams.worker.runtime import (
    DeadLetterLog,
    RebalanceListener,
    StageHandlers,
    StageRunner,
    all_partitions_consumer,
    stage_consumer,
)
from streams.worker.sinks import Outbox, Sinks

log = logging.getLogger("gpuledger.worker")

# A worker holds millions of long-lived objects (open and retained windows). CPython's default
# collector (a young collection every 700 allocations, full ones as the heap grows) spent about
# a quarter of stage one's CPU re-scanning them (tests/benchmarks/bench_hot_path.py).
GC_THRESHOLDS = (50_000, 10, 10)


def tune_garbage_collector() -> None:
    """For a worker process: freeze what start-up built and collect young objects less often.
    The window state holds no reference cycles; it is freed by reference counting."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


STOP_GRACE_S = 10.0
SEAL_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    kafka: KafkaSettings
    clickhouse_dsn: str
    stream: StreamSettings = field(default_factory=StreamSettings)
    group_id: str = "gpuledger-worker"
    partitions: int = 3  # for topics this worker creates
    flush_interval_s: float = 1.0
    max_outbox: int = 50_000
    http_host: str = "127.0.0.1"
    http_port: int = 9108  # 0: no HTTP endpoint
    exit_when_idle_s: float | None = None  # bounded runs: drain and stop after this silence

    @property
    def internal_topic(self) -> str:
        return f"{self.group_id}.pod-costs"


class Worker:
    def __init__(
        self,
        config: WorkerConfig,
        book: PriceBook,
        *,
        store: ClickHouseStore | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.book = book
        self.store = store or ClickHouseStore(config.clickhouse_dsn)
        self.registry = registry or CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry)
        self.pods = PodHistory()
        self.devices = DeviceStage(book, config.stream, self.pods)
        self.pod_stage = PodStage(config.stream, self.pods)
        self.dead_letters = DeadLetterLog()
        self.stopping = asyncio.Event()
        self.pods_ready = asyncio.Event()
        self.runners: list[StageRunner] = []
        self.http: HttpEndpoint | None = None
        self._partition_counts: dict[str, int] = {}
        self._owner_file: Path | None = None

    @property
    def open_windows(self) -> int:
        return self.devices.open_windows

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        cfg = self.config
        await asyncio.to_thread(self.store.create_schema)
        specs = [*default_topics(cfg.partitions), TopicSpec(cfg.internal_topic, cfg.partitions)]
        await ensure_topics(cfg.kafka, specs)
        producer = make_producer(cfg.kafka)
        await producer.start()
        sinks = Sinks(self.store, producer, self.metrics, self.stopping)
        tasks: list[asyncio.Task[None]] = []
        samples = stage_consumer(cfg.kafka, cfg.group_id, co_partitioned=False)
        tokens = stage_consumer(cfg.kafka, f"{cfg.group_id}.pods", co_partitioned=True)
        try:
            self._partition_counts = await partition_counts(
                cfg.kafka,
                [
                    GPU_SAMPLES_TOPIC,
                    TOKENS_TOPIC,
                    PODS_TOPIC,
                    DEAD_LETTER_TOPIC,
                    cfg.internal_topic,
                ],
            )
            await self._load_dead_letters()
            if cfg.http_port:
                self.http = HttpEndpoint(self, cfg.http_host, cfg.http_port)
                await self.http.start()
                self._write_owner_file()
            handlers = StageHandlers(
                self.devices,
                self.pod_stage,
                self.pods,
                self.metrics,
                self.dead_letters,
                cfg.internal_topic,
                sample_partitions=lambda: self._partition_counts[GPU_SAMPLES_TOPIC],
                owned_sample_partitions=lambda: sorted(tp.partition for tp in samples.assignment()),
                internal_partitions=lambda: self._partition_counts[cfg.internal_topic],
            )
            pods_task = asyncio.create_task(self._pods_loop(handlers, sinks), name="pods")
            tasks.append(pods_task)
            await self._wait(self.pods_ready, pods_task)
            device_runner = StageRunner(
                "devices",
                samples,
                handlers.handle_samples,
                handlers.poll_devices,
                self.devices.held.positions,
                self.devices.revoke,
                sinks,
                self.metrics,
                flush_interval_s=cfg.flush_interval_s,
                max_outbox=cfg.max_outbox,
            )
            pod_runner = StageRunner(
                "pods-stage",
                tokens,
                handlers.handle_pod_stage_batch,
                handlers.poll_pod_stage,
                self.pod_stage.held.positions,
                self.pod_stage.revoke,
                sinks,
                self.metrics,
                flush_interval_s=cfg.flush_interval_s,
                max_outbox=cfg.max_outbox,
            )
            self.runners = [device_runner, pod_runner]
            await samples.start()
            samples.subscribe([GPU_SAMPLES_TOPIC], listener=RebalanceListener(device_runner))
            await tokens.start()
            tokens.subscribe(
                [TOKENS_TOPIC, cfg.internal_topic], listener=RebalanceListener(pod_runner)
            )
            for runner in self.runners:
                tasks.append(asyncio.create_task(runner.run(self.stopping), name=runner.name))
            tasks.append(asyncio.create_task(self._seal_loop(), name="seal"))
            if cfg.exit_when_idle_s is not None:
                tasks.append(asyncio.create_task(self._exit_when_idle(cfg.exit_when_idle_s)))
            await self._supervise(tasks)
        finally:
            self.stopping.set()
            # Loops notice `stopping` within one fetch; cancel only those that do not.
            if tasks:
                await asyncio.wait(tasks, timeout=STOP_GRACE_S)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for runner in self.runners:
                with contextlib.suppress(Exception):
                    await runner.final_flush()
            for consumer in (samples, tokens):
                with contextlib.suppress(Exception):
                    await consumer.stop()
            await producer.stop()
            if self.http is not None:
                await self.http.stop()
            self._remove_owner_file()

    async def _supervise(self, tasks: list[asyncio.Task[None]]) -> None:
        """Return when stopping is set; a loop that dies takes the worker down loudly."""
        stop_wait = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait([stop_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        for task in done:
            if task is not stop_wait and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _wait(self, event: asyncio.Event, task: asyncio.Task[None]) -> None:
        """Wait for `event`; raise at once if `task`, which should set it, dies."""
        stop_wait = asyncio.create_task(self.stopping.wait())
        ready_wait = asyncio.create_task(event.wait())
        await asyncio.wait([stop_wait, ready_wait, task], return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        ready_wait.cancel()
        if task.done() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

    async def _pods_loop(self, handlers: StageHandlers, sinks: Sinks) -> None:
        """Read the compacted pods topic whole, then follow it; signal once caught up."""
        consumer = all_partitions_consumer(self.config.kafka)
        await consumer.start()
        try:
            tps = [TopicPartition(PODS_TOPIC, p) for p in range(self._partition_counts[PODS_TOPIC])]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end = await consumer.end_offsets(tps)
            outbox = Outbox()
            while not self.stopping.is_set():
                batch = await consumer.getmany(timeout_ms=200, max_records=5000)
                for records in batch.values():
                    for msg in records:
                        handlers.handle_pod(msg, outbox)
                if len(outbox):
                    await sinks.write(outbox.take(), "pods")
                if not self.pods_ready.is_set():
                    positions = {tp: await consumer.position(tp) for tp in tps}
                    if all(positions[tp] >= end[tp] for tp in tps):
                        self.pods_ready.set()
        finally:
            await _stop(consumer)

    async def _load_dead_letters(self) -> None:
        consumer = all_partitions_consumer(self.config.kafka)
        await consumer.start()
        try:
            count = self._partition_counts[DEAD_LETTER_TOPIC]
            tps = [TopicPartition(DEAD_LETTER_TOPIC, p) for p in range(count)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end = await consumer.end_offsets(tps)
            while True:
                positions = [await consumer.position(tp) for tp in tps]
                if all(pos >= end[tp] for pos, tp in zip(positions, tps, strict=True)):
                    break
                batch = await consumer.getmany(timeout_ms=500, max_records=10000)
                for records in batch.values():
                    self.dead_letters.seen.update(m.key for m in records if m.key)
        finally:
            await _stop(consumer)

    async def _seal_loop(self) -> None:
        """Roll up whole hours that no correction can reach any more (see streams.rollups)."""
        stream = self.config.stream
        margin_s = int(stream.retention_s + stream.allocation.window_s + stream.grace_s)
        while not self.stopping.is_set():
            watermark = self.devices.watermark.value(time.time())
            if watermark is not None:
                try:
                    await asyncio.to_thread(seal_hours, self.store, watermark, retention_s=margin_s)
                except GpuledgerError as exc:
                    log.warning("sealing hourly rollups failed, retrying later: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=SEAL_EVERY_S)

    async def _exit_when_idle(self, idle_s: float) -> None:
        """For bounded runs (tests, demo): once no input arrived for `idle_s`, emit every
        open window, make it durable, and stop."""
        while not self.stopping.is_set():
            await asyncio.sleep(0.2)
            quiet = min(r.quiet_for_s() for r in self.runners)
            if quiet >= idle_s:
                await self.drain()
                self.stop()

    async def drain(self) -> None:
        """Emit stage one's open windows, give stage two time to read them, emit the rest."""
        device_runner, pod_runner = self.runners
        await device_runner.drain()
        deadline = time.monotonic() + 10
        before = pod_runner.records
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            if pod_runner.records > before and time.monotonic() - pod_runner.last_record_s > 1:
                break
        await pod_runner.drain()

    def _write_owner_file(self) -> None:
        if not self.store.embedded or self.http is None:
            return
        folder = Path(urlsplit(self.store.dsn).path)
        with contextlib.suppress(OSError):
            self._owner_file = folder / OWNER_FILE
            self._owner_file.write_bytes(orjson.dumps({"pid": os.getpid(), "url": self.http.url}))

    def _remove_owner_file(self) -> None:
        if self._owner_file is not None:
            with contextlib.suppress(OSError):
                self._owner_file.unlink()


async def _stop(consumer: AIOKafkaConsumer) -> None:
    # aiokafka's group-less consumer cancels a task it just created; let it start first, or
    # stopping right after starting raises CancelledError.
    await asyncio.sleep(0)
    await consumer.stop()

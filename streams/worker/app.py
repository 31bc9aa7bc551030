"""`Worker`: builds the stages, handlers, runners, sinks and HTTP endpoint, starts them in
order, supervises their loops as one task group, and shuts them down."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from prometheus_client import CollectorRegistry

from runtime.errors import GpuledgerError, StoreError
from runtime.kafka import (
    KafkaSettings,
    TopicSpec,
    default_topics,
    ensure_topics,
    make_producer,
    partition_counts,
)
from schemas.events import (
    DEAD_LETTER_TOPIC,
    GPU_SAMPLES_TOPIC,
    NODES_TOPIC,
    PODS_TOPIC,
    TOKENS_TOPIC,
)
from streams.labels import DEFAULT_MAX_PODS, PodHistory
from streams.metrics import MAX_SERIES, WorkerMetrics
from streams.pricing import PriceBook
from streams.reports.budgets import Budgets
from streams.rollups import seal_hours
from streams.store import OWNER_FILE, ClickHouseStore
from streams.worker.budget_gauges import BUDGET_INTERVAL_S, BudgetGauges
from streams.worker.checkpoints import Checkpoints
from streams.worker.device_stage import DeviceStage, StreamSettings
from streams.worker.handlers import (
    DeviceHandler,
    PodHandler,
    TokenCostHandler,
)
from streams.worker.http import HttpEndpoint, ReadSettings
from streams.worker.intake import DEAD_LETTER_MAX_KEYS, DeadLetterLog, Intake
from streams.worker.nodes import NodesTable
from streams.worker.pod_stage import PodStage
from streams.worker.runner import StageRunner, stage_consumer
from streams.worker.sinks import UNHEALTHY_AFTER, Backoff, Sinks
from streams.worker.tables import PodsTable, load_dead_letter_keys

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
    clickhouse_dsn: str = field(repr=False)  # may hold a password
    stream: StreamSettings = field(default_factory=StreamSettings)
    group_id: str = "gpuledger-worker"
    partitions: int = 3  # for topics this worker creates
    flush_interval_s: float = 1.0
    max_outbox: int = 50_000
    http_host: str = "127.0.0.1"
    http_port: int = 9108  # 0: no HTTP endpoint
    # Reads (embedded store only): where, when http_host is not loopback; time and concurrency.
    reads: ReadSettings = field(default_factory=ReadSettings)
    exit_when_idle_s: float | None = None  # bounded runs: drain and stop after this silence
    unhealthy_after_failures: int = UNHEALTHY_AFTER  # a sink's failures in a row: /healthz 503
    # Size caps of the in-memory structures the input names (design §5, "Memory").
    max_pods: int = DEFAULT_MAX_PODS
    dead_letter_max_keys: int = DEAD_LETTER_MAX_KEYS
    max_metric_series: int = MAX_SERIES
    # Budgets: the gauges of each budget and owner's forecast, recomputed every interval.
    budgets: Budgets | None = None
    budget_interval_s: float = BUDGET_INTERVAL_S

    @property
    def internal_topic(self) -> str:
        """Stage one's pod costs and markers, re-keyed by pod uid for stage two."""
        return f"{self.group_id}.pod-costs"

    @property
    def token_costs_group(self) -> str:
        """Stage two's consumer group (it reads tokens and pod costs; `group_id` is stage
        one's, which reads GPU samples)."""
        return f"{self.group_id}.token-costs"


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
        self.metrics = WorkerMetrics(
            self.registry,
            series_ttl_s=config.stream.retention_s,
            max_series=config.max_metric_series,
        )
        self.pods = PodHistory(max_pods=config.max_pods)
        self.devices = DeviceStage(book, config.stream, self.pods)
        self.pod_stage = PodStage(config.stream, self.pods)
        self.dead_letters = DeadLetterLog(
            horizon_s=config.stream.late_horizon_ms / 1000 + 3600,
            max_keys=config.dead_letter_max_keys,
        )
        self.stopping = asyncio.Event()
        self.runners: list[StageRunner] = []  # stage one's, stage two's: once pods are loaded
        self.sinks: Sinks | None = None
        self.http: HttpEndpoint | None = None
        self._owner_file: Path | None = None
        self._pods_table: PodsTable | None = None
        self.nodes_table: NodesTable | None = None  # node events into node_events
        self.budget_gauges: BudgetGauges | None = None
        if config.budgets is not None:
            self.budget_gauges = BudgetGauges(
                self.store, config.budgets, self.metrics, interval_s=config.budget_interval_s
            )

    @property
    def open_windows(self) -> int:
        return self.devices.open_windows

    def stop(self) -> None:
        self.stopping.set()

    def unhealthy_sinks(self) -> dict[str, dict[str, Any]]:
        """The sinks that failed `unhealthy_after_failures` times in a row, with their last
        error (for /healthz)."""
        return self.sinks.unhealthy() if self.sinks is not None else {}

    async def run(self) -> None:
        """Start in order (schema, topics, dead-letter keys, HTTP, pod metadata, the two
        stages), run until `stop()` or until a loop fails (then raise its error), and shut
        down: the runners' last output is flushed, the clients closed."""
        cfg = self.config
        if not await self._create_schema():
            return  # stopped while ClickHouse was still unreachable
        checkpoints = Checkpoints(self.store, self.stopping)
        await checkpoints.set_ttl(cfg.stream.late_horizon_ms / 1000)
        specs = [*default_topics(cfg.partitions), TopicSpec(cfg.internal_topic, cfg.partitions)]
        await ensure_topics(cfg.kafka, specs)
        producer = make_producer(cfg.kafka)
        await producer.start()
        sinks = self.sinks = Sinks(
            self.store,
            producer,
            self.metrics,
            self.stopping,
            unhealthy_after=cfg.unhealthy_after_failures,
        )
        samples = stage_consumer(cfg.kafka, cfg.group_id, co_partitioned=False)
        token_costs = stage_consumer(cfg.kafka, cfg.token_costs_group, co_partitioned=True)
        pods: PodsTable | None = None
        nodes: NodesTable | None = None
        try:
            counts = await partition_counts(
                cfg.kafka,
                [GPU_SAMPLES_TOPIC, PODS_TOPIC, NODES_TOPIC, DEAD_LETTER_TOPIC, cfg.internal_topic],
            )
            await load_dead_letter_keys(cfg.kafka, counts[DEAD_LETTER_TOPIC], self.dead_letters)
            if cfg.http_port:
                self.http = HttpEndpoint(self, cfg.http_host, cfg.http_port, reads=cfg.reads)
                await self.http.start()
            self._write_owner_file()
            intake = Intake(self.metrics, self.dead_letters)
            handler = PodHandler(self.pods, self.devices, self.pod_stage, intake)
            pods = PodsTable(cfg.kafka, counts[PODS_TOPIC], handler, sinks)
            nodes = self.nodes_table = NodesTable(
                cfg.kafka,
                counts[NODES_TOPIC],
                intake,
                sinks,
                max_clock_skew_s=cfg.stream.max_clock_skew_s,
            )
            if not await pods.catch_up(self.stopping):
                return
            devices = DeviceHandler(
                self.devices,
                intake,
                cfg.internal_topic,
                sample_partitions=counts[GPU_SAMPLES_TOPIC],
                internal_partitions=counts[cfg.internal_topic],
                checkpoints=checkpoints,
                pods=pods,
            )
            token_cost = TokenCostHandler(
                self.pod_stage, intake, cfg.internal_topic, checkpoints, pods
            )
            self._pods_table = pods
            self.runners = [
                StageRunner(
                    name,
                    consumer,
                    stage,
                    sinks,
                    self.metrics,
                    flush_interval_s=cfg.flush_interval_s,
                    max_outbox=cfg.max_outbox,
                )
                for name, consumer, stage in (
                    ("devices", samples, devices),
                    ("token-costs", token_costs, token_cost),
                )
            ]
            device_runner, token_runner = self.runners
            await samples.start()
            samples.subscribe([GPU_SAMPLES_TOPIC], listener=device_runner.listener())
            await token_costs.start()
            token_costs.subscribe(
                [TOKENS_TOPIC, cfg.internal_topic], listener=token_runner.listener()
            )
            loops = {
                "pods": pods.follow(self.stopping),
                "nodes": nodes.follow(self.stopping),  # nothing waits for it
                "devices": device_runner.run(self.stopping),
                "token-costs": token_runner.run(self.stopping),
                "seal": self._seal_loop(),
            }
            if self.budget_gauges is not None:
                loops["budgets"] = self.budget_gauges.run(self.stopping)
            if cfg.exit_when_idle_s is not None:
                loops["exit-when-idle"] = self._exit_when_idle(cfg.exit_when_idle_s)
            await supervise(loops, self.stopping, STOP_GRACE_S)
        finally:
            self.stopping.set()
            for runner in self.runners:
                with contextlib.suppress(Exception):
                    await runner.final_flush()
            for consumer in (samples, token_costs):
                with contextlib.suppress(Exception):
                    await consumer.stop()
            for table in (pods, nodes):
                if table is not None:
                    with contextlib.suppress(Exception):
                        await table.stop()
            await producer.stop()
            if self.http is not None:
                await self.http.stop()
            self._remove_owner_file()

    async def _create_schema(self) -> bool:
        """The tables, before anything is consumed. A ClickHouse not reachable yet (a worker
        started or restarted during an outage) is waited for with the sinks' backoff, as they
        would wait; a permanent error ends the run. False if stopped while waiting."""
        backoff = Backoff(self.stopping)
        while True:
            try:
                await asyncio.to_thread(self.store.create_schema)
                return True
            except StoreError as exc:
                if not exc.retriable:
                    raise
                log.warning(
                    "ClickHouse unreachable at start, retrying in %.1f s: %s", backoff.delay_s, exc
                )
            if not await backoff.wait():
                return False

    async def _seal_loop(self) -> None:
        """Roll up whole hours that no correction can reach any more (see streams.rollups),
        and forget the pod metadata no window that can still change reads."""
        stream = self.config.stream
        reach_ms = stream.late_horizon_ms + stream.window_ms + stream.grace_ms
        margin_s = reach_ms // 1000 + 1
        while not self.stopping.is_set():
            watermark = self.devices.watermark.value(time.time())
            self._report_state()
            if watermark is not None:
                self.pods.forget_before(watermark - reach_ms)
                try:
                    await asyncio.to_thread(seal_hours, self.store, watermark, retention_s=margin_s)
                except GpuledgerError as exc:
                    log.warning("sealing hourly rollups failed, retrying later: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=SEAL_EVERY_S)

    def _report_state(self) -> None:
        """Bound the metric series and report the sizes of the in-memory structures."""
        now = time.time()
        if self._pods_table is not None:
            self._pods_table.forget(self.pods.knows)
        self.dead_letters.expire(now)
        self.metrics.prune(now)
        self.metrics.worker_state(
            {
                "open_windows": self.devices.open_windows,
                "closed_windows": self.devices.closed_windows,
                "pod_slots": self.pod_stage.slots,
                "pods": len(self.pods),
                "pod_events": self.pods.held_events,
                "dead_letter_keys": len(self.dead_letters),
            },
            {"pods": self.pods.evicted, "dead_letter_keys": self.dead_letters.evicted},
        )

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
        device_runner, token_runner = self.runners
        await device_runner.drain()
        deadline = time.monotonic() + 10
        before = token_runner.records
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            if token_runner.records > before and time.monotonic() - token_runner.last_record_s > 1:
                break
        await token_runner.drain()

    def _write_owner_file(self) -> None:
        """In an embedded folder: this process holds it, and `url` is where it serves reads
        (absent when it serves none); `metrics_url`, where /metrics and /healthz are."""
        if not self.store.embedded:
            return
        owner: dict[str, Any] = {"pid": os.getpid()}
        if self.http is not None:
            if self.http.reads_url is not None:
                owner["url"] = self.http.reads_url
            owner["metrics_url"] = self.http.url
        folder = Path(urlsplit(self.store.dsn).path)
        with contextlib.suppress(OSError):
            self._owner_file = folder / OWNER_FILE
            self._owner_file.write_bytes(orjson.dumps(owner))

    def _remove_owner_file(self) -> None:
        if self._owner_file is not None:
            with contextlib.suppress(OSError):
                self._owner_file.unlink()


async def supervise(
    loops: Mapping[str, Coroutine[Any, Any, None]], stopping: asyncio.Event, grace_s: float
) -> None:
    """Run `loops` as one task group until `stopping` is set, then give them `grace_s` to
    finish (each checks `stopping` between steps) and cancel those still running.

    A loop that raises stops the others (the group cancels them) and this raises its error; a
    loop that returns while `stopping` is not set is an error too: no worker runs on part of
    its loops, and none waits on a loop that is gone."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(_until_stopped(name, loop, stopping), name=name)
                for name, loop in loops.items()
            ]
            await stopping.wait()
            _, late = await asyncio.wait(tasks, timeout=grace_s)
            for task in late:
                log.warning("%s did not stop within %.0f s; cancelled", task.get_name(), grace_s)
                task.cancel()
    except BaseExceptionGroup as failed:
        first, *others = failed.exceptions
        for other in others:
            log.error("another worker loop failed too", exc_info=other)
        raise first from None


async def _until_stopped(
    name: str, loop: Coroutine[Any, Any, None], stopping: asyncio.Event
) -> None:
    await loop
    if not stopping.is_set():
        raise RuntimeError(f"the worker's {name} loop ended before the worker was stopped")

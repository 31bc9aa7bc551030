"""One demo run: embedded broker, embedded ClickHouse, the worker (which serves the dashboard),
the simulated cluster and its producers, driven along simulated time; then drain, showback and
the HTML report. The demo process owns its data folder while it runs (design §6).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from prometheus_client import CollectorRegistry

from agents.demo_scenario import demo_scenario
from agents.scenario import Scenario, SimClock
from gpuledger.demo.bills import demo_bill, write_bill
from gpuledger.demo.planning import DemoPlanning, demo_planning
from gpuledger.demo.producers import PublishedCounts, SimulatedProducers
from gpuledger.embedded_broker import EmbeddedBroker
from runtime.errors import ConfigError
from runtime.kafka import KafkaSettings
from streams.billing.importer import ImportOptions, import_bills
from streams.pricing import PriceBook
from streams.reports.budgets import load_budgets
from streams.reports.html_report import html_report
from streams.reports.params import Period
from streams.reports.showback import ShowbackReport, showback
from streams.rows import Row
from streams.store import OWNER_FILE, ClickHouseStore
from streams.worker.app import Worker, WorkerConfig
from streams.worker.device_stage import StreamSettings

DEMO_MARKER = ".gpuledger-demo"  # a folder holding it was made by the demo and may be reset
SETTLE_QUIET_S = 1.5  # the worker has read everything once no input arrived for this long
SETTLE_TIMEOUT_S = 120.0
HOUR_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class DemoConfig:
    minutes: float
    speed: float
    data_dir: Path
    report_path: Path
    price_book: PriceBook
    stream: StreamSettings = field(default_factory=StreamSettings)
    http_host: str = "127.0.0.1"
    http_port: int = 9108  # taken: a free port instead
    sample_interval_s: float = 1.0
    scrape_interval_s: float = 15.0

    @property
    def duration_s(self) -> float:
        return self.minutes * 60.0

    @property
    def dsn(self) -> str:
        return f"chdb://{self.data_dir}"


@dataclass
class DemoProgress:
    """What the console shows while the demo runs; written by the run, read by the display."""

    phase: str = "starting"
    sim_done_s: float = 0.0
    sim_total_s: float = 0.0
    published: PublishedCounts = field(default_factory=PublishedCounts)
    rows_written: int = 0
    dashboard_url: str | None = None


@dataclass(frozen=True, slots=True)
class DemoOutcome:
    scenario: Scenario
    period: Period
    sim_done_s: float
    interrupted: bool
    published: PublishedCounts
    rows_written: int
    by_team: ShowbackReport
    by_model: ShowbackReport
    report_path: Path
    dsn: str
    bill: DemoBill | None = None
    planning: DemoPlanning | None = None


@dataclass(frozen=True, slots=True)
class DemoBill:
    """The provider bill the demo generates for its nodes' hours, imported and trued up."""

    path: Path
    period: Period  # the whole hours the bill covers
    gpu_effective_cost: Decimal  # the bill's EffectiveCost of GPU instances, unmetered included
    unmetered_cost: Decimal
    by_team: ShowbackReport  # the billed basis


def import_demo_bill(store: ClickHouseStore, start_ms: int, end_ms: int, path: Path) -> DemoBill:
    """Write the demo cluster's AWS bill (FOCUS 1.2) for the hours of [start, end), import it
    as `gpuledger bill import` does, and show the billed basis by team."""
    first = start_ms - start_ms % HOUR_MS
    last = max(first + HOUR_MS, -(-end_ms // HOUR_MS) * HOUR_MS)
    rows = demo_bill(range(first, last, HOUR_MS))
    write_bill(path, rows, "csv")
    result = import_bills(store, [path], ImportOptions())
    gpu = sum((s.gpu_effective_cost for s in result.slices), Decimal(0))
    unmetered = sum((s.unmetered_cost for s in result.slices), Decimal(0))
    # The charge periods of the bill's resources: its daily lines (data transfer) span the day.
    charged = [r for r in rows if r.get("ResourceId")]
    period = Period(
        min(int(r["ChargePeriodStart"].timestamp() * 1000) for r in charged),
        max(int(r["ChargePeriodEnd"].timestamp() * 1000) for r in charged),
    )
    return DemoBill(path, period, gpu, unmetered, showback(store, period, "team", basis="billed"))


class CountingStore(ClickHouseStore):
    """The store the worker writes through, counting rows for the progress display."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self.rows_written = 0
        self._count_lock = threading.Lock()

    def insert_rows(self, rows: Iterable[Row], *, dedup_token: str | None = None) -> int:
        written = super().insert_rows(rows, dedup_token=dedup_token)
        with self._count_lock:
            self.rows_written += written
        return written


def prepare_data_dir(folder: Path) -> None:
    """A fresh folder: new, empty, or one an earlier demo left (reset). Anything else is kept
    and refused, so a demo never wipes data it did not write."""
    if folder.exists():
        if not folder.is_dir():
            raise ConfigError(f"--data {folder} is a file, not a folder")
        entries = list(folder.iterdir())
        if entries and not (folder / DEMO_MARKER).exists():
            raise ConfigError(
                f"--data {folder} holds data the demo did not write; "
                "choose another folder or remove it"
            )
        holder = _live_owner(folder)
        if holder is not None:
            pid, url = holder
            raise ConfigError(
                f"--data {folder} is in use by another gpuledger demo (pid {pid}, {url}); "
                "stop it or choose another folder"
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / DEMO_MARKER).write_text("made by `gpuledger demo`; reset by the next run\n")


def _live_owner(folder: Path) -> tuple[int, str] | None:
    try:
        owner = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
        pid = int(owner["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid, str(owner.get("url", ""))


def free_or_other_port(host: str, port: int) -> int:
    """`port` if it can be bound on `host`, else one the system picks."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return port
        except OSError:
            s.bind((host, 0))
            chosen: int = s.getsockname()[1]
            return chosen


class DemoRun:
    def __init__(self, config: DemoConfig, progress: DemoProgress | None = None) -> None:
        self.config = config
        self.progress = progress or DemoProgress()
        # Simulated time ends now: every window lies in the past, and the live dashboard's
        # default period (this month to now) shows it.
        window_s = config.stream.allocation.window_s
        start = math.floor((time.time() - config.duration_s) / window_s) * window_s
        self.scenario = demo_scenario(float(start), config.duration_s)
        self.clock = SimClock(float(start))
        self.progress.sim_total_s = config.duration_s
        self._prepared = False

    def prepare(self) -> None:
        """Reset the data folder (or refuse it) before anything starts."""
        prepare_data_dir(self.config.data_dir)
        self._prepared = True

    async def run(self, interrupted: asyncio.Event) -> DemoOutcome:
        cfg = self.config
        progress = self.progress
        if not self._prepared:
            self.prepare()
        progress.phase = "starting the embedded broker"
        broker = EmbeddedBroker()
        await asyncio.to_thread(broker.start)
        store: CountingStore | None = None
        worker_task: asyncio.Task[None] | None = None
        producers: SimulatedProducers | None = None
        try:
            progress.phase = "opening embedded ClickHouse"
            store = await asyncio.to_thread(CountingStore, cfg.dsn)
            kafka = KafkaSettings(bootstrap=broker.bootstrap)
            worker = Worker(
                WorkerConfig(
                    kafka=kafka,
                    clickhouse_dsn=cfg.dsn,
                    stream=cfg.stream,
                    http_host=cfg.http_host,
                    http_port=free_or_other_port(cfg.http_host, cfg.http_port),
                    flush_interval_s=0.5,
                ),
                cfg.price_book,
                store=store,
                registry=CollectorRegistry(),
            )
            progress.phase = "starting the worker"
            worker_task = asyncio.create_task(worker.run(), name="worker")
            await _until(lambda: len(worker.runners) == 2, worker_task)
            if worker.http is not None:
                progress.dashboard_url = worker.http.reads_url
            progress.phase = "starting the simulated cluster"
            producers = SimulatedProducers(
                self.scenario,
                self.clock,
                kafka,
                sample_interval_s=cfg.sample_interval_s,
                scrape_interval_s=cfg.scrape_interval_s,
            )
            progress.published = producers.counts
            await producers.start()
            await producers.wait_synced()
            progress.phase = "running"
            await self._simulate(producers, store, worker_task, interrupted)
            progress.phase = "flushing the producers"
            await producers.stop()
            producers = None
            progress.phase = "emitting the last windows"
            await _settle(worker, worker_task)
            await worker.drain()
            worker.stop()
            await worker_task
            progress.rows_written = store.rows_written
            progress.phase = "writing the reports"
            return await asyncio.to_thread(self._report, store, interrupted.is_set())
        finally:
            if producers is not None:
                with contextlib.suppress(Exception):
                    await producers.stop()
            if worker_task is not None and not worker_task.done():
                worker_task.cancel()
                with contextlib.suppress(BaseException):
                    await worker_task
            if store is not None:
                store.close()
            await asyncio.to_thread(broker.stop)

    async def _simulate(
        self,
        producers: SimulatedProducers,
        store: CountingStore,
        worker_task: asyncio.Task[None],
        interrupted: asyncio.Event,
    ) -> None:
        """Step simulated time one sample interval at a time, `speed` times faster than wall
        time; a step that falls behind is not skipped (the data stays whole, it only takes
        longer)."""
        cfg = self.config
        started = time.monotonic()
        t = 0.0
        while t + cfg.sample_interval_s <= cfg.duration_s + 1e-9 and not interrupted.is_set():
            t += cfg.sample_interval_s
            await producers.step(t)
            self.progress.sim_done_s = t
            self.progress.rows_written = store.rows_written
            if worker_task.done():
                worker_task.result()  # raises what stopped it
                raise RuntimeError("the worker stopped during the demo")
            delay = started + t / cfg.speed - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(interrupted.wait(), timeout=delay)
            else:
                await asyncio.sleep(0)  # let the publishers and the worker run

    def _report(self, store: ClickHouseStore, interrupted: bool) -> DemoOutcome:
        cfg = self.config
        start_ms = int(self.scenario.start_unix_s * 1000)
        period = Period(start_ms, max(int(time.time() * 1000), start_ms))
        by_team = showback(store, period, "team")
        by_model = showback(store, period, "model")
        cfg.report_path.parent.mkdir(parents=True, exist_ok=True)
        planning = demo_planning(
            store, period, period.end_ms, by_model, cfg.price_book, cfg.report_path.parent
        )
        html = html_report(
            store, period, as_of_ms=period.end_ms, budgets=load_budgets(planning.budgets_path)
        )
        cfg.report_path.write_text(html, encoding="utf-8")
        end_ms = start_ms + int(self.progress.sim_done_s * 1000)
        bill = import_demo_bill(
            store, start_ms, end_ms, cfg.report_path.with_name("gpuledger-demo-bill.csv")
        )
        return DemoOutcome(
            scenario=self.scenario,
            period=period,
            sim_done_s=self.progress.sim_done_s,
            interrupted=interrupted,
            published=self.progress.published,
            rows_written=self.progress.rows_written,
            by_team=by_team,
            by_model=by_model,
            report_path=cfg.report_path,
            dsn=cfg.dsn,
            bill=bill,
            planning=planning,
        )


async def _until(ready: Callable[[], bool], task: asyncio.Task[None]) -> None:
    while not ready():
        if task.done():
            task.result()
            raise RuntimeError("the worker stopped while starting")
        await asyncio.sleep(0.05)


async def _settle(worker: Worker, task: asyncio.Task[None]) -> None:
    """Wait until the worker has read every event the producers sent."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        if task.done():
            task.result()
            raise RuntimeError("the worker stopped before the demo's events were read")
        if all(r.quiet_for_s() >= SETTLE_QUIET_S for r in worker.runners):
            return
        await asyncio.sleep(0.1)

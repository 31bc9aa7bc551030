"""Window-state memory and restart recovery of the deployable gpuledger worker, on a real Kafka.

The worker under test is `gpuledger worker` itself, in its own process, with its default
settings (60 s windows, 10 s grace, 1 h retention, `--retention-s` to change it) and the
embedded ClickHouse (`chdb:///<tmp>`), against a real Apache Kafka broker
(tests/kafka_broker.py). The cluster is bench_cluster's: `--nodes` x `--devices-per-node`
devices sampled once a second (default 1,000 x 8 = 8,000 GPU samples per second of cluster time),
and its pods on the pods topic.

1. `--mode memory`: a backlog of `--minutes` of cluster time (event time 1 s per second of
   samples, from a window start), then the worker over it. Every half second the benchmark reads
   the worker's RSS and peak (VmRSS, VmHWM in /proc/<pid>/status) and its progress, the
   `gpuledger_events_total{topic="gpuledger.gpu-samples"}` counter of its /metrics (samples
   decoded and folded into window state; committed offsets would not do, as the worker commits
   only up to the earliest input a retained window still needs). Event minutes processed =
   that count / (devices x 60). The RSS per retained minute is the slope of a least-squares fit
   of RSS against event minutes, from minute 2 to the end of the backlog; the projection to the
   retention is intercept + slope x retention minutes, against the 1.5 GB target
   (MB = 10^6 bytes here). Then, the backlog consumed, it lets the worker close every window
   (idle flush, 30 s) and reads the steady RSS, stops the worker and checks the stored cost.
2. `--mode restart`: live load, event time = wall time: bench_worker.py's live producer, in a
   child process, samples the cluster once a second (devices samples/s) for `--live-seconds`;
   the worker runs from the first tick. At `--kill-at` s it is SIGKILLed and started again at once
   with the same group; the benchmark measures the wall time from that restart until the
   worker is current again: its consumer lag on gpuledger.gpu-samples (its own
   `gpuledger_consumer_lag_messages` gauges, summed over the partitions: records between its
   position and the end) first under one window of samples (60 s x devices), and then under
   10 s of samples, and how many records the restart re-reads (end offsets at the kill minus
   the group's committed offsets then). When the producer ends the worker drains and exits
   (`--exit-when-idle`), and the cost stored in ClickHouse (`gpu_cost_windows FINAL`, in total
   and per device) is compared with the price book's cost of every sample sent. `--baseline`
   also runs the same live load without a kill, on a fresh broker and store, and compares.
   The producer's achieved rate is printed; below the target rate the run says so.

    .venv/bin/python tests/benchmarks/bench_state.py --mode memory [--minutes 8] \
        [--nodes 1000] [--devices-per-node 8] [--retention-s 3600] [--out state-memory.json]
    .venv/bin/python tests/benchmarks/bench_state.py --mode restart [--live-seconds 240] \
        [--kill-at 150] [--baseline] [--out state-restart.json]

Type-check with `MYPYPATH=tests .venv/bin/mypy tests/benchmarks/bench_state.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import GroupCoordinatorNotAvailableError
from rich.console import Console
from rich.table import Table

from schemas.events import GPU_SAMPLES_TOPIC
from streams.pricing import EXAMPLE_PRICE_BOOK, load_price_book
from streams.rollups import HORIZON_NAME, floor_hour
from streams.store import ClickHouseStore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_cluster import T0_MS, VARIANTS, Cluster
from bench_worker import cpu_s, prepare, produce_backlog, save
from kafka_broker import DEFAULT_LIBS_DIR, KafkaBroker, fetch_kafka_libs

BENCH_WORKER = Path(__file__).resolve().with_name("bench_worker.py")
GPULEDGER = Path(sys.executable).with_name("gpuledger")
PARTITIONS = 3  # the worker's default --partitions
GROUP = "gpuledger-worker"  # its default --group-id
WINDOW_S = 60  # its default --window-s
IDLE_FLUSH_S = 30  # its default --idle-flush-s
SAMPLE_S = 0.5  # memory mode: one RSS and progress reading
SETTLE_S = IDLE_FLUSH_S + 15  # after the backlog: every window closed and flushed
FIT_FROM_MIN = 2.0
TARGET_MB = 1500.0  # 1.5 GB
EXIT_WHEN_IDLE_S = 20.0
MB = 10**6


# --------------------------------------------------------------------------- the worker process


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class Scrape:
    events: float  # gpuledger_events_total of the GPU-samples topic
    lag: dict[int, float]  # gpuledger_consumer_lag_messages per GPU-samples partition
    open_windows: float


def parse_metrics(text: str) -> Scrape:
    events, open_windows, lag = 0.0, 0.0, {}
    events_prefix = f'gpuledger_events_total{{topic="{GPU_SAMPLES_TOPIC}"}} '
    for line in text.splitlines():
        if line.startswith(events_prefix):
            events = float(line.rsplit(" ", 1)[1])
        elif line.startswith("gpuledger_open_windows "):
            open_windows = float(line.rsplit(" ", 1)[1])
        elif line.startswith("gpuledger_consumer_lag_messages{") and GPU_SAMPLES_TOPIC in line:
            labels, value = line.rsplit(" ", 1)
            partition = labels.split('partition="', 1)[1].split('"', 1)[0]
            lag[int(partition)] = float(value)
    return Scrape(events, lag, open_windows)


class WorkerProcess:
    """`gpuledger worker` as a child process, with its /metrics on a port of its own."""

    def __init__(
        self,
        bootstrap: str,
        dsn: str,
        retention_s: float,
        log_path: Path,
        *,
        exit_when_idle_s: float | None,
    ) -> None:
        self.port = free_port()
        self.log_path = log_path
        command = [
            str(GPULEDGER), "worker", "--kafka", bootstrap, "--clickhouse", dsn,
            "--group-id", GROUP, "--partitions", str(PARTITIONS),
            "--metrics-port", str(self.port), "--retention-s", str(retention_s),
            "--log-level", "WARNING",
        ]  # fmt: skip
        if exit_when_idle_s is not None:
            command += ["--exit-when-idle", str(exit_when_idle_s)]
        self._log: IO[bytes] = log_path.open("ab")
        self.proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.started_s = time.monotonic()
        self.cpu_start = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def memory_mb(self) -> tuple[float, float] | None:
        """(VmRSS, VmHWM) in MB, None once the process is gone."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        fields = {}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024 / MB  # kB (KiB) -> MB
        if len(fields) < 2:
            return None  # a zombie has no memory lines
        return fields["VmRSS"], fields["VmHWM"]

    def cpu(self) -> float:
        try:
            return cpu_s(self.pid)
        except OSError:
            return 0.0

    async def scrape(self) -> Scrape | None:
        def get() -> Scrape | None:
            url = f"http://127.0.0.1:{self.port}/metrics"
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    return parse_metrics(answer.read().decode())
            except OSError:
                return None  # not serving yet, or gone

        return await asyncio.to_thread(get)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    async def wait(self, timeout_s: float) -> int | None:
        deadline = time.monotonic() + timeout_s
        while self.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return self.proc.poll()

    async def stop(self, timeout_s: float = 120) -> int:
        """SIGTERM (the worker flushes and exits), SIGKILL if it does not within timeout_s."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        code = await self.wait(timeout_s)
        if code is None:
            self.kill()
        self._log.close()
        return self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def failed(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"the worker exited ({self.proc.returncode}) {what}; its log:\n{self.log_tail()}"
        )


async def store_totals(dsn: str) -> dict[str, Any]:
    """Cost stored per device, read in a child process once the worker has exited (one process
    holds one embedded store)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--query-store", dsn, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await child.communicate()
    if child.returncode:
        raise RuntimeError(f"reading the store failed ({child.returncode})")
    result: dict[str, Any] = orjson.loads(out)
    return result


async def preset_horizon(dsn: str, from_ms: int) -> None:
    """Set the hourly rollups' horizon to the hour of the first sample, in a child process.

    `seal_hours` takes the earliest window of gpu_cost_windows and cost_per_token_windows as
    its start; with no token data the latter's min() is 0 (ClickHouse's default for an empty
    set, and `least` keeps it), so the worker would walk from 1970 to now in one-day INSERT ...
    SELECTs, a core busy for tens of minutes and a stop that waits for it. The horizon it would
    start from without that is the first window's hour: written here, the seal loop does what
    it would do without the bug, and nothing else changes."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--preset-horizon", dsn, str(from_ms)
    )
    if await child.wait():
        raise RuntimeError(f"presetting the rollup horizon failed ({child.returncode})")


def write_horizon(dsn: str, from_ms: int) -> None:
    store = ClickHouseStore(dsn)
    store.create_schema()  # as the worker does at start; it is idempotent
    store.command(
        f"INSERT INTO {store.database}.rollup_horizon (name, sealed_until_ms, version) "
        f"VALUES ('{HORIZON_NAME}', {floor_hour(from_ms)}, {time.time_ns()})"
    )
    store.close()


def query_store(dsn: str) -> dict[str, Any]:
    store = ClickHouseStore(dsn)
    table = f"{store.database}.gpu_cost_windows"
    total, rows = store.query_rows(f"SELECT sum(cost_usd), count() FROM {table} FINAL")[0]
    per_device = store.query_rows(
        f"SELECT device_uuid, sum(cost_usd) FROM {table} FINAL GROUP BY device_uuid"
    )
    store.close()
    return {
        "cost_usd": str(total),
        "rows": int(rows),
        "devices": {str(uuid): str(cost) for uuid, cost in per_device},
    }


def compare(stored: dict[str, Any], expected: dict[str, Decimal]) -> dict[str, Any]:
    """Stored totals (from `store_totals`) against the expected cost per device."""
    got = {uuid: Decimal(cost) for uuid, cost in stored["devices"].items()}
    total_expected = sum(expected.values(), Decimal(0))
    total = Decimal(stored["cost_usd"])
    diffs = {u: got.get(u, Decimal(0)) - expected.get(u, Decimal(0)) for u in {*got, *expected}}
    wrong = {u: d for u, d in diffs.items() if d}
    return {
        "cost_usd": str(total),
        "expected_cost_usd": str(total_expected),
        "difference_usd": usd(total - total_expected),
        "identical": total == total_expected and not wrong,
        "rows": stored["rows"],
        "devices_stored": len(got),
        "devices_expected": len(expected),
        "devices_different": len(wrong),
        "max_device_difference_usd": usd(max(wrong.values(), key=abs)) if wrong else "0",
    }


def usd(amount: Decimal) -> str:
    return "0" if amount == 0 else f"{amount.normalize():f}"


def expected_per_device(cluster: Cluster, ticks: int) -> dict[str, Decimal]:
    """Cost of ticks 0..ticks-1 of every device (tick t uses the device's variant t % VARIANTS)."""
    out = {}
    for device in cluster.devices:
        cycles, rest = divmod(ticks, VARIANTS)
        costs = device.sample_costs_usd
        out[device.uuid] = sum(costs, Decimal(0)) * cycles + sum(costs[:rest], Decimal(0))
    return out


# --------------------------------------------------------------------------- memory


def fit(points: list[tuple[float, float]]) -> dict[str, Any]:
    """Least squares of RSS (MB) against event minutes processed."""
    if len({x for x, _ in points}) < 2:
        return {"points": len(points), "slope_mb_per_min": None, "intercept_mb": None}
    xs, ys = zip(*points, strict=True)
    slope, intercept = statistics.linear_regression(xs, ys)
    r = statistics.correlation(xs, ys) if len(set(ys)) > 1 else 0.0
    return {
        "points": len(points),
        "from_min": min(xs),
        "to_min": max(xs),
        "slope_mb_per_min": slope,
        "intercept_mb": intercept,
        "r_squared": r * r,
    }


async def memory_mode(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    book = load_price_book(EXAMPLE_PRICE_BOOK)
    cluster = Cluster(args.nodes, args.devices_per_node, PARTITIONS, book)
    devices = len(cluster.devices)
    seconds = args.minutes * 60
    total = devices * seconds
    out: dict[str, Any] = {
        "mode": "memory",
        "t0_ms": T0_MS,
        "devices": devices,
        "minutes": args.minutes,
        "retention_s": args.retention_s,
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }
    with (
        tempfile.TemporaryDirectory(prefix="gpuledger-state-", ignore_cleanup_errors=True) as tmp,
        KafkaBroker(DEFAULT_LIBS_DIR) as broker,
    ):
        dsn = f"chdb://{tmp}/chdb"
        await prepare(broker.bootstrap, cluster, PARTITIONS)
        console.log(f"producing {args.minutes} min of backlog: {total:,} samples ...")
        began = time.perf_counter()
        await produce_backlog(broker.bootstrap, cluster, seconds)
        out["backlog"] = {"events": total, "produce_s": time.perf_counter() - began}
        console.log(f"backlog produced in {out['backlog']['produce_s']:.0f} s; starting the worker")
        await preset_horizon(dsn, T0_MS)
        worker = WorkerProcess(
            broker.bootstrap, dsn, args.retention_s, Path(tmp) / "worker.log", exit_when_idle_s=None
        )
        samples: list[dict[str, float]] = []
        first_s = consumed_s = None
        next_log = 1.0
        try:
            while True:
                if not worker.alive():
                    raise worker.failed("during the backlog")
                scrape = await worker.scrape()
                memory = worker.memory_mb()
                now = time.monotonic()
                if scrape is not None and memory is not None:
                    minutes = scrape.events / (devices * 60)
                    samples.append(
                        {
                            "t_s": now - worker.started_s,
                            "event_min": minutes,
                            "rss_mb": memory[0],
                            "hwm_mb": memory[1],
                            "open_windows": scrape.open_windows,
                        }
                    )
                    if first_s is None and scrape.events:
                        first_s, worker.cpu_start = now, worker.cpu()
                    if minutes >= next_log:
                        console.log(f"{minutes:.2f} event-min processed, RSS {memory[0]:,.0f} MB")
                        next_log = int(minutes) + 1.0
                    if consumed_s is None and scrape.events >= total:
                        consumed_s = now
                        out["consumed"] = {
                            "s": now - (first_s or now),
                            "rss_mb": memory[0],
                            "worker_cores": (worker.cpu() - worker.cpu_start)
                            / max(now - (first_s or now), 1e-9),
                        }
                        console.log(f"backlog consumed; {SETTLE_S} s for every window to close")
                if consumed_s is not None and now - consumed_s >= SETTLE_S:
                    break
                if now - worker.started_s > 1800:
                    raise RuntimeError(f"the backlog was not consumed in 30 min: {samples[-1:]}")
                await asyncio.sleep(SAMPLE_S)
        finally:
            code = await worker.stop()
        out["worker_exit_code"] = code
        out["samples"] = samples
        assert consumed_s is not None
        done_t = consumed_s - worker.started_s
        during = [s for s in samples if s["t_s"] <= done_t]
        points = [(s["event_min"], s["rss_mb"]) for s in during if s["event_min"] >= FIT_FROM_MIN]
        out["fit"] = result = fit(points)
        if result["slope_mb_per_min"] is not None:
            retained_min = args.retention_s / 60
            projected = result["intercept_mb"] + result["slope_mb_per_min"] * retained_min
            out["projection"] = {
                "retention_min": retained_min,
                "rss_mb": projected,
                "target_mb": TARGET_MB,
                "under_target": projected < TARGET_MB,
            }
        settled = [s for s in samples if s["t_s"] >= done_t + SETTLE_S - 10]
        out["steady"] = {
            "rss_mb": statistics.fmean(s["rss_mb"] for s in settled),
            "open_windows": settled[-1]["open_windows"],
            "hwm_mb": max(s["hwm_mb"] for s in samples),
        }
        console.log("reading the stored cost ...")
        out["cost"] = compare(await store_totals(dsn), expected_per_device(cluster, seconds))
    out["loadavg_end"] = os.getloadavg()
    return out


def report_memory(out: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"gpuledger worker state memory: {out['devices']:,} devices, {out['minutes']} min "
        f"backlog, retention {out['retention_s']:.0f} s, {out['cpus']} CPUs"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    consumed = out["consumed"]
    table.add_row(
        "backlog consumed in",
        f"{consumed['s']:.0f} s ({out['devices'] * out['minutes'] * 60 / consumed['s']:,.0f} "
        f"events/s, {consumed['worker_cores']:.2f} cores)",
    )
    fitted = out["fit"]
    if fitted["slope_mb_per_min"] is None:
        table.add_row("RSS per retained minute", "not enough points")
    else:
        table.add_row(
            f"RSS per event minute (fit, minutes {fitted['from_min']:.1f}-{fitted['to_min']:.1f}, "
            f"{fitted['points']} points)",
            f"{fitted['slope_mb_per_min']:,.1f} MB/min (r² {fitted['r_squared']:.3f})",
        )
        table.add_row("intercept", f"{fitted['intercept_mb']:,.0f} MB")
        projection = out["projection"]
        verdict = "under" if projection["under_target"] else "OVER"
        table.add_row(
            f"projected RSS at the retention ({projection['retention_min']:.0f} min)",
            f"{projection['rss_mb']:,.0f} MB: {verdict} the {TARGET_MB:,.0f} MB target",
        )
    table.add_row("RSS when the backlog was consumed", f"{consumed['rss_mb']:,.0f} MB")
    steady = out["steady"]
    table.add_row(
        f"steady RSS, every window closed ({steady['open_windows']:.0f} open)",
        f"{steady['rss_mb']:,.0f} MB",
    )
    table.add_row("peak RSS (VmHWM)", f"{steady['hwm_mb']:,.0f} MB")
    add_cost_rows(table, "stored cost", out["cost"])
    table.add_row(
        "load average start / end", f"{out['loadavg_start'][0]:.2f} / {out['loadavg_end'][0]:.2f}"
    )
    console.print(table)


def add_cost_rows(table: Table, label: str, cost: dict[str, Any]) -> None:
    verdict = "identical" if cost["identical"] else "DIFFERENT"
    table.add_row(
        f"{label} vs the price book",
        f"{verdict}: {Decimal(cost['cost_usd']):,.6f} vs {Decimal(cost['expected_cost_usd']):,.6f}"
        f" USD (difference {cost['difference_usd']})",
    )
    table.add_row(
        f"{label}: devices differing",
        f"{cost['devices_different']} of {cost['devices_expected']} "
        f"(largest {cost['max_device_difference_usd']} USD; {cost['rows']:,} rows)",
    )


# --------------------------------------------------------------------------- restart


async def group_offsets(admin: AIOKafkaAdminClient, tps: list[TopicPartition]) -> dict[int, int]:
    """The group's committed offsets (0 where none: the worker reads from the earliest)."""
    try:
        committed = await admin.list_consumer_group_offsets(GROUP, partitions=tps)
    except GroupCoordinatorNotAvailableError:  # the group has not committed yet
        committed = {}
    return {tp.partition: max(committed[tp].offset, 0) if tp in committed else 0 for tp in tps}


async def end_offsets(probe: AIOKafkaConsumer, tps: list[TopicPartition]) -> dict[int, int]:
    return {tp.partition: offset for tp, offset in (await probe.end_offsets(tps)).items()}


async def topic_cost(bootstrap: str, cluster: Cluster, ends: dict[int, int]) -> dict[str, Decimal]:
    """Price-book cost per device of every sample in the topic (when the producer skipped a
    tick, which ticks it sent is known only from the topic)."""
    cost_of = {
        (device.uuid, template["data"]["interval_s"]): cost
        for device in cluster.devices
        for template, cost in zip(device.templates, device.sample_costs_usd, strict=True)
    }
    out = {device.uuid: Decimal(0) for device in cluster.devices}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(GPU_SAMPLES_TOPIC, p) for p in ends]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        left = sum(ends.values())
        while left > 0:
            for records in (await consumer.getmany(timeout_ms=1000, max_records=10_000)).values():
                for msg in records:
                    data = orjson.loads(msg.value)["data"]
                    out[data["device_uuid"]] += cost_of[(data["device_uuid"], data["interval_s"])]
                left -= len(records)
    finally:
        await consumer.stop()
    return out


async def live_run(
    args: argparse.Namespace, cluster: Cluster, console: Console, *, kill_at: float | None
) -> dict[str, Any]:
    devices = len(cluster.devices)
    window_lag, near_lag = devices * WINDOW_S, devices * 10
    out: dict[str, Any] = {"kill_at_s": kill_at}
    with (
        tempfile.TemporaryDirectory(prefix="gpuledger-state-", ignore_cleanup_errors=True) as tmp,
        KafkaBroker(DEFAULT_LIBS_DIR) as broker,
    ):
        dsn = f"chdb://{tmp}/chdb"
        log_path = Path(tmp) / "worker.log"
        await prepare(broker.bootstrap, cluster, PARTITIONS)
        await preset_horizon(dsn, int(time.time() * 1000))  # the producer starts after this
        tps = [TopicPartition(GPU_SAMPLES_TOPIC, p) for p in range(PARTITIONS)]
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        probe = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None)
        await admin.start()
        await probe.start()
        producer = await asyncio.create_subprocess_exec(
            sys.executable, str(BENCH_WORKER), "--live-producer", broker.bootstrap,
            "--nodes", str(args.nodes), "--devices-per-node", str(args.devices_per_node),
            "--live-seconds", str(args.live_seconds), "--partitions", str(PARTITIONS),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert producer.stdout is not None
        produced_json = asyncio.create_task(producer.stdout.read())
        worker: WorkerProcess | None = None
        timeline: list[dict[str, Any]] = []
        try:
            while sum((await end_offsets(probe, tps)).values()) == 0:
                if producer.returncode is not None:
                    raise RuntimeError(f"the producer exited ({producer.returncode})")
                await asyncio.sleep(0.1)
            first_tick_s = time.monotonic()  # the first second of samples is in the topic
            console.log("live: first samples in the topic; starting the worker")
            worker = WorkerProcess(
                broker.bootstrap, dsn, args.retention_s, log_path, exit_when_idle_s=EXIT_WHEN_IDLE_S
            )
            restart: dict[str, Any] | None = None
            while producer.returncode is None:
                if not worker.alive():
                    raise worker.failed("while the producer was running")
                now = time.monotonic()
                if kill_at is not None and restart is None and now - first_tick_s >= kill_at:
                    restart = kill(worker, timeline)
                    killed = worker
                    worker = WorkerProcess(
                        broker.bootstrap, dsn, args.retention_s, log_path,
                        exit_when_idle_s=EXIT_WHEN_IDLE_S,
                    )  # fmt: skip
                    restart["restarted_s"] = worker.started_s
                    restart.update(await restart_offsets(probe, admin, tps, restart))
                    console.log(
                        f"live: worker {killed.pid} killed at {now - first_tick_s:.0f} s "
                        f"(RSS {restart['rss_mb_at_kill']:,.0f} MB), restarted as {worker.pid}; "
                        f"{restart['re_read']:,} records to re-read"
                    )
                scrape = await worker.scrape()
                memory = worker.memory_mb()
                ends = await end_offsets(probe, tps)
                committed = await group_offsets(admin, tps)
                now = time.monotonic()
                point: dict[str, Any] = {
                    "t_s": now - first_tick_s,
                    "pid": worker.pid,
                    "end": sum(ends.values()),
                    "committed_lag": sum(ends[p] - committed[p] for p in ends),
                    "rss_mb": memory[0] if memory else None,
                }
                if scrape is not None:
                    point["events"] = scrape.events
                    point["open_windows"] = scrape.open_windows
                    if len(scrape.lag) == PARTITIONS:
                        point["lag"] = sum(scrape.lag.values())
                timeline.append(point)
                if restart is not None and point.get("events") and "first_record_s" not in restart:
                    restart["first_record_s"] = now - restart["restarted_s"]
                if restart is not None and "lag" in point:
                    since = now - restart["restarted_s"]
                    if "current_window_s" not in restart and point["lag"] < window_lag:
                        restart["current_window_s"] = since
                        console.log(f"live: lag under one window {since:.1f} s after the restart")
                    if (
                        "current_window_s" in restart
                        and "current_10s_s" not in restart
                        and point["lag"] < near_lag
                    ):
                        restart["current_10s_s"] = since
                        restart["events_at_current"] = point["events"]
                        console.log(f"live: lag under 10 s of samples {since:.1f} s after it")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(producer.wait()), timeout=0.5)
            produced: dict[str, Any] = orjson.loads(await produced_json)
            out["producer"] = produced
            console.log(
                f"live: producer done, {produced['events_per_s']:,.0f} samples/s "
                f"({produced['skipped_ticks']} ticks skipped); the worker drains and exits"
            )
            cpu_at_end = worker.cpu()
            code = await worker.wait(EXIT_WHEN_IDLE_S + 150)
            if code is None:
                console.log("live: the worker did not exit when idle; stopping it")
            out["worker_exited_when_idle"] = code is not None
            out["worker_exit_code"] = await worker.stop(60)
            out["worker_cores"] = cpu_at_end / max(time.monotonic() - worker.started_s, 1e-9)
            out["drain_s"] = time.monotonic() - first_tick_s - produced_wall_s(produced)
            ends = await end_offsets(probe, tps)
        finally:
            if worker is not None and worker.alive():
                await worker.stop(30)
            if producer.returncode is None:
                producer.kill()
                await producer.wait()
            await probe.stop()
            await admin.close()
        out["restart"] = restart
        out["timeline"] = timeline
        out["topic_records"] = sum(ends.values())
        ticks = args.live_seconds
        if produced["skipped_ticks"] == 0 and produced["sent"] == devices * ticks == sum(
            ends.values()
        ):
            expected = expected_per_device(cluster, ticks)
        else:
            console.log("live: the producer skipped ticks; pricing the topic's samples ...")
            expected = await topic_cost(broker.bootstrap, cluster, ends)
        console.log("live: reading the stored cost ...")
        stored = await store_totals(dsn)
        out["cost"] = compare(stored, expected)
        out["stored_devices"] = stored["devices"]
    return out


def produced_wall_s(produced: dict[str, Any]) -> float:
    return float(produced["last_ms"] - produced["first_ms"]) / 1000 + 1


def kill(worker: WorkerProcess, timeline: list[dict[str, Any]]) -> dict[str, Any]:
    """SIGKILL the worker; what it had done, as last seen."""
    memory = worker.memory_mb()
    last: dict[str, Any] = next((p for p in reversed(timeline) if "events" in p), {})
    worker.kill()
    return {
        "killed_pid": worker.pid,
        "rss_mb_at_kill": memory[0] if memory else None,
        "hwm_mb_at_kill": memory[1] if memory else None,
        "events_before_kill": last.get("events"),
        "killed_at_s": timeline[-1]["t_s"] if timeline else None,
    }


async def restart_offsets(
    probe: AIOKafkaConsumer,
    admin: AIOKafkaAdminClient,
    tps: list[TopicPartition],
    restart: dict[str, Any],
) -> dict[str, Any]:
    """Read right after the kill (the new worker is still starting): the end offsets and the
    group's committed offsets, whose difference the new worker reads again."""
    ends = await end_offsets(probe, tps)
    committed = await group_offsets(admin, tps)
    return {
        "end_at_kill": {str(p): offset for p, offset in ends.items()},
        "committed_at_kill": {str(p): offset for p, offset in committed.items()},
        "re_read": sum(ends[p] - committed[p] for p in ends),
    }


async def restart_mode(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    book = load_price_book(EXAMPLE_PRICE_BOOK)
    cluster = Cluster(args.nodes, args.devices_per_node, PARTITIONS, book)
    out: dict[str, Any] = {
        "mode": "restart",
        "devices": len(cluster.devices),
        "live_seconds": args.live_seconds,
        "retention_s": args.retention_s,
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }
    console.log(f"live with a kill at {args.kill_at} s: {len(cluster.devices):,} samples/s")
    out["killed"] = await live_run(args, cluster, console, kill_at=args.kill_at)
    save(out, args.out)
    if args.baseline:
        console.log("live without a kill (baseline) ...")
        out["baseline"] = await live_run(args, cluster, console, kill_at=None)
        killed, base = out["killed"].pop("stored_devices"), out["baseline"].pop("stored_devices")
        diffs = [Decimal(killed.get(u, 0)) - Decimal(base.get(u, 0)) for u in {*killed, *base}]
        difference = Decimal(out["killed"]["cost"]["cost_usd"]) - Decimal(
            out["baseline"]["cost"]["cost_usd"]
        )
        out["killed_vs_baseline"] = {
            "identical": difference == 0 and not any(diffs),
            "difference_usd": usd(difference),
            "devices_different": sum(1 for d in diffs if d),
        }
    else:
        out["killed"].pop("stored_devices")
    out["loadavg_end"] = os.getloadavg()
    return out


def report_restart(out: dict[str, Any], console: Console) -> None:
    devices = out["devices"]
    table = Table(
        title=f"gpuledger worker restart: {devices:,} devices live for {out['live_seconds']} s, "
        f"retention {out['retention_s']:.0f} s, {out['cpus']} CPUs"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    runs = [("killed", out["killed"])] + (
        [("baseline", out["baseline"])] if "baseline" in out else []
    )
    for name, run in runs:
        produced = run["producer"]
        rate = produced["events_per_s"]
        keeps_up = rate >= 0.99 * devices and produced["skipped_ticks"] == 0
        table.add_row(
            f"{name}: producer achieved",
            f"{rate:,.0f} samples/s of {devices:,}, {produced['skipped_ticks']} ticks skipped, "
            f"slowest tick {produced['tick_send_s_max']:.2f} s"
            + ("" if keeps_up else ": BELOW THE TARGET RATE"),
        )
        restart = run.get("restart")
        if restart:
            table.add_row(
                f"{name}: killed at",
                f"{restart['killed_at_s']:.0f} s, RSS {restart['rss_mb_at_kill']:,.0f} MB "
                f"(peak {restart['hwm_mb_at_kill']:,.0f} MB)",
            )
            seconds = restart["re_read"] / devices
            table.add_row(
                f"{name}: records re-read after the restart",
                f"{restart['re_read']:,} ({seconds:,.0f} s of samples; committed "
                f"{sum(restart['committed_at_kill'].values()):,} of "
                f"{sum(restart['end_at_kill'].values()):,})",
            )
            for key, what in (
                ("first_record_s", "first record consumed"),
                ("current_window_s", f"lag < one window ({devices * WINDOW_S:,})"),
                ("current_10s_s", f"then lag < 10 s ({devices * 10:,})"),
            ):
                value = restart.get(key)
                table.add_row(
                    f"{name}: restart -> {what}",
                    "not reached" if value is None else f"{value:.1f} s",
                )
        lags = [p["committed_lag"] for p in run["timeline"]]
        table.add_row(
            f"{name}: committed-offset lag, last / max while live",
            f"{lags[-1]:,} / {max(lags):,} records" if lags else "-",
        )
        table.add_row(f"{name}: worker cores (all threads)", f"{run['worker_cores']:.2f}")
        table.add_row(
            f"{name}: drain after the producer, exit code",
            f"{run['drain_s']:.0f} s, {run['worker_exit_code']}",
        )
        add_cost_rows(table, f"{name}: stored cost", run["cost"])
    if "killed_vs_baseline" in out:
        versus = out["killed_vs_baseline"]
        table.add_row(
            "killed vs baseline",
            ("identical" if versus["identical"] else "DIFFERENT")
            + f" (difference {versus['difference_usd']} USD, "
            f"{versus['devices_different']} devices differ)",
        )
    table.add_row(
        "load average start / end", f"{out['loadavg_start'][0]:.2f} / {out['loadavg_end'][0]:.2f}"
    )
    console.print(table)


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("memory", "restart"), default="memory")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--devices-per-node", type=int, default=8)
    parser.add_argument("--minutes", type=int, default=8, help="memory: minutes of backlog")
    parser.add_argument("--live-seconds", type=int, default=240, help="restart: live load")
    parser.add_argument("--kill-at", type=float, default=150, help="restart: SIGKILL after (s)")
    parser.add_argument("--baseline", action="store_true", help="restart: also run without kill")
    parser.add_argument("--retention-s", type=float, default=3600.0, help="worker --retention-s")
    parser.add_argument("--out", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--query-store", metavar="DSN", help=argparse.SUPPRESS)
    parser.add_argument("--preset-horizon", nargs=2, metavar=("DSN", "MS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.preset_horizon:
        write_horizon(args.preset_horizon[0], int(args.preset_horizon[1]))
        return 0
    if args.query_store:
        sys.stdout.buffer.write(orjson.dumps(query_store(args.query_store)))
        return 0
    if args.mode == "restart" and not 0 < args.kill_at < args.live_seconds:
        parser.error("--kill-at must fall within --live-seconds")
    if not DEFAULT_LIBS_DIR.exists():
        fetch_kafka_libs()
    console = Console()
    if args.mode == "memory":
        out = asyncio.run(memory_mode(args, console))
    else:
        out = asyncio.run(restart_mode(args, console))
    out["command"] = " ".join([".venv/bin/python", *sys.argv])
    save(out, args.out)
    (report_memory if args.mode == "memory" else report_restart)(out, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())

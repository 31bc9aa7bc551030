"""Throughput and window latency of one gpuledger worker on a real Kafka broker.

Three figures from one run, on a simulated cluster (default 1,000 nodes x 8 devices, sampled
every second, so 8,000 GPU-sample events per second of cluster time):

1. raw ceiling: a plain aiokafka consumer that `orjson.loads` every value of a backlog;
2. one Worker (in-process, embedded ClickHouse) over the same backlog, from its first record
   to the last one consumed, and to every row durable (ClickHouse insert, billing and internal
   topics acknowledged, offsets committed); then the stored cost is checked against the book.
   Raw and worker runs alternate (`--rounds` worker runs, each a fresh consumer group, with a
   raw run before and after each): each worker run is compared with the mean of the two raw
   runs around it, as this machine's speed drifts within a run; the headline is the median;
3. live: the cluster sampled once a second (event time = wall time) by a producer in a child
   process, a fresh broker and worker with short windows; for each window, the wall time from
   window end + grace (the earliest close the watermark allows) to its rows being visible.

    .venv/bin/python tests/benchmarks/bench_worker.py [--nodes 1000] [--seconds 30] \
        [--live-seconds 40] [--out worker-bench.json] [--profile worker.prof --no-live]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import logging
import math
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.table import Table

from runtime.kafka import KafkaSettings, default_topics, ensure_topics
from schemas.events import (
    GPU_SAMPLES_TOPIC,
    PODS_TOPIC,
)
from streams.allocation import AllocationSettings
from streams.pricing import EXAMPLE_PRICE_BOOK, load_price_book
from streams.store import ClickHouseStore
from streams.worker.app import Worker, WorkerConfig, tune_garbage_collector
from streams.worker.device_stage import StreamSettings
from streams.worker.runner import FETCH_MAX_RECORDS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_cluster import T0_MS, VARIANTS, Cluster, Record
from kafka_broker import DEFAULT_LIBS_DIR, KafkaBroker, fetch_kafka_libs

TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- Kafka


def fast_producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=512 * 1024, acks=1
    )


async def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes, bytes]]) -> None:
    producer = fast_producer(bootstrap)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def produce_backlog(bootstrap: str, cluster: Cluster, seconds: int) -> None:
    producer = fast_producer(bootstrap)
    await producer.start()
    try:
        futures: list[asyncio.Future[Any]] = []
        for s in range(seconds):
            futures += await send_batches(
                producer, GPU_SAMPLES_TOPIC, cluster.second(s, T0_MS + 1000 * s)
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def send_batches(
    producer: AIOKafkaProducer, topic: str, records: Iterable[Record]
) -> list[asyncio.Future[Any]]:
    """Append records to per-partition batches and send each batch when full.

    aiokafka's per-message `send` (and its pure-Python murmur2) costs tens of microseconds;
    batches keep the producer, which stands in for 1,000 agents, off the worker's CPU."""
    builders: dict[int, Any] = {}
    futures = []
    for partition, key, value in records:
        builder = builders.get(partition) or builders.setdefault(partition, producer.create_batch())
        if builder.append(timestamp=None, key=key, value=value) is None:
            futures.append(await producer.send_batch(builder, topic, partition=partition))
            builder = builders[partition] = producer.create_batch()
            builder.append(timestamp=None, key=key, value=value)
    for partition, builder in builders.items():
        if builder.record_count():
            futures.append(await producer.send_batch(builder, topic, partition=partition))
    return futures


async def raw_rate(bootstrap: str, partitions: int, total: int) -> float:
    """Events/s of plain aiokafka + orjson over the backlog, excluding the first fetch."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(GPU_SAMPLES_TOPIC, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        count, first = 0, None
        while count < total:
            batch = await consumer.getmany(timeout_ms=200, max_records=FETCH_MAX_RECORDS)
            for records in batch.values():
                for msg in records:
                    orjson.loads(msg.value)
                count += len(records)
            if first is None and count:
                first = (time.perf_counter(), count)
        assert first is not None
        return (count - first[1]) / (time.perf_counter() - first[0])
    finally:
        await consumer.stop()


# --------------------------------------------------------------------------- the worker


def make_worker(
    bootstrap: str,
    store: ClickHouseStore,
    args: argparse.Namespace,
    *,
    live: bool,
    group_id: str = "gpuledger-worker",
) -> Worker:
    window_s, grace_s = (args.live_window_s, args.live_grace_s) if live else (args.window_s, 10.0)
    config = WorkerConfig(
        kafka=KafkaSettings(bootstrap=bootstrap),
        clickhouse_dsn=store.dsn,
        stream=StreamSettings(allocation=AllocationSettings(window_s=window_s), grace_s=grace_s),
        partitions=args.partitions,
        group_id=group_id,
        http_port=0,
        exit_when_idle_s=None,  # the benchmark drains and stops it
        flush_interval_s=1.0,
    )
    return Worker(
        config, load_price_book(EXAMPLE_PRICE_BOOK), store=store, registry=CollectorRegistry()
    )


def events_counted(worker: Worker) -> float:
    """GPU samples the worker decoded and used, as its metrics count them."""
    labels = {"topic": GPU_SAMPLES_TOPIC}
    return worker.registry.get_sample_value("gpuledger_events_total", labels) or 0.0


def sink_seconds(worker: Worker) -> dict[str, float]:
    """Total seconds the worker spent writing batches, per sink (ClickHouse runs in a thread,
    so a profile of the event loop does not show it)."""
    out = {}
    for sink in ("clickhouse", "kafka"):
        labels = {"sink": sink}
        total = worker.registry.get_sample_value("gpuledger_sink_batch_seconds_sum", labels)
        count = worker.registry.get_sample_value("gpuledger_sink_batch_seconds_count", labels)
        out[f"{sink}_write_s"] = total or 0.0
        out[f"{sink}_batches"] = count or 0.0
    return out


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def broker_pid() -> int | None:
    me = os.getpid()
    for child in Path(f"/proc/{me}/task/{me}/children").read_text().split():
        if b"kafka" in Path(f"/proc/{child}/cmdline").read_bytes():
            return int(child)
    return None


class CpuMeter:
    """CPU seconds of this process (all threads: the worker, ClickHouse's threads, and the
    benchmark's own queries), of its event-loop thread alone (the worker's Python work: create
    and read it on the loop's thread), and of the broker."""

    def __init__(self) -> None:
        self.broker = broker_pid()
        self.start = self._read()

    def _read(self) -> tuple[float, float, float, float]:
        broker = cpu_s(self.broker) if self.broker else 0.0
        return time.perf_counter(), time.process_time(), time.thread_time(), broker

    def shares(self) -> dict[str, float]:
        """Average cores used since the start (1.0 = one core busy)."""
        wall, own, loop, broker = (b - a for a, b in zip(self.start, self._read(), strict=True))
        return {
            "worker_cores": own / wall,
            "loop_cores": loop / wall,
            "broker_cores": broker / wall,
        }


async def worker_throughput(
    bootstrap: str, store: ClickHouseStore, total: int, args: argparse.Namespace, group_id: str
) -> dict[str, Any]:
    worker = make_worker(bootstrap, store, args, live=False, group_id=group_id)
    profile = cProfile.Profile() if args.profile else None
    if profile:
        profile.enable()
    task = asyncio.create_task(worker.run())
    first: tuple[float, int] | None = None
    meter: CpuMeter | None = None
    records = 0
    while True:
        if task.done():
            await task
            raise RuntimeError(f"the worker stopped after {records:,} of {total:,} records")
        records = worker.runners[0].records if worker.runners else 0
        if first is None and records:
            first, meter = (time.perf_counter(), records), CpuMeter()
        if records >= total:
            consumed_s = time.perf_counter()
            break
        await asyncio.sleep(0.01)
    assert first is not None and meter is not None
    cores = meter.shares()
    await worker.runners[0].drain()  # close every window now, as exit_when_idle would later
    durable_s = time.perf_counter()
    await worker.drain()  # and let stage two finish before stopping
    worker.stop()
    await asyncio.wait_for(task, timeout=120)
    if profile:
        profile.disable()
        profile.dump_stats(args.profile)
    db = store.database
    cost, rows, devices = store.query_rows(
        f"SELECT sum(cost_usd), count(), uniqExact(device_uuid) FROM {db}.gpu_cost_windows FINAL"
    )[0]
    events = events_counted(worker)
    return {
        **sink_seconds(worker),
        "events_per_s": (total - first[1]) / (consumed_s - first[0]),
        "durable_events_per_s": (total - first[1]) / (durable_s - first[0]),
        "consume_s": consumed_s - first[0],
        "drain_s": durable_s - consumed_s,
        **cores,
        "events_counted": int(events),
        "rows": rows,
        "devices": devices,
        "cost_usd": str(cost),
    }


async def stop_within(task: asyncio.Task[None], timeout_s: float, console: Console) -> None:
    """Wait for a stopping worker; if it hangs, show where its tasks wait, then cancel it."""
    await asyncio.wait({task}, timeout=timeout_s)
    if task.done():
        task.result()
        return
    console.log(f"the worker did not stop within {timeout_s:.0f} s; its tasks:")
    for other in asyncio.all_tasks():
        other.print_stack(limit=3)
    task.cancel()
    await asyncio.wait({task}, timeout=10)


# --------------------------------------------------------------------------- live


async def produce_live(args: argparse.Namespace) -> dict[str, Any]:
    """The child process: sample the cluster once a second, event time = wall time."""
    book = load_price_book(EXAMPLE_PRICE_BOOK)
    cluster = Cluster(args.nodes, args.devices_per_node, args.partitions, book)
    producer = fast_producer(args.live_producer)
    await producer.start()
    sent, skipped, send_s, ticks_ms = 0, 0, [], []
    start = math.ceil(time.time()) + 1
    try:
        for tick in range(args.live_seconds):
            delay = start + tick - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1:
                skipped += 1  # a whole second behind: that sample is lost, as an agent's would be
                continue
            began, time_ms = time.perf_counter(), int(time.time() * 1000)
            # each node sampled at its phase within the second just past, sent now
            second = cluster.second(tick, time_ms - 1000)
            await asyncio.gather(*await send_batches(producer, GPU_SAMPLES_TOPIC, second))
            sent += len(cluster.devices)
            ticks_ms.append(time_ms)
            send_s.append(time.perf_counter() - began)
    finally:
        await producer.stop()
    return {
        "sent": sent,
        "skipped_ticks": skipped,
        "first_ms": ticks_ms[0],
        "last_ms": ticks_ms[-1],
        "events_per_s": sent / ((ticks_ms[-1] - ticks_ms[0]) / 1000 + 1),
        "tick_send_s_median": statistics.median(send_s),
        "tick_send_s_max": max(send_s),
        "producer_cores": time.process_time() / (time.time() - start + 1),
    }


async def live_latency(
    bootstrap: str, store: ClickHouseStore, args: argparse.Namespace, console: Console
) -> dict[str, Any]:
    worker = make_worker(bootstrap, store, args, live=True)
    task = asyncio.create_task(worker.run())
    while not (worker.runners and worker.runners[0].assigned_at_s is not None):
        if task.done():
            await task
        await asyncio.sleep(0.1)
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--live-producer", bootstrap, "--nodes", str(args.nodes),
        "--devices-per-node", str(args.devices_per_node), "--live-seconds", str(args.live_seconds),
        "--partitions", str(args.partitions),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    meter = CpuMeter()
    seen: dict[int, float] = {}
    max_lag = 0.0
    sql = (
        "SELECT toUnixTimestamp64Milli(window_start), count() "
        f"FROM {store.database}.gpu_cost_windows GROUP BY 1"
    )

    async def poll() -> None:
        nonlocal max_lag
        for window_ms, _ in await asyncio.to_thread(store.query_rows, sql):
            seen.setdefault(int(window_ms), time.time())
        lag = sum(
            worker.registry.get_sample_value(
                "gpuledger_consumer_lag_messages",
                {"topic": GPU_SAMPLES_TOPIC, "partition": str(p)},
            )
            or 0.0
            for p in range(args.partitions)
        )
        max_lag = max(max_lag, lag)

    while child.returncode is None:
        await poll()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(child.wait(), timeout=0.1)
    assert child.stdout is not None
    produced = orjson.loads(await child.stdout.read())
    console.log(f"live: producer done, {produced['events_per_s']:,.0f} events/s")
    cores = meter.shares()
    size_ms, grace_ms = args.live_window_s * 1000, int(args.live_grace_s * 1000)
    first_window = produced["first_ms"] - produced["first_ms"] % size_ms
    closable = range(first_window, produced["last_ms"] - size_ms - grace_ms + 1, size_ms)
    deadline = time.time() + 15
    while not all(w in seen for w in closable) and time.time() < deadline:
        await poll()
        await asyncio.sleep(0.1)
    console.log(f"live: {len(seen)} windows seen; stopping the worker")
    worker.stop()
    stop_began = time.perf_counter()
    await stop_within(task, 60, console)
    stop_s = time.perf_counter() - stop_began
    coverage = store.query_rows(
        f"SELECT toUnixTimestamp64Milli(window_start), uniqExact(device_uuid) "
        f"FROM {store.database}.gpu_cost_windows GROUP BY 1 ORDER BY 1"
    )
    latencies = [seen[w] - (w + size_ms + grace_ms) / 1000 for w in closable if w in seen]
    return {
        **produced,
        **cores,
        "windows": len(closable),
        "windows_visible": len(latencies),
        "latency_s": [round(x, 3) for x in latencies],
        "latency_s_median": statistics.median(latencies) if latencies else None,
        "latency_s_max": max(latencies) if latencies else None,
        "max_consumer_lag": max_lag,
        "stop_s": stop_s,
        "devices_per_window": [int(n) for w, n in coverage if int(w) in closable],
        **sink_seconds(worker),
        "events_counted": int(events_counted(worker)),
    }


# --------------------------------------------------------------------------- main


async def prepare(bootstrap: str, cluster: Cluster, partitions: int) -> None:
    await ensure_topics(KafkaSettings(bootstrap=bootstrap), default_topics(partitions))
    await produce(bootstrap, PODS_TOPIC, cluster.pod_events(T0_MS - 60_000))


async def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    if not DEFAULT_LIBS_DIR.exists():
        fetch_kafka_libs()
    book = load_price_book(EXAMPLE_PRICE_BOOK)
    cluster = Cluster(args.nodes, args.devices_per_node, args.partitions, book)
    total = len(cluster.devices) * args.seconds
    expected = sum(
        (d.sample_costs_usd[s % VARIANTS] for d in cluster.devices for s in range(args.seconds)),
        Decimal(0),
    )
    out: dict[str, Any] = {"devices": len(cluster.devices), "pods": len(cluster.pods)}
    out["cpus"], out["loadavg_start"] = os.cpu_count(), os.getloadavg()
    # chDB may still be merging in the folder when it is removed
    with tempfile.TemporaryDirectory(prefix="gpuledger-bench-", ignore_cleanup_errors=True) as tmp:
        dsn = f"chdb://{tmp}/chdb"
        with KafkaBroker(DEFAULT_LIBS_DIR) as broker:
            await prepare(broker.bootstrap, cluster, args.partitions)
            console.log(f"producing {total:,} samples ({len(cluster.devices):,} devices) ...")
            began = time.perf_counter()
            await produce_backlog(broker.bootstrap, cluster, args.seconds)
            out["backlog"] = {"events": total, "produce_s": time.perf_counter() - began}
            # Raw and worker runs alternate, so each worker run has a raw run on either side
            # (this machine's speed drifts within a run); each worker run is a fresh group.
            raw = [await raw_rate(broker.bootstrap, args.partitions, total)]
            console.log(f"raw aiokafka + orjson: {raw[0]:,.0f} events/s")
            rounds = out["worker_rounds"] = []
            for round_ in range(args.rounds):
                store = ClickHouseStore(dsn, database=f"bench_backlog_{round_}")
                group = f"bench-worker-{round_}"
                result = await worker_throughput(broker.bootstrap, store, total, args, group)
                raw.append(await raw_rate(broker.bootstrap, args.partitions, total))
                stored = Decimal(result["cost_usd"])
                result["cost_relative_error"] = float(abs(stored - expected) / expected)
                result["expected_cost_usd"] = str(expected)
                result["raw_around_events_per_s"] = raw[-2:]
                result["ratio"] = result["events_per_s"] / statistics.fmean(raw[-2:])
                rounds.append(result)
                console.log(
                    f"worker: {result['events_per_s']:,.0f} events/s consumed; "
                    f"raw after: {raw[-1]:,.0f}; worker / raw around it: {result['ratio']:.2f}"
                )
                out["raw_events_per_s"] = raw
                save(out, args.out)
        if not args.no_live:
            with KafkaBroker(DEFAULT_LIBS_DIR) as broker:
                await prepare(broker.bootstrap, cluster, args.partitions)
                console.log(f"live: {len(cluster.devices):,} samples/s, {args.live_seconds} s")
                live_store = ClickHouseStore(dsn, database="bench_live")
                out["live"] = await live_latency(broker.bootstrap, live_store, args, console)
    out["loadavg_end"] = os.getloadavg()
    return out


def save(out: dict[str, Any], path: str | None) -> None:
    """Write what is known so far, so a phase that fails keeps the earlier figures."""
    if path:
        Path(path).write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))


def report(out: dict[str, Any], console: Console) -> None:
    raw, rounds = max(out["raw_events_per_s"]), out["worker_rounds"]
    table = Table(title=f"gpuledger worker, {out['devices']:,} devices, {out['cpus']} CPUs")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(
        "raw aiokafka + orjson, each run", ", ".join(f"{r:,.0f}" for r in out["raw_events_per_s"])
    )
    for i, worker in enumerate(rounds, 1):
        table.add_row(
            f"worker run {i}: consumed, consumed and durable",
            f"{worker['events_per_s']:,.0f}, {worker['durable_events_per_s']:,.0f} events/s",
        )
        table.add_row(
            f"worker run {i} / mean of the raw runs around it",
            f"{worker['ratio']:.2f} (/ best raw: {worker['events_per_s'] / raw:.2f})",
        )
        table.add_row(
            f"worker run {i}: worker, broker cores",
            f"{worker['worker_cores']:.2f}, {worker['broker_cores']:.2f}",
        )
        table.add_row(
            f"worker run {i}: cost relative error", f"{worker['cost_relative_error']:.1e}"
        )
    table.add_row("worker / raw, median over runs", f"{out['median_ratio']:.2f}")
    live = out.get("live")
    if live:
        table.add_row("live produced", f"{live['events_per_s']:,.0f} events/s")
        table.add_row(
            "live worker, broker cores", f"{live['worker_cores']:.2f}, {live['broker_cores']:.2f}"
        )
        table.add_row("live worker event loop alone, cores", f"{live['loop_cores']:.2f}")
        table.add_row("live windows visible", f"{live['windows_visible']} of {live['windows']}")
        if live["latency_s_median"] is not None:
            table.add_row("close -> visible, median", f"{live['latency_s_median']:.2f} s")
            table.add_row("close -> visible, max", f"{live['latency_s_max']:.2f} s")
        table.add_row("live max consumer lag", f"{live['max_consumer_lag']:,.0f} events")
    table.add_row(
        "load average start / end", f"{out['loadavg_start'][0]:.2f} / {out['loadavg_end'][0]:.2f}"
    )
    console.print(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--devices-per-node", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=60, help="seconds of backlog")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--window-s", type=int, default=60, help="backlog run window")
    parser.add_argument("--rounds", type=int, default=2, help="worker runs over the backlog")
    parser.add_argument("--live-seconds", type=int, default=90)
    parser.add_argument("--live-window-s", type=int, default=60)
    parser.add_argument("--live-grace-s", type=float, default=10.0)
    parser.add_argument("--no-live", action="store_true", help="skip the live latency phase")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the backlog worker run")
    parser.add_argument("--out", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--log-level", default="WARNING", help="of the worker and aiokafka")
    parser.add_argument("--live-producer", metavar="BOOTSTRAP", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.live_producer:
        sys.stdout.buffer.write(orjson.dumps(asyncio.run(produce_live(args))))
        return 0
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(message)s")
    console = Console()
    tune_garbage_collector()  # as `gpuledger worker` does
    out = asyncio.run(run(args, console))
    out["median_ratio"] = statistics.median(r["ratio"] for r in out["worker_rounds"])
    out["command"] = " ".join([".venv/bin/python", *sys.argv])
    save(out, args.out)
    report(out, console)
    if args.profile:
        pstats.Stats(args.profile).sort_stats("cumulative").print_stats(30)
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())

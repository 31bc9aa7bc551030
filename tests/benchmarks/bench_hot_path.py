"""CPU per GPU-sample event in the worker's stage one, without Kafka or ClickHouse.

Feeds the worker's own record handler (decode, dead letters, dedup, windows, allocation,
offsets, metrics) with aiokafka `ConsumerRecord`s in fetch-sized batches, over the payloads of
bench_worker.py (1,000 nodes x 8 devices by default), then closes the windows (rows and their
Kafka messages). Each figure is per event and also a ratio to `orjson.loads` of the same bytes,
measured in the same run: the decode every Python consumer pays.

    .venv/bin/python tests/benchmarks/bench_hot_path.py [--seconds 60] [--repeat 3] [--default-gc]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import orjson
from aiokafka import ConsumerRecord, TopicPartition
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.table import Table

from schemas.events import GPU_SAMPLE_TYPE, GPU_SAMPLES_TOPIC, _decode_slowly, decode_event
from streams.allocation import AllocationSettings
from streams.labels import PodHistory
from streams.metrics import WorkerMetrics
from streams.pricing import EXAMPLE_PRICE_BOOK, load_price_book
from streams.worker.app import tune_garbage_collector
from streams.worker.device_stage import DeviceStage, StreamSettings
from streams.worker.handlers import DeviceHandler
from streams.worker.intake import DeadLetterLog, Intake
from streams.worker.outbox import Outbox
from streams.worker.runner import FETCH_MAX_RECORDS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cluster import T0_MS, Cluster

T = TypeVar("T")


def handler_for(settings: StreamSettings) -> DeviceHandler:
    """Stage one's handler as the worker builds it, owning four sample partitions."""
    book = load_price_book(EXAMPLE_PRICE_BOOK)
    handler = DeviceHandler(
        DeviceStage(book, settings, PodHistory()),
        Intake(WorkerMetrics(CollectorRegistry()), DeadLetterLog()),
        "internal",
        sample_partitions=4,
        internal_partitions=4,
    )
    handler.assigned({(GPU_SAMPLES_TOPIC, p) for p in range(4)})
    return handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=60, help="of samples: one 60 s window")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--default-gc", action="store_true", help="keep CPython's collector settings"
    )
    args = parser.parse_args()
    cluster = Cluster(args.nodes, 8, 4, load_price_book(EXAMPLE_PRICE_BOOK))
    by_partition: dict[int, list[ConsumerRecord]] = {}
    for s in range(args.seconds):
        for partition, key, value in cluster.second(s, T0_MS + 1000 * s):
            records = by_partition.setdefault(partition, [])
            records.append(
                ConsumerRecord(
                    GPU_SAMPLES_TOPIC, partition, len(records), 0, 0, key, value, None, 0, 0, ()
                )
            )
    # What getmany hands the worker: up to FETCH_MAX_RECORDS, spread over the partitions.
    per_fetch = FETCH_MAX_RECORDS // len(by_partition)
    fetches = []
    for first in range(0, max(len(r) for r in by_partition.values()), per_fetch):
        fetches.append(
            {
                TopicPartition(GPU_SAMPLES_TOPIC, p): records[first : first + per_fetch]
                for p, records in by_partition.items()
            }
        )
    n = sum(len(r) for r in by_partition.values())
    values = [m.value for records in by_partition.values() for m in records]
    settings = StreamSettings(allocation=AllocationSettings(window_s=60))
    if not args.default_gc:
        tune_garbage_collector()  # as `gpuledger worker` does

    def loads() -> None:
        for v in values:
            orjson.loads(v)

    def decode() -> None:
        for v in values:
            decode_event(v, GPU_SAMPLE_TYPE)

    def explain() -> None:
        for v in values:
            _decode_slowly(v)

    # The worker's clock as the samples were taken: the last second of the simulated backlog
    # (events ahead of it are dead-lettered as clock_skew).
    now_s = T0_MS / 1000 + args.seconds

    def handle() -> DeviceHandler:
        handler = handler_for(settings)
        outbox = Outbox()
        for fetch in fetches:
            for tp, records in fetch.items():
                asyncio.run(handler.handle(tp, records, now_s, outbox))
        return handler

    best: dict[str, float] = {}

    def timed(name: str, run: Callable[[], T]) -> T:
        began = time.perf_counter()
        result = run()
        best[name] = min(best.get(name, float("inf")), time.perf_counter() - began)
        return result

    for _ in range(args.repeat):
        timed("orjson.loads (baseline)", loads)
        timed("decode_event (msgspec, typed)", decode)
        timed("explaining decoder (orjson + rule table)", explain)
        handler = timed("handle (decode, dedup, allocate)", handle)
        timed("window close (rows + messages)", partial(handler.poll, now_s, True, Outbox()))
    base = best["orjson.loads (baseline)"]
    table = Table(title=f"{n:,} GPU-sample events, {len(cluster.devices):,} devices")
    table.add_column("step")
    table.add_column("µs / event", justify="right")
    table.add_column("x orjson.loads", justify="right")
    for name, seconds in best.items():
        table.add_row(name, f"{seconds / n * 1e6:.2f}", f"{seconds / base:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()

"""Why the worker consumes with aiokafka directly rather than through a faust agent.

Produces N GPU-sample events to a real Kafka broker, then times three consumers of the same
topic in the same run: plain aiokafka + orjson (the ceiling for a Python consumer), a faust
agent doing the same decode, and a faust agent with manual acknowledgement (`stream.noack()`
plus `stream.ack(event)`), which is what committing only after rows are durable requires.

    .venv/bin/python tests/benchmarks/bench_faust_vs_aiokafka.py --events 100000
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kafka_broker import DEFAULT_LIBS_DIR, KafkaBroker, fetch_kafka_libs
from worker_scenario import gpu_samples

from schemas.events import encode_event

TOPIC = "bench.samples"
PARTITIONS = 4


async def produce(bootstrap: str, n: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)])
    await admin.close()
    payloads = [encode_event(ev) for ev in gpu_samples()]
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=50, max_batch_size=512 * 1024
    )
    await producer.start()
    futures = []
    for i in range(n):
        futures.append(
            await producer.send(TOPIC, payloads[i % len(payloads)], key=str(i % 8000).encode())
        )
    await asyncio.gather(*futures)
    await producer.stop()


async def raw_rate(bootstrap: str, n: int) -> float:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    tps = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    seen, started = 0, 0.0
    while seen < n:
        batch = await consumer.getmany(timeout_ms=500, max_records=5000)
        if batch and not started:
            started = time.perf_counter()
        for records in batch.values():
            for m in records:
                orjson.loads(m.value)
            seen += len(records)
    elapsed = time.perf_counter() - started
    await consumer.stop()
    return n / elapsed


def faust_rate(bootstrap: str, n: int, *, mode: str) -> float:
    """Runs in its own process: faust owns the event loop and is stopped by exiting."""
    ctx = multiprocessing.get_context("spawn")
    queue: Any = ctx.Queue()
    child = ctx.Process(target=_faust_child, args=(bootstrap, n, mode, queue))
    child.start()
    rate: float = queue.get(timeout=600)
    child.join(timeout=30)
    return rate


def _faust_child(bootstrap: str, n: int, mode: str, queue: Any) -> None:
    import faust

    manual_ack = mode == "noack"
    app = faust.App(
        f"bench-{mode}",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        web_enabled=False,
        topic_partitions=PARTITIONS,
        value_serializer="raw",
        datadir=tempfile.mkdtemp(prefix="faust-bench-"),
    )
    topic = app.topic(TOPIC, value_serializer="raw", partitions=PARTITIONS)
    state = {"seen": 0, "started": 0.0}

    def done() -> None:
        queue.put(n / (time.perf_counter() - state["started"]))
        queue.close()
        queue.join_thread()
        os._exit(0)

    @app.agent(topic)
    async def consume(stream: Any) -> None:
        if mode == "take":
            async for values in stream.take(5000, within=0.2):
                if not state["started"]:
                    state["started"] = time.perf_counter()
                for value in values:
                    orjson.loads(value)
                state["seen"] += len(values)
                if state["seen"] >= n:
                    done()
            return
        source = stream.noack() if manual_ack else stream
        async for event in source.events():
            if not state["started"]:
                state["started"] = time.perf_counter()
            orjson.loads(event.value)
            if manual_ack:
                await source.ack(event)
            state["seen"] += 1
            if state["seen"] >= n:
                done()

    faust.Worker(app, loglevel="ERROR", quiet=True).execute_from_commandline()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if not DEFAULT_LIBS_DIR.exists():
        fetch_kafka_libs()
    with KafkaBroker(DEFAULT_LIBS_DIR) as broker:
        asyncio.run(produce(broker.bootstrap, args.events))
        raw = asyncio.run(raw_rate(broker.bootstrap, args.events))
        agent = faust_rate(broker.bootstrap, args.events, mode="ack")
        noack = faust_rate(broker.bootstrap, args.events, mode="noack")
        take = faust_rate(broker.bootstrap, args.events, mode="take")
    print(f"events: {args.events}")
    print(f"aiokafka getmany + orjson      : {raw:10.0f} events/s  (1.00)")
    print(f"faust agent + orjson            : {agent:10.0f} events/s  ({agent / raw:.2f})")
    print(f"faust agent, manual ack + orjson: {noack:10.0f} events/s  ({noack / raw:.2f})")
    print(f"faust agent, take(5000) + orjson: {take:10.0f} events/s  ({take / raw:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

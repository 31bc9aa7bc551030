"""The stage runner without a broker: the exactly-once order, and what a revoke removes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from prometheus_client import CollectorRegistry

from streams.metrics import WorkerMetrics
from streams.worker.outbox import Outbox
from streams.worker.runner import StageRunner, write_then_commit
from streams.worker.watermark import Partition

TOPIC = "gpuledger.gpu-samples"
LAG = "gpuledger_consumer_lag_messages"


class FakeSinks:
    def __init__(self, log: list[Any], durable: bool = True, block: bool = False) -> None:
        self.log, self.durable, self.block = log, durable, block

    async def insert(self, rows: list[Any], label: str, **policy: Any) -> bool:
        self.log.append(("insert", list(rows)))
        return self.durable

    async def produce(self, messages: list[Any], **policy: Any) -> bool:
        self.log.append(("produce", list(messages)))
        if self.block:
            await asyncio.sleep(3600)
        return self.durable


class FakeConsumer:
    def __init__(self, log: list[Any], batches: list[dict[TopicPartition, list[Any]]]) -> None:
        self.log, self.batches = log, batches
        self.assigned: set[TopicPartition] = set()

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, Any]:
        if self.batches:
            return self.batches.pop(0)
        await asyncio.sleep(timeout_ms / 1000)
        return {}

    def highwater(self, tp: TopicPartition) -> int:
        return 100

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.log.append(("commit", offsets))


class FakeStage:
    """Turns each record into one row and one message; holds nothing."""

    def __init__(self, log: list[Any]) -> None:
        self.log = log
        self.next: dict[Partition, int] = {}

    def assigned(self, partitions: set[Partition]) -> None:
        self.log.append(("assigned", partitions))

    async def handle(
        self, tp: TopicPartition, records: list[Any], now_s: float, out: Outbox
    ) -> None:
        for msg in records:
            out.rows.append(msg.value)
            out.messages.append(("out", b"k", msg.value, 0))
            self.next[(tp.topic, tp.partition)] = msg.offset + 1

    def poll(self, now_s: float, drain: bool, outbox: Outbox) -> None:
        pass

    def positions(self) -> dict[Partition, int]:
        return dict(self.next)

    def committed(self) -> None:
        self.log.append(("committed", set(self.next)))

    async def prepare(self) -> None:
        pass

    def revoke(self, partitions: set[Partition]) -> None:
        self.log.append(("revoke", partitions))
        for p in partitions:
            self.next.pop(p, None)


def _record(partition: int, offset: int) -> ConsumerRecord:
    return ConsumerRecord(TOPIC, partition, offset, 0, 0, b"k", b"v%d" % offset, None, 1, 2, ())


async def _commit(log: list[Any]) -> None:
    log.append(("commit",))


async def test_rows_then_messages_then_the_commit() -> None:
    log: list[Any] = []
    pending = Outbox(["row"], [("t", b"k", b"v", 0)])  # type: ignore[list-item]
    assert await write_then_commit(pending, FakeSinks(log), "x", lambda: _commit(log))  # type: ignore[arg-type]
    assert [step[0] for step in log] == ["insert", "produce", "commit"]
    assert len(pending) == 0


async def test_nothing_durable_commits_nothing_and_keeps_the_batch_first() -> None:
    log: list[Any] = []
    pending = Outbox(["old"], [])  # type: ignore[list-item]
    sinks = FakeSinks(log, durable=False)
    assert not await write_then_commit(pending, sinks, "x", lambda: _commit(log))  # type: ignore[arg-type]
    assert log == [("insert", ["old"])]  # no produce, no commit
    pending.rows.append("new")  # type: ignore[arg-type]
    assert pending.rows == ["old", "new"]


async def test_a_write_cancelled_before_the_acks_commits_nothing() -> None:
    log: list[Any] = []
    pending = Outbox(["row"], [("t", b"k", b"v", 0)])  # type: ignore[list-item]
    sinks = FakeSinks(log, block=True)
    task = asyncio.create_task(write_then_commit(pending, sinks, "x", lambda: _commit(log)))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [step[0] for step in log] == ["insert", "produce"]
    assert pending.rows == ["row"] and len(pending.messages) == 1


async def test_a_revoke_flushes_then_drops_the_state_and_the_partition_series() -> None:
    log: list[Any] = []
    tp0, tp1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
    batches = [{tp0: [_record(0, 4), _record(0, 5)], tp1: [_record(1, 9)]}]
    consumer = FakeConsumer(log, batches)
    registry = CollectorRegistry()
    stage = FakeStage(log)
    runner = StageRunner(
        "test",
        consumer,  # type: ignore[arg-type]
        stage,
        FakeSinks(log),  # type: ignore[arg-type]
        WorkerMetrics(registry),
        flush_interval_s=3600,
        max_outbox=1000,
    )
    consumer.assigned = {tp0, tp1}
    runner.on_assigned({tp0, tp1})
    stopping = asyncio.Event()
    task = asyncio.create_task(runner.run(stopping))
    while runner.records < 3:
        await asyncio.sleep(0.01)
    assert registry.get_sample_value(LAG, {"topic": TOPIC, "partition": "0"}) == 94
    assert registry.get_sample_value(LAG, {"topic": TOPIC, "partition": "1"}) == 90

    await runner.on_revoked({tp0})
    consumer.assigned = {tp1}
    stopping.set()
    await task
    steps = [step[0] for step in log]
    assert steps == ["assigned", "insert", "produce", "commit", "committed", "revoke"]
    assert log[3][1] == {tp0: 6, tp1: 10}  # committed before the state went
    assert log[5][1] == {(TOPIC, 0)}
    assert registry.get_sample_value(LAG, {"topic": TOPIC, "partition": "0"}) is None
    assert registry.get_sample_value(LAG, {"topic": TOPIC, "partition": "1"}) == 90
    assert 'partition="0"' not in _exposed(registry)


def _exposed(registry: CollectorRegistry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()

"""On the real broker: a record too large to travel in its dead letter is dead-lettered by
reference, decided before producing (the broker never refuses the letter), its bytes are read
back whole at the offset the letter names, and the worker goes on with what follows."""

from __future__ import annotations

import base64

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from test_worker_e2e import (
    assert_matches_core,
    broker,  # noqa: F401 - fixture
    make_worker,
    read_topic,
    run_worker,
)
from worker_scenario import publish_scenario

from schemas.events import DEAD_LETTER_TOPIC, GPU_SAMPLES_TOPIC
from streams.store import ClickHouseStore
from streams.worker.outbox import MAX_LETTER_BYTES

pytestmark = pytest.mark.kafka

HUGE = b"{" * 900_000  # the broker takes it; base64 in a letter, it would pass the limit


async def publish_after(bootstrap: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=2_000_000)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(GPU_SAMPLES_TOPIC, value, key=b"GPU-h100-a")
    finally:
        await producer.stop()


async def record_at(bootstrap: str, topic: str, partition: int, offset: int) -> bytes | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        where = TopicPartition(topic, partition)
        consumer.assign([where])
        consumer.seek(where, offset)
        record = await consumer.getone()
        assert record.offset == offset
        return record.value
    finally:
        await consumer.stop()


async def test_a_record_over_the_letter_limit_is_dead_lettered_by_reference(
    broker: str,  # noqa: F811
    store: ClickHouseStore,
) -> None:
    await publish_scenario(broker)
    await publish_after(broker, [HUGE, b"not json"])  # the small one after it: still handled
    worker = make_worker(broker, store)
    await run_worker(worker, timeout_s=60)
    letters = {k: orjson.loads(v) for k, v in await read_topic(broker, DEAD_LETTER_TOPIC)}
    assert len(letters) == 2
    big = next(letter for letter in letters.values() if letter["value_bytes"] == len(HUGE))
    small = next(letter for letter in letters.values() if letter["value_bytes"] == 8)
    assert big["by_reference"] is True and big["value_base64"] is None
    assert big["reason"] == "invalid_json" and big["topic"] == GPU_SAMPLES_TOPIC
    assert base64.b64decode(big["key_base64"]) == b"GPU-h100-a"
    assert f"at offset {big['offset']}" in big["detail"]
    kept = await record_at(broker, GPU_SAMPLES_TOPIC, big["partition"], big["offset"])
    assert kept == HUGE  # nothing lost: the bytes are where the letter says
    assert small["by_reference"] is False
    assert base64.b64decode(small["value_base64"]) == b"not json"
    assert all(len(orjson.dumps(letter)) <= MAX_LETTER_BYTES for letter in letters.values())
    failures = worker.registry.get_sample_value("gpuledger_sink_failures_total", {"sink": "kafka"})
    assert failures is None  # decided before producing: the broker refused nothing
    assert worker.unhealthy_sinks() == {}
    assert_matches_core(store)

"""The test broker works with aiokafka the way gpuledger uses Kafka.

Produce/consume, compacted topics made through the admin client, the idempotent producer and
transactions (read_committed consumers must not see aborted records).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

pytestmark = pytest.mark.kafka

_RECEIVE_TIMEOUT_S = 20.0


async def _consume(bootstrap: str, topic: str, count: int, **consumer_settings: Any) -> list[Any]:
    """Read `count` records from the start of `topic`, failing after _RECEIVE_TIMEOUT_S."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **consumer_settings,
    )
    await consumer.start()
    try:
        records: list[Any] = []
        async with asyncio.timeout(_RECEIVE_TIMEOUT_S):
            while len(records) < count:
                batches = await consumer.getmany(timeout_ms=500)
                for batch in batches.values():
                    records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def _topic_config(bootstrap: str, topic: str) -> dict[str, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    (resource,) = [r for response in responses for r in response.to_object()["resources"]]
    assert resource["error_code"] == 0, resource["error_message"]
    return {entry["config_names"]: entry["config_value"] for entry in resource["config_entries"]}


async def test_produce_consume_round_trip(kafka_bootstrap: str, topic_name: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        metadata = await producer.send_and_wait(
            topic_name, b"value-1", key=b"key-1", headers=[("source", b"test")]
        )
    finally:
        await producer.stop()
    assert metadata.topic == topic_name
    assert metadata.offset == 0

    (record,) = await _consume(kafka_bootstrap, topic_name, 1)
    assert (record.key, record.value, record.offset) == (b"key-1", b"value-1", 0)
    assert list(record.headers) == [("source", b"test")]


async def test_compacted_topic_created_by_admin_client(
    kafka_bootstrap: str, topic_name: str
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics(
            [
                NewTopic(
                    topic_name,
                    num_partitions=1,
                    replication_factor=1,
                    topic_configs={"cleanup.policy": "compact"},
                )
            ]
        )
    finally:
        await admin.close()
    (created,) = response.to_object()["topic_errors"]
    assert (created["topic"], created["error_code"]) == (topic_name, 0)

    config = await _topic_config(kafka_bootstrap, topic_name)
    assert config["cleanup.policy"] == "compact"

    # The broker-wide default stays "delete": the setting belongs to this topic only.
    plain_topic = f"{topic_name}.plain"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic_name, b"v", key=b"k")
        await producer.send_and_wait(plain_topic, b"v")
    finally:
        await producer.stop()
    assert (await _topic_config(kafka_bootstrap, plain_topic))["cleanup.policy"] == "delete"


async def test_idempotent_producer_writes_each_record_once(
    kafka_bootstrap: str, topic_name: str
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        futures = [
            await producer.send(topic_name, f"value-{i}".encode(), key=b"same-key")
            for i in range(20)
        ]
        offsets = [(await future).offset for future in futures]
    finally:
        await producer.stop()
    assert offsets == list(range(20))

    records = await _consume(kafka_bootstrap, topic_name, 20)
    assert [r.value for r in records] == [f"value-{i}".encode() for i in range(20)]


async def test_transactions_hide_aborted_records(kafka_bootstrap: str, topic_name: str) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=f"txn-{uuid.uuid4().hex}"
    )
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send_and_wait(topic_name, b"committed-1")
        await producer.begin_transaction()
        await producer.send_and_wait(topic_name, b"aborted")
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send_and_wait(topic_name, b"committed-2")
    finally:
        await producer.stop()

    records = await _consume(kafka_bootstrap, topic_name, 2, isolation_level="read_committed")
    assert [r.value for r in records] == [b"committed-1", b"committed-2"]

"""Each gpuledger CloudEvent type survives a trip through the real Kafka broker unchanged.

Topics are unique per test (the real names are shared by the whole session's broker), but each
keeps the key and cleanup policy design §2 gives its real counterpart.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas.events import (
    CloudEvent,
    GpuSample,
    Ok,
    PodInfo,
    ProcessSample,
    TokenDelta,
    decode_event,
    encode_event,
    make_event,
)

pytestmark = pytest.mark.kafka

_RECEIVE_TIMEOUT_S = 20.0
_SOURCE = "gpuledger-test/node-a"
_TIME_MS = 1_790_000_000_123
_POD_UID = "6f1c2d3e-0000-4000-8000-00000000a001"
_DEVICE_UUID = "MIG-5a7e9a34-1b2c-5d6e-8f90-123456789abc"


def _gpu_sample_event() -> CloudEvent[GpuSample]:
    sample = GpuSample(
        cluster="test-cluster",
        node="node-a",
        device_uuid=_DEVICE_UUID,
        gpu_uuid="GPU-0e4b6c1a-2f3d-4e5f-8a9b-0c1d2e3f4a5b",
        gpu_model="NVIDIA H100 80GB HBM3",
        mig_profile="1g.10gb",
        mig_slices=1,
        gpu_slices=7,
        interval_s=1.0,
        mem_total_bytes=10 * 1024**3,
        mem_used_bytes=3 * 1024**3,
        sm_util_pct=42.5,
        node_labels={"node.kubernetes.io/instance-type": "p5.48xlarge"},
        processes=(
            ProcessSample(
                pid=4242,
                pod_uid=_POD_UID,
                container_id="containerd://abc123",
                mem_used_bytes=3 * 1024**3,
                sm_util_pct=None,
            ),
        ),
    )
    return make_event(sample, event_id="evt-gpu-1", source=_SOURCE, time_ms=_TIME_MS)


def _pod_event() -> CloudEvent[PodInfo]:
    pod = PodInfo(
        cluster="test-cluster",
        uid=_POD_UID,
        namespace="inference",
        name="vllm-llama-0",
        node="node-a",
        labels={"app": "vllm", "team": "search"},
        namespace_labels={"cost-center": "cc-1234"},
        deleted=False,
    )
    return make_event(pod, event_id="evt-pod-1", source=_SOURCE, time_ms=_TIME_MS)


def _tokens_event() -> CloudEvent[TokenDelta]:
    tokens = TokenDelta(
        cluster="test-cluster",
        namespace="inference",
        pod="vllm-llama-0",
        pod_uid=_POD_UID,
        model="meta-llama/Llama-3.1-8B-Instruct",
        prompt_tokens=1200,
        completion_tokens=350,
        requests=4,
        interval_s=15.0,
        cached_tokens=800,
        prefill_s=0.25,
        decode_s=3.5,
    )
    return make_event(tokens, event_id="evt-tokens-1", source=_SOURCE, time_ms=_TIME_MS)


async def _create_topic(bootstrap: str, topic: str, configs: dict[str, str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(topic, num_partitions=1, replication_factor=1, topic_configs=configs)]
        )
    finally:
        await admin.close()
    (created,) = response.to_object()["topic_errors"]
    assert created["error_code"] == 0, created


async def _round_trip(bootstrap: str, topic: str, key: bytes, value: bytes) -> Any:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        return await asyncio.wait_for(consumer.getone(), _RECEIVE_TIMEOUT_S)
    finally:
        await consumer.stop()


@pytest.mark.parametrize(
    ("make", "key", "cleanup_policy"),
    [
        pytest.param(_gpu_sample_event, _DEVICE_UUID, "delete", id="gpu-sample"),
        pytest.param(_pod_event, _POD_UID, "compact", id="pod"),
        pytest.param(_tokens_event, _POD_UID, "delete", id="tokens"),
    ],
)
async def test_event_round_trips_through_kafka(
    kafka_bootstrap: str,
    topic_name: str,
    make: Any,
    key: str,
    cleanup_policy: str,
) -> None:
    event: CloudEvent[Any] = make()
    await _create_topic(kafka_bootstrap, topic_name, {"cleanup.policy": cleanup_policy})

    record = await _round_trip(kafka_bootstrap, topic_name, key.encode(), encode_event(event))

    assert record.key == key.encode()
    decoded = decode_event(record.value)
    assert isinstance(decoded, Ok), decoded
    assert decoded.event == event

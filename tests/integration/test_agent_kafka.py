"""The three producers publish through a real Kafka-protocol broker: the embedded tansu broker
(fast) and the real Apache Kafka broker (`kafka` marker). The agent's buffer carries a broker
outage without losing an event."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiokafka import AIOKafkaConsumer
from prometheus_client import CollectorRegistry

from agents import agent_cli, pods_cli, tokens_cli
from agents.demo_scenario import demo_scenario
from agents.metrics import BufferMetrics
from agents.publisher import KafkaPublisher
from agents.scenario_views import metrics_page
from gpuledger.embedded_broker import EmbeddedBroker, free_port
from runtime.kafka import KafkaSettings, TopicSpec
from schemas.events import (
    GPU_SAMPLES_TOPIC,
    PODS_TOPIC,
    TOKENS_TOPIC,
    Ok,
    PodInfo,
    decode_event,
    make_event,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit" / "agents"))
from kube_api import FakeKubeApi, recorded


async def _consume(
    bootstrap: str, topic: str, cluster: str, want: int, timeout_s: float = 30.0
) -> list[tuple[bytes, Any]]:
    """(key, decoded event) of records of `cluster` on `topic`, until `want` or the timeout."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=f"test-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
    )
    await consumer.start()
    found: list[tuple[bytes, Any]] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(found) < want and loop.time() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    decoded = decode_event(record.value)
                    assert isinstance(decoded, Ok), decoded
                    if decoded.event.data.cluster == cluster:
                        found.append((record.key, decoded.event))
    finally:
        await consumer.stop()
    return found


def _config(module: Any, argv: list[str]) -> Any:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    module.register(sub, {})
    args = parser.parse_args(argv)
    build = {
        "agent": agent_cli.agent_config_from,
        "pods": pods_cli.pods_config_from,
        "tokens": tokens_cli.tokens_config_from,
    }[argv[0]]
    return build(args)


async def _agent_publishes(bootstrap: str) -> None:
    cluster = f"c-{uuid.uuid4().hex[:8]}"
    config = _config(
        agent_cli,
        [
            "agent",
            "--fake-nvml",
            "--node",
            "gpu-node-3",
            "--count",
            "3",
            "--interval",
            "0.2",
            "--metrics-port",
            "0",
            "--kafka",
            bootstrap,
            "--cluster",
            cluster,
        ],
    )
    assert await agent_cli.run_agent(config) == 0
    records = await _consume(bootstrap, GPU_SAMPLES_TOPIC, cluster, 12)
    assert len(records) == 12  # 3 passes x 4 L40S
    assert all(key == event.data.device_uuid.encode() for key, event in records)
    assert len({event.id for _, event in records}) == 12


async def _pods_publish(bootstrap: str, tmp_path: Path) -> None:
    cluster = f"c-{uuid.uuid4().hex[:8]}"
    async with FakeKubeApi() as api:
        api.lists["/api/v1/namespaces"] = [recorded("namespacelist.json")]
        api.lists["/api/v1/pods"] = [recorded("podlist.json")]
        api.watches["/api/v1/pods"] = [recorded("watch-pods-1.jsonl")]
        config = _config(
            pods_cli,
            [
                "pods",
                "--duration",
                "3",
                "--metrics-port",
                "0",
                "--kafka",
                bootstrap,
                "--cluster",
                cluster,
                "--kubeconfig",
                str(api.kubeconfig(tmp_path)),
            ],
        )
        assert await pods_cli.run_pods(config) == 0
    records = await _consume(bootstrap, PODS_TOPIC, cluster, 6)
    assert len(records) == 6
    assert all(key == event.data.uid.encode() for key, event in records)
    # Kafka orders per key (partition), not across keys: the deleted pod's last event is its delete.
    llama = [event for key, event in records if key == b"dde1244b-5bb5-4297-b544-85f3bc0d80bf"]
    assert [e.data.deleted for e in llama] == [False, True]


async def _tokens_publish(bootstrap: str) -> None:
    cluster = f"c-{uuid.uuid4().hex[:8]}"
    scenario = demo_scenario(1_800_000_000.0)
    pod = next(p for p in scenario.pods if p.inference and p.inference.server == "vllm")
    t = [100.0]

    async def page(_: web.Request) -> web.Response:
        t[0] += 10
        return web.Response(text=metrics_page(scenario, pod, t[0]), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", page)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        config = _config(
            tokens_cli,
            [
                "tokens",
                "--no-discovery",
                "--count",
                "3",
                "--interval",
                "0.2",
                "--metrics-port",
                "0",
                "--kafka",
                bootstrap,
                "--cluster",
                cluster,
                "--target",
                f"{pod.namespace}/{pod.name}/{pod.uid}=http://127.0.0.1:{server.port}/metrics",
            ],
        )
        assert await tokens_cli.run_tokens(config) == 0
    finally:
        await server.close()
    records = await _consume(bootstrap, TOKENS_TOPIC, cluster, 2)
    assert len(records) == 2
    assert all(key == pod.uid.encode() for key, _ in records)


# --- embedded broker ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tansu() -> Any:
    with EmbeddedBroker() as broker:
        yield broker.bootstrap


async def test_agent_publishes_through_the_embedded_broker(tansu: str) -> None:
    await _agent_publishes(tansu)


async def test_pods_publish_through_the_embedded_broker(tansu: str, tmp_path: Path) -> None:
    await _pods_publish(tansu, tmp_path)


async def test_tokens_publish_through_the_embedded_broker(tansu: str) -> None:
    await _tokens_publish(tansu)


async def test_a_broker_outage_loses_nothing() -> None:
    """Events published while no broker listens are all delivered once it comes up."""
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    cluster = f"c-{uuid.uuid4().hex[:8]}"
    registry = CollectorRegistry()
    publisher = KafkaPublisher(
        KafkaSettings(bootstrap=bootstrap),
        [TopicSpec(PODS_TOPIC, compacted=True)],
        BufferMetrics(registry, "gpuledger_pods", cluster, ""),
        retry_max_s=1.0,
    )
    await publisher.start()
    for i in range(300):
        info = PodInfo(cluster, f"uid-{i}", "ns", f"pod-{i}", "node")
        publisher.publish(
            PODS_TOPIC,
            info.uid,
            make_event(info, event_id=f"uid-{i}:1", source="t", time_ms=1_000 + i),
        )
    await asyncio.sleep(3.0)  # the broker is down: everything waits in the buffer
    assert len(publisher.buffer) == 300
    with EmbeddedBroker(port=port) as broker:
        for _ in range(120):
            if not len(publisher.buffer):
                break
            await asyncio.sleep(0.25)
        await publisher.stop()
        records = await _consume(broker.bootstrap, PODS_TOPIC, cluster, 300)
    ids = {event.id for _, event in records}
    assert ids == {f"uid-{i}:1" for i in range(300)}
    assert (
        registry.get_sample_value(
            "gpuledger_pods_publish_errors_total", {"cluster": cluster, "node": ""}
        )
        >= 1
    )


# --- real Apache Kafka -------------------------------------------------------------------------


@pytest.mark.kafka
async def test_agent_publishes_through_kafka(kafka_bootstrap: str) -> None:
    await _agent_publishes(kafka_bootstrap)


@pytest.mark.kafka
async def test_pods_publish_through_kafka(kafka_bootstrap: str, tmp_path: Path) -> None:
    await _pods_publish(kafka_bootstrap, tmp_path)


@pytest.mark.kafka
async def test_tokens_publish_through_kafka(kafka_bootstrap: str) -> None:
    await _tokens_publish(kafka_bootstrap)

"""The README's billing-consumer example (deploy/examples/billing_consumer.py): rows produced
to `gpuledger.cost-windows` as the worker writes them, with a correction at a higher version
and a duplicate, must total per team as the final rows do."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from types import ModuleType

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from deploy_tools import REPO

from gpuledger.embedded_broker import EmbeddedBroker
from streams.rows import CostRow, as_json

EXAMPLE = REPO / "deploy" / "examples" / "billing_consumer.py"
T0 = 1_788_242_400_000  # 2026-09-01T06:00:00Z


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("billing_consumer", EXAMPLE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


billing = _example()


def row(window: int, pod_uid: str, team: str, cost: str, version: int = 1) -> CostRow:
    return CostRow(
        T0 + window * 60_000,
        T0 + (window + 1) * 60_000,
        "prod-eu",
        "gpu-a",
        "GPU-a0",
        "GPU-a0",
        "NVIDIA H100 80GB HBM3",
        "",
        "search" if pod_uid != "__idle__" else "__idle__",
        "vllm-0",
        pod_uid,
        team,
        "assistant",
        "CC-100",
        "idle" if pod_uid == "__idle__" else "usage",
        30.0,
        50.0,
        2e10,
        Decimal(cost),
        Decimal(0),
        Decimal("4.000000000000000"),
        "on_demand",
        version,
    )


FIRST = [
    row(0, "uid-a", "search", "0.033333333333333"),
    row(0, "uid-b", "__untagged__", "0.020000000000001"),
    row(0, "__idle__", "platform", "0.013333333333333"),
    row(1, "uid-a", "search", "0.040000000000000"),
    row(1, "uid-b", "__untagged__", "0.010000000000000"),
]
# uid-b's labels arrive: its rows come again at version 2 with its team, and a replay sends a
# first-version row twice more, one of them after the correction.
CORRECTIONS = [
    dataclasses.replace(FIRST[1], team="ads", version=2),
    dataclasses.replace(FIRST[4], team="ads", version=2),
]
MESSAGES = [*FIRST, FIRST[3], *CORRECTIONS, FIRST[1]]
WANT = {
    "ads": Decimal("0.030000000000001"),
    "platform": Decimal("0.013333333333333"),
    "search": Decimal("0.073333333333333"),
}


def test_ledger_keeps_the_latest_version_per_key() -> None:
    ledger = billing.CostLedger()
    applied = [ledger.apply(as_json(r)) for r in MESSAGES]
    assert applied == [True] * 8 + [False]  # the stale replay after the correction is ignored
    assert ledger.cost_by_team() == WANT
    naive: dict[str, Decimal] = {}
    for r in MESSAGES:
        naive[r.team] = naive.get(r.team, Decimal(0)) + r.cost_usd
    assert naive != WANT, "summing every message would double count"


async def _produce(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for r in MESSAGES:
            await producer.send_and_wait(topic, orjson.dumps(as_json(r)), key=r.key.encode())
    finally:
        await producer.stop()


@pytest.fixture(scope="module")
def embedded_bootstrap() -> Iterator[str]:
    with EmbeddedBroker() as broker:
        yield broker.bootstrap


async def test_consumer_totals_on_the_embedded_broker(embedded_bootstrap: str) -> None:
    topic = f"gpuledger.cost-windows.{uuid.uuid4().hex[:8]}"
    await _produce(embedded_bootstrap, topic)
    ledger = await billing.consume(embedded_bootstrap, topic=topic, idle_exit_s=3.0)
    assert ledger.cost_by_team() == WANT
    assert len(ledger.entries) == 5


async def test_consumer_totals_on_apache_kafka(kafka_bootstrap: str) -> None:
    topic = f"gpuledger.cost-windows.{uuid.uuid4().hex[:8]}"
    await _produce(kafka_bootstrap, topic)
    ledger = await billing.consume(kafka_bootstrap, topic=topic, idle_exit_s=3.0)
    assert ledger.cost_by_team() == WANT


def test_the_example_runs_as_a_script(embedded_bootstrap: str) -> None:
    import asyncio

    topic = f"gpuledger.cost-windows.{uuid.uuid4().hex[:8]}"
    asyncio.run(_produce(embedded_bootstrap, topic))
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--bootstrap",
            embedded_bootstrap,
            "--topic",
            topic,
            "--from-beginning",
            "--idle-exit-s",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split("\t") for line in result.stdout.splitlines())
    assert {k: Decimal(v) for k, v in lines.items()} == WANT

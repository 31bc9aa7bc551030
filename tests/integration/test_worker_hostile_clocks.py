"""The worker against hostile clocks and a hostile internal topic, on a real broker: what no
clock can read, or a wrong type, is dead-lettered; everything else is billed as the
allocation core says, commits move on, and a restart changes nothing."""

from __future__ import annotations

import asyncio
from collections import Counter
from decimal import Decimal

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from test_worker_e2e import (
    assert_matches_core,
    broker,  # noqa: F401 - fixture
    make_worker,
    read_topic,
    run_worker,
    wait_for,
)
from worker_scenario import T0, gpu_samples, publish_raw, publish_scenario

from runtime.kafka import KafkaSettings, TopicSpec, default_topics, ensure_topics
from schemas.events import DEAD_LETTER_TOPIC, GPU_SAMPLES_TOPIC, event_to_dict
from streams.store import ClickHouseStore
from streams.worker.device_stage import PodCostPartial
from streams.worker.pod_stage import encode_marker

pytestmark = pytest.mark.kafka
GROUP = "gpuledger-worker"
INTERNAL = f"{GROUP}.pod-costs"
HOSTILE_TIMES = [
    "9999-12-31T23:59:30Z",  # its window would end in year 10000
    "0001-01-01T00:00:01Z",  # year 1: no clock reads that
    "2099-01-01T00:00:00Z",  # far ahead: would close every window at once
    "1970-01-01T00:00:05Z",  # a node whose clock was reset
]


def hostile_samples() -> list[bytes]:
    base = event_to_dict(gpu_samples()[0])
    return [
        orjson.dumps({**base, "id": f"hostile-{i}", "time": text})
        for i, text in enumerate(HOSTILE_TIMES)
    ]


def wrongly_typed_internal() -> list[bytes]:
    partial = orjson.loads(
        PodCostPartial(T0, "GPU-h100-a", "uid-search", Decimal(1), 1, 1).encode()
    )
    marker = orjson.loads(encode_marker(0, 2, T0))
    return [
        orjson.dumps({**partial, "cost_usd": "1", "window_start_ms": "x"}),
        orjson.dumps({**marker, "end_ms": "x"}),
    ]


async def _committed(bootstrap: str, group: str) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
        return {tp: meta.offset for tp, meta in offsets.items()}
    finally:
        await admin.close()


async def test_hostile_clocks_and_wrong_types_are_dead_lettered_and_the_rest_is_billed(
    broker: str,  # noqa: F811
    store: ClickHouseStore,
) -> None:
    settings = KafkaSettings(bootstrap=broker)
    await ensure_topics(settings, [*default_topics(2), TopicSpec(INTERNAL, 2)])
    await publish_raw(broker, GPU_SAMPLES_TOPIC, hostile_samples())  # first, on one partition
    await publish_raw(broker, INTERNAL, wrongly_typed_internal())
    await publish_scenario(broker)
    await run_worker(make_worker(broker, store))
    assert_matches_core(store)

    letters = [orjson.loads(v) for _, v in await read_topic(broker, DEAD_LETTER_TOPIC)]
    assert Counter((d["topic"], d["reason"]) for d in letters) == {
        (GPU_SAMPLES_TOPIC, "clock_skew"): len(HOSTILE_TIMES),
        (INTERNAL, "invalid_internal"): 2,
    }
    # The hostile samples are the first records of their partition: the commit moved past them.
    [partition] = {d["partition"] for d in letters if d["topic"] == GPU_SAMPLES_TOPIC}
    committed = await _committed(broker, GROUP)
    assert committed[TopicPartition(GPU_SAMPLES_TOPIC, partition)] >= len(HOSTILE_TIMES)

    # A restart (and a replay from the start, in a new group) neither crashes nor re-letters.
    await run_worker(make_worker(broker, store))
    await run_worker(make_worker(broker, store, group_id="replay"))
    assert_matches_core(store)
    assert len(await read_topic(broker, DEAD_LETTER_TOPIC)) == len(letters)


async def test_a_worker_started_before_its_agents_bills_every_token(
    broker: str,  # noqa: F811
    store: ClickHouseStore,
) -> None:
    """With no samples for idle_flush, stage one tells stage two not to wait for its sample
    partitions (the all-idle marker). Stage two must still take what comes after."""
    await ensure_topics(KafkaSettings(bootstrap=broker), default_topics(2))
    worker = make_worker(broker, store, exit_when_idle_s=None)
    run = asyncio.create_task(run_worker(worker, timeout_s=150))
    try:
        # Two sample partitions, each marked idle on both internal partitions; stage two read them.
        await wait_for(lambda: len(worker.runners) == 2 and worker.runners[1].records >= 4)
        markers = [orjson.loads(v) for _, v in await read_topic(broker, INTERNAL)]
        assert {m["end_ms"] for m in markers} == {2**62}
        await publish_scenario(broker)
        await wait_for(
            lambda: (
                worker.runners[0].records >= len(gpu_samples())
                and min(r.quiet_for_s() for r in worker.runners) >= 3
            )
        )
        await worker.drain()
    finally:
        worker.stop()
        await run
    assert_matches_core(store)
    assert await read_topic(broker, DEAD_LETTER_TOPIC) == []

"""First-known pod metadata on the real broker and ClickHouse (design §3 step 6), and a replay
over a compacted pods topic (only the latest event per pod left) giving the live rows."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from kafka_broker import DEFAULT_LIBS_DIR, KafkaBroker
from msgspec.structs import replace
from test_worker_e2e import (
    broker,  # noqa: F401 - fixture
    make_worker,
    run_worker,
    stored,
    wait_for,
)
from worker_scenario import (
    PODS,
    T0,
    comparable,
    expected_rows,
    gpu_samples,
    publish,
    token_events,
)

from runtime.kafka import PODS_MIN_COMPACTION_LAG_MS, KafkaSettings, default_topics, ensure_topics
from schemas.events import GPU_SAMPLES_TOPIC, PODS_TOPIC, TOKENS_TOPIC, CloudEvent, PodInfo
from schemas.events import make_event as event
from streams.rows import TokenCostRow
from streams.store import ClickHouseStore

pytestmark = pytest.mark.kafka


def pod_event(uid: str, n: int, time_ms: int, **changes: Any) -> CloudEvent[PodInfo]:
    info = replace(PODS[uid], **changes)
    return event(info, event_id=f"pod:{uid}:{n}", source="pods", time_ms=time_ms)


# The three windows' views end at T0 + 70 s, 130 s and 190 s (end + 10 s grace). Every pod
# keeps its labels over its life; several have more than one event.
HISTORY = [
    pod_event("uid-search", 1, T0 + 75_000),  # after the first window's view: it applies there
    pod_event("uid-search", 2, T0 + 400_000, deleted=True),
    pod_event("uid-sandbox", 1, T0 - 60_000),
    pod_event("uid-sandbox", 2, T0 + 90_000),
    pod_event("uid-ads", 1, T0 + 200_000),  # after every window: it applies to all
    pod_event("uid-late", 1, T0 + 600_000),
    pod_event("uid-late", 2, T0 + 900_000, deleted=True),
]


def latest_per_pod(events: Iterable[CloudEvent[PodInfo]]) -> list[CloudEvent[PodInfo]]:
    """What compaction leaves of the pods topic: the last record per key (the pod uid)."""
    return list({ev.data.uid: ev for ev in events}.values())


def want(pods: list[CloudEvent[PodInfo]]) -> list[list[tuple[Any, ...]]]:
    return [comparable(t) for t in expected_rows(gpu_samples(), pods, token_events())]


async def publish_inputs(bootstrap: str, pods: list[CloudEvent[PodInfo]]) -> None:
    await ensure_topics(KafkaSettings(bootstrap=bootstrap), default_topics(2))
    await publish(bootstrap, PODS_TOPIC, pods, lambda ev: ev.data.uid)
    await publish(bootstrap, GPU_SAMPLES_TOPIC, gpu_samples(), lambda ev: ev.data.device_uuid)
    await publish(bootstrap, TOKENS_TOPIC, token_events(), lambda ev: ev.data.pod_uid)


async def test_first_metadata_dated_after_the_window_gives_its_labels(
    broker: str,  # noqa: F811
    store: ClickHouseStore,
) -> None:
    """The watcher's clock runs ahead of the nodes': a pod's first event is dated after the
    windows that billed it, and comes after they closed. Its rows get its labels, in both
    tables."""
    early = [ev for ev in HISTORY if ev.data.uid not in ("uid-late", "uid-ads")]
    await publish_inputs(broker, early)
    worker = make_worker(broker, store, exit_when_idle_s=None)
    task = asyncio.create_task(run_worker(worker, timeout_s=150))
    try:
        await wait_for(lambda: [comparable(t) for t in stored(store)] == want(early))  # all closed
        cost, _, cpt = stored(store)
        assert {r.team for r in cost if r.pod_uid in ("uid-late", "uid-ads")} == {"__untagged__"}
        assert {r.team for r in cpt if r.pod_uid == "uid-ads"} == {"__untagged__"}
        rows: list[Any] = [*cost, *cpt]
        versions = {r.key: r.version for r in rows}

        late = [ev for ev in HISTORY if ev.data.uid in ("uid-late", "uid-ads")]
        await publish(broker, PODS_TOPIC, late, lambda ev: ev.data.uid)
        await wait_for(lambda: [comparable(t) for t in stored(store)] == want(HISTORY))
    finally:
        worker.stop()  # also when an assertion failed: the worker must end
        await task
    cost, _, cpt = stored(store)
    assert {r.team for r in cost if r.pod_uid == "uid-late"} == {"research"}
    assert {(r.team, r.cost_center) for r in cpt if r.pod_uid == "uid-ads"} == {("ads", "CC-9")}
    rows = [*cost, *cpt]
    relabelled = [r for r in rows if r.pod_uid in ("uid-late", "uid-ads")]
    assert all(r.version > versions[r.key] for r in relabelled)
    assert any(isinstance(r, TokenCostRow) for r in relabelled)


async def test_a_replay_over_the_compacted_pods_topic_gives_the_live_rows(
    broker: str,  # noqa: F811
    store: ClickHouseStore,
    second_store: ClickHouseStore,
) -> None:
    """Live, every pod event was there; a replay over a fresh topic set holding only the latest
    event per pod (what compaction leaves) writes the same final rows."""
    await publish_inputs(broker, HISTORY)
    await run_worker(make_worker(broker, store))
    live = [comparable(t) for t in stored(store)]
    assert live == want(HISTORY)
    config = await _topic_config(broker, PODS_TOPIC)
    assert config["cleanup.policy"] == "compact"
    assert int(config["min.compaction.lag.ms"]) == PODS_MIN_COMPACTION_LAG_MS

    compacted = latest_per_pod(HISTORY)
    assert len(compacted) < len(HISTORY)
    with KafkaBroker(DEFAULT_LIBS_DIR) as other:
        await publish_inputs(other.bootstrap, compacted)
        await run_worker(make_worker(other.bootstrap, second_store))
    assert [comparable(t) for t in stored(second_store)] == live


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

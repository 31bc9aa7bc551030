"""Pod GPU requests and node GPU capacity on the real broker into the real ClickHouse engine:
one `pod_gpu_requests` row per event of a pod that requests (or requested) GPU resources, its
owners resolved by the worker's label policy as cost rows are, a deletion holding nothing, no
rows for pods without GPU requests, and a restart that reads the topic again changing nothing;
each node event's `gpu_capacity` in `node_events`."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from test_worker_e2e import (
    broker,  # noqa: F401 - fixture
    make_worker,
    run_worker,
)
from worker_scenario import T0, publish, publish_raw

from runtime.kafka import KafkaSettings, default_topics, ensure_topics
from schemas.events import (
    NODES_TOPIC,
    PODS_TOPIC,
    CloudEvent,
    NodeInfo,
    PodInfo,
    encode_event,
    make_event,
)
from streams.allocation import AllocationSettings
from streams.labels import LabelSettings, resolve_owner
from streams.pricing import EXAMPLE_PRICE_BOOK, load_price_book
from streams.rows import UNTAGGED
from streams.store import ClickHouseStore
from streams.worker.app import Worker, WorkerConfig
from streams.worker.device_stage import StreamSettings

pytestmark = pytest.mark.kafka

GPU = "nvidia.com/gpu"
MIG = "nvidia.com/mig-3g.40gb"
SEARCH = PodInfo(
    "prod", "uid-search", "search", "vllm-search-0", "gpu-node-1",
    {"team": "search", "owner": "alice"}, {"cost-center": "CC-7"}, False, {GPU: 1},
)  # fmt: skip
EVAL = PodInfo(
    "prod", "uid-eval", "research", "eval-0", "gpu-node-2", {"product": "llm-eval"},
    {"team": "research"}, False, {MIG: 1},
)  # fmt: skip
WEB = PodInfo("prod", "uid-web", "web", "frontend-0", "cpu-node-1", {"team": "web"}, {}, False)


def pod_event(pod: PodInfo, event_id: str, time_ms: int, **changes: Any) -> CloudEvent[PodInfo]:
    fields = {f: getattr(pod, f) for f in pod.__struct_fields__}
    return make_event(
        PodInfo(**{**fields, **changes}), event_id=event_id, source="pods", time_ms=time_ms
    )


PODS = [
    pod_event(SEARCH, "uid-search:10:1", T0 - 600_000),  # created ten minutes before
    pod_event(SEARCH, "uid-search:12:1", T0 + 60_000, gpu_requests={}),  # Succeeded
    pod_event(SEARCH, "uid-search:deleted", T0 + 120_000, gpu_requests={}, deleted=True),
    pod_event(EVAL, "uid-eval:5:1", T0 - 60_000),
    pod_event(EVAL, "uid-eval:deleted", T0 + 30_000, deleted=True),  # deleted while it ran
    pod_event(WEB, "uid-web:3:1", T0 - 60_000),  # no GPU requests: no rows, ever
    pod_event(WEB, "uid-web:4:1", T0, labels={"team": "web", "v": "2"}),
    pod_event(WEB, "uid-web:deleted", T0 + 60_000, deleted=True),
]
TIME_SLICED = NodeInfo(
    "prod", "gpu-node-1", "aws:///us-east-1a/i-0abc", "g5.48xlarge", 32, 192_000, 2**40, False,
    {GPU: 32},
)  # fmt: skip
NODES = [
    make_event(TIME_SLICED, event_id="n1:100", source="pods", time_ms=T0 - 86_400_000),
    make_event(
        NodeInfo(
            "prod",
            "gpu-node-2",
            "",
            "p4d.24xlarge",
            0,
            96_000,
            2**40,
            False,
            {MIG: 8, "nvidia.com/mig-1g.10gb": 14},
        ),
        event_id="n2:7",
        source="pods",
        time_ms=T0 - 3_600_000,
    ),
]


def an_older_watchers_event() -> bytes:
    """A pod event without `gpu_requests`, as watchers before it wrote them."""
    doc = orjson.loads(encode_event(pod_event(WEB, "uid-old:1:1", T0, uid="uid-old")))
    del doc["data"]["gpu_requests"]
    return orjson.dumps(doc)


def request_rows(store: ClickHouseStore) -> list[tuple[Any, ...]]:
    return store.query_rows(
        "SELECT cluster, node, namespace, pod, pod_uid, team, product, cost_center, requests, "
        f"toUnixTimestamp64Milli(time), event_id FROM {store.database}.pod_gpu_requests FINAL "
        "ORDER BY pod_uid, time"
    )


def expected_rows(labels: LabelSettings) -> list[tuple[Any, ...]]:
    out = []
    for event in PODS:
        pod = event.data
        if pod.uid == WEB.uid:
            continue
        owners = resolve_owner(pod.uid, {pod.uid: pod}.get, labels)[2:]  # as on cost rows
        requests = {} if pod.deleted else dict(pod.gpu_requests)
        out.append(
            (pod.cluster, pod.node, pod.namespace, pod.name, pod.uid, *owners, requests,
             event.time_ms, event.id)
        )  # fmt: skip
    return sorted(out, key=lambda r: (r[4], r[9]))


async def publish_all(bootstrap: str) -> None:
    await ensure_topics(KafkaSettings(bootstrap=bootstrap), default_topics(2))
    await publish(bootstrap, PODS_TOPIC, PODS, lambda ev: ev.data.uid)
    await publish_raw(bootstrap, PODS_TOPIC, [an_older_watchers_event()])
    await publish(bootstrap, NODES_TOPIC, NODES, lambda ev: f"{ev.data.cluster}/{ev.data.node}")


async def test_pod_events_with_gpu_requests_are_rows_with_their_owners(
    broker: str,  # noqa: F811
    store: ClickHouseStore,
) -> None:
    await publish_all(broker)
    await run_worker(make_worker(broker, store))
    rows = request_rows(store)
    assert rows == expected_rows(LabelSettings())
    assert [(r[4], r[5], r[6], r[7], r[8]) for r in rows] == [
        ("uid-eval", "research", "llm-eval", UNTAGGED, {MIG: 1}),
        ("uid-eval", "research", "llm-eval", UNTAGGED, {}),  # deleted: holds nothing
        ("uid-search", "search", UNTAGGED, "CC-7", {GPU: 1}),
        ("uid-search", "search", UNTAGGED, "CC-7", {}),  # finished
        ("uid-search", "search", UNTAGGED, "CC-7", {}),  # deleted
    ]
    assert rows[2][9] == T0 - 600_000  # the first row starts at the pod's creation
    capacity = store.query_rows(
        f"SELECT node, gpu_capacity FROM {store.database}.node_events FINAL ORDER BY node"
    )
    assert capacity == [
        ("gpu-node-1", {GPU: 32}),
        ("gpu-node-2", {MIG: 8, "nvidia.com/mig-1g.10gb": 14}),
    ]

    # A restart reads the compacted topic from its start again: the same rows.
    await run_worker(make_worker(broker, store, group_id="restarted"))
    assert request_rows(store) == rows


async def test_owners_follow_the_workers_label_keys(
    broker: str,  # noqa: F811
    store: ClickHouseStore,
) -> None:
    await publish_all(broker)
    labels = LabelSettings(team_key="owner")
    config = WorkerConfig(
        kafka=KafkaSettings(bootstrap=broker),
        clickhouse_dsn="unused",
        stream=StreamSettings(allocation=AllocationSettings(labels=labels), idle_flush_s=2.0),
        partitions=2,
        http_port=0,
        exit_when_idle_s=3.0,
        flush_interval_s=0.3,
    )
    worker = Worker(
        config, load_price_book(EXAMPLE_PRICE_BOOK), store=store, registry=CollectorRegistry()
    )
    await run_worker(worker)
    rows = request_rows(store)
    assert rows == expected_rows(labels)
    assert {r[4]: r[5] for r in rows} == {"uid-search": "alice", "uid-eval": UNTAGGED}

"""Node events on the real broker into the real ClickHouse engine: one `node_events` row per
event, a duplicate merged by the table's key, bad records dead-lettered once, a restart that
reads the topic again changing nothing, and the cost stages' rows exact beside it."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from test_worker_e2e import (
    assert_matches_core,
    broker,  # noqa: F401 - fixture
    make_worker,
    run_worker,
)
from worker_scenario import T0, publish, publish_raw, publish_scenario, read_topic

from schemas.events import (
    DEAD_LETTER_TOPIC,
    NODES_TOPIC,
    CloudEvent,
    NodeInfo,
    PodInfo,
    encode_event,
    make_event,
)
from streams.store import ClickHouseStore

pytestmark = pytest.mark.kafka

GIB = 2**30
H100 = NodeInfo(
    "prod",
    "gpu-node-1",
    "aws:///us-east-1a/i-0123456789abcdef0",
    "p5.48xlarge",
    8,
    192_000,
    2048 * GIB,
    False,
)
L40S = NodeInfo(
    "prod",
    "gpu-node-3",
    "azure:///subscriptions/0000/resourceGroups/rg/providers/Microsoft.Compute/"
    "virtualMachineScaleSets/gpu/virtualMachines/3",
    "Standard_NV36ads_A10_v5",
    1,
    36_000,
    440 * GIB,
    False,
)


def node_event(info: NodeInfo, event_id: str, time_ms: int, **changes: Any) -> CloudEvent[Any]:
    fields = {f: getattr(info, f) for f in info.__struct_fields__}
    return make_event(
        NodeInfo(**{**fields, **changes}), event_id=event_id, source="pods", time_ms=time_ms
    )


EVENTS = [
    node_event(H100, "n1:100", T0 - 86_400_000),  # created a day before
    node_event(L40S, "n3:7", T0 - 3_600_000),
    node_event(H100, "n1:250", T0 + 60_000, gpus=7),  # a GPU fell off the bus
    node_event(H100, "n1:deleted", T0 + 120_000, gpus=7, deleted=True),
]


def bad_records() -> list[bytes]:
    pod = make_event(
        PodInfo("prod", "uid-1", "search", "vllm-0", "gpu-node-1"),
        event_id="p-1",
        source="pods",
        time_ms=T0,
    )
    negative = orjson.loads(encode_event(EVENTS[0]))
    negative["id"] = "n1:negative"
    negative["data"]["gpus"] = -1
    return [b"not json", encode_event(pod), orjson.dumps(negative)]


def node_rows(store: ClickHouseStore) -> list[tuple[Any, ...]]:
    return store.query_rows(
        f"SELECT cluster, node, provider_id, instance_type, gpus, cpu_millicores, memory_bytes, "
        f"deleted, toUnixTimestamp64Milli(time), event_id FROM {store.database}.node_events "
        "FINAL ORDER BY node, time"
    )


def expected_rows() -> list[tuple[Any, ...]]:
    rows = [
        (
            e.data.cluster,
            e.data.node,
            e.data.provider_id,
            e.data.instance_type,
            e.data.gpus,
            e.data.cpu_millicores,
            e.data.memory_bytes,
            int(e.data.deleted),
            e.time_ms,
            e.id,
        )
        for e in EVENTS
    ]
    return sorted(rows, key=lambda r: (r[1], r[8]))


async def node_letters(bootstrap: str) -> list[dict[str, Any]]:
    letters = [orjson.loads(value) for _, value in await read_topic(bootstrap, DEAD_LETTER_TOPIC)]
    return [doc for doc in letters if doc["topic"] == NODES_TOPIC]


async def test_each_node_event_is_one_row_duplicates_merge_bad_records_are_dead_letters(
    broker: str,  # noqa: F811
    store: ClickHouseStore,
) -> None:
    await publish_scenario(broker)  # the cost stages' input, beside the node events
    key = lambda ev: f"{ev.data.cluster}/{ev.data.node}"  # noqa: E731
    await publish(broker, NODES_TOPIC, EVENTS, key)
    await publish_raw(broker, NODES_TOPIC, bad_records())
    await publish(broker, NODES_TOPIC, [EVENTS[2]], key)  # re-sent: the same event

    await run_worker(make_worker(broker, store))
    assert node_rows(store) == expected_rows()
    assert_matches_core(store)  # the stages' rows are exact whatever the nodes topic holds
    letters = await node_letters(broker)
    assert sorted(doc["reason"] for doc in letters) == [
        "invalid_json",
        "out_of_range",
        "wrong_topic",
    ]
    assert all(doc["value_base64"] for doc in letters)

    # A restart reads the compacted topic from its start again: same rows, no second letter.
    await run_worker(make_worker(broker, store, group_id="restarted"))
    assert node_rows(store) == expected_rows()
    assert len(await node_letters(broker)) == 3
    raw = store.query_rows(f"SELECT count() FROM {store.database}.node_events")[0][0]
    assert raw >= len(EVENTS)  # re-inserted rows wait for a merge; FINAL shows each once

"""GPU counts on pod and node events: a pod's `gpu_requests`, a node's `gpu_capacity`.

They round-trip, an event without them (an older watcher's) decodes with none, and a bad map
is rejected with a reason that names the member; the published schemas accept events with them.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import json_schemas
from schemas.events import (
    MAX_GPU_RESOURCES,
    NODE_TYPE,
    POD_TYPE,
    CloudEvent,
    NodeInfo,
    Ok,
    PodInfo,
    Rejected,
    decode_event,
    encode_event,
    event_to_dict,
    make_event,
)
from schemas.fields import MAX_GPUS, MAX_LABEL_KEY

TIME_MS = 1_795_000_000_000


def pod_event(requests: dict[str, int]) -> CloudEvent[PodInfo]:
    pod = PodInfo(
        "prod-eu", "uid-1", "search", "vllm-0", "gpu-node-1", {"team": "search"}, {}, False,
        gpu_requests=requests,
    )  # fmt: skip
    return make_event(pod, event_id="uid-1:7:1", source="pods", time_ms=TIME_MS)


def node_event(capacity: dict[str, int]) -> CloudEvent[NodeInfo]:
    node = NodeInfo(
        "prod-eu", "gpu-node-1", "aws:///us-east-1a/i-0abc", "p5.48xlarge", 8, 192_000, 2**40,
        False, gpu_capacity=capacity,
    )  # fmt: skip
    return make_event(node, event_id="uid-n:100", source="pods", time_ms=TIME_MS)


def decoded_data(doc: dict[str, Any]) -> Any:
    decoded = decode_event(orjson.dumps(doc))
    assert isinstance(decoded, Ok), decoded
    return decoded.event.data


counts = st.dictionaries(
    st.sampled_from(
        [
            "nvidia.com/gpu",
            "nvidia.com/gpu.shared",
            "nvidia.com/mig-1g.10gb",
            "nvidia.com/mig-3g.40gb",
        ]
    ),
    st.integers(0, MAX_GPUS),
    max_size=4,
)


@given(counts)
def test_requests_and_capacity_round_trip(values: dict[str, int]) -> None:
    for event in (pod_event(values), node_event(values)):
        decoded = decode_event(encode_event(event))
        assert isinstance(decoded, Ok) and decoded.event == event
        schema = json_schemas.schema_for(event.type)
        jsonschema.validate(orjson.loads(encode_event(event)), schema)


def test_the_members_are_written_even_when_empty() -> None:
    assert event_to_dict(pod_event({}))["data"]["gpu_requests"] == {}
    assert event_to_dict(node_event({}))["data"]["gpu_capacity"] == {}
    shared = event_to_dict(node_event({"nvidia.com/gpu": 32}))["data"]
    assert shared["gpu_capacity"] == {"nvidia.com/gpu": 32}


def test_an_older_watchers_events_have_none() -> None:
    pod = event_to_dict(pod_event({"nvidia.com/gpu": 1}))
    del pod["data"]["gpu_requests"]
    assert decoded_data(pod).gpu_requests == {}
    node = event_to_dict(node_event({"nvidia.com/gpu": 8}))
    del node["data"]["gpu_capacity"]
    assert decoded_data(node).gpu_capacity == {}


@pytest.mark.parametrize(
    "value, reason, named",
    [
        (None, "wrong_type", "data.{m}: expected an object"),
        ([1], "wrong_type", "data.{m}: expected an object"),
        ({"nvidia.com/gpu": "1"}, "wrong_type", "data.{m}['nvidia.com/gpu']: expected a whole"),
        ({"nvidia.com/gpu": 1.0}, "wrong_type", "data.{m}['nvidia.com/gpu']: expected a whole"),
        ({"nvidia.com/gpu": True}, "wrong_type", "data.{m}['nvidia.com/gpu']: expected a whole"),
        ({"nvidia.com/gpu": -1}, "out_of_range", "data.{m}['nvidia.com/gpu']: -1 is out of"),
        ({"nvidia.com/gpu": MAX_GPUS + 1}, "out_of_range", "data.{m}['nvidia.com/gpu']: 4097"),
        ({"": 1}, "wrong_type", "data.{m}: a resource name is empty"),
        ({"x" * (MAX_LABEL_KEY + 1): 1}, "too_long", "data.{m}: key 'xxxx"),
        ({f"r{i}": 1 for i in range(MAX_GPU_RESOURCES + 1)}, "too_long", "data.{m}: 65 resources"),
    ],
)
def test_a_bad_map_is_rejected_with_a_reason_naming_it(value: Any, reason: str, named: str) -> None:
    for event, member in ((pod_event({}), "gpu_requests"), (node_event({}), "gpu_capacity")):
        doc = event_to_dict(event)
        doc["data"][member] = value
        decoded = decode_event(orjson.dumps(doc))
        assert isinstance(decoded, Rejected), decoded
        assert decoded.reason == reason
        assert decoded.detail.startswith(named.format(m=member)), decoded.detail


def test_limits_are_inclusive() -> None:
    widest = {f"nvidia.com/mig-{i}": MAX_GPUS for i in range(MAX_GPU_RESOURCES - 1)}
    widest["x" * MAX_LABEL_KEY] = 0
    for event in (pod_event(widest), node_event(widest)):
        assert decode_event(encode_event(event)) == Ok(event)
    assert {POD_TYPE, NODE_TYPE} == {pod_event({}).type, node_event({}).type}

"""Every string, label map and process list of an event has a documented maximum size.

A value over its limit is rejected with reason `too_long`, by the fast path and the explaining
path alike, with a detail that names the field and the limit and repeats at most a short prefix
of the value; the published JSON Schemas state the same limits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jsonschema
import orjson
import pytest

from schemas import json_schemas
from schemas.events import (
    GPU_SAMPLE_TYPE,
    POD_TYPE,
    TOKENS_TYPE,
    GpuSample,
    Ok,
    PodInfo,
    ProcessSample,
    Rejected,
    TokenDelta,
    _decode_slowly,
    decode_event,
    decode_samples,
    event_to_dict,
    make_event,
)

TIME_MS = 1_795_000_000_123
SAMPLE = GpuSample(
    "prod-eu", "gpu-node-1", "GPU-11111111-2222-3333-4444-555555555555",
    "GPU-11111111-2222-3333-4444-555555555555", "NVIDIA H100 80GB HBM3", None, None, 7, 1.0,
    80 * 2**30, 30 * 2**30, 55.0, {"karpenter.sh/capacity-type": "spot"},
    (ProcessSample(4242, "0d1e2f3a-aaaa-bbbb-cccc-000000000001", "containerd://ab12", 2**30, 4.0),),
)  # fmt: skip
POD = PodInfo(
    "prod-eu", "uid-1", "search", "vllm-0", "gpu-node-1", {"team": "search"}, {"cc": "7"}, False
)
TOKENS = TokenDelta("prod-eu", "search", "vllm-0", "uid-1", "llama-3-70b", 10, 5, 1, 15.0)

PAYLOADS = {GPU_SAMPLE_TYPE: SAMPLE, POD_TYPE: POD, TOKENS_TYPE: TOKENS}

# The documented limits, in characters (design §2, "Field limits").
STRING_LIMITS: list[tuple[str, tuple[Any, ...], int]] = [
    (GPU_SAMPLE_TYPE, ("id",), 1024),
    (GPU_SAMPLE_TYPE, ("source",), 1024),
    (GPU_SAMPLE_TYPE, ("data", "cluster"), 253),
    (GPU_SAMPLE_TYPE, ("data", "node"), 253),
    (GPU_SAMPLE_TYPE, ("data", "device_uuid"), 128),
    (GPU_SAMPLE_TYPE, ("data", "gpu_uuid"), 128),
    (GPU_SAMPLE_TYPE, ("data", "gpu_model"), 256),
    (GPU_SAMPLE_TYPE, ("data", "mig_profile"), 256),
    (GPU_SAMPLE_TYPE, ("data", "processes", 0, "pod_uid"), 128),
    (GPU_SAMPLE_TYPE, ("data", "processes", 0, "container_id"), 128),
    (POD_TYPE, ("id",), 1024),
    (POD_TYPE, ("data", "cluster"), 253),
    (POD_TYPE, ("data", "uid"), 128),
    (POD_TYPE, ("data", "namespace"), 63),
    (POD_TYPE, ("data", "name"), 253),
    (POD_TYPE, ("data", "node"), 253),
    (TOKENS_TYPE, ("id",), 1024),
    (TOKENS_TYPE, ("data", "cluster"), 253),
    (TOKENS_TYPE, ("data", "namespace"), 63),
    (TOKENS_TYPE, ("data", "pod"), 253),
    (TOKENS_TYPE, ("data", "pod_uid"), 384),
    (TOKENS_TYPE, ("data", "model"), 512),
]
# Members whose value is fixed or parsed: only the over-limit case is about length.
FIXED_LIMITS: list[tuple[tuple[str, ...], int]] = [
    (("specversion",), 16),
    (("type",), 256),
    (("time",), 64),
]
LABEL_MAPS = [
    (GPU_SAMPLE_TYPE, "node_labels"),
    (POD_TYPE, "labels"),
    (POD_TYPE, "namespace_labels"),
]
MAX_LABEL_KEY, MAX_LABEL_VALUE, MAX_LABELS, MAX_PROCESSES = 317, 63, 256, 1024


def document(event_type: str) -> dict[str, Any]:
    event = make_event(PAYLOADS[event_type], event_id="e-1", source="a", time_ms=TIME_MS)
    return event_to_dict(event)


def changed(event_type: str, path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = document(event_type)
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def decode_every_way(doc: dict[str, Any]) -> Any:
    """The answer of the fast path, the explaining path and the batch path, which must agree."""
    raw = orjson.dumps(doc)
    answer = _decode_slowly(raw)
    assert decode_event(raw) == answer
    assert decode_event(raw, GPU_SAMPLE_TYPE) == answer
    events, _, others = decode_samples([raw])
    assert (Ok(events[0]) if events else others[0]) == answer
    return answer


def schema_accepts(doc: dict[str, Any], event_type: str) -> bool:
    schema = json_schemas.schema_for(event_type)
    return bool(jsonschema.Draft202012Validator(schema).is_valid(doc))


def assert_too_long(answer: Any, where: str, limit: int) -> None:
    assert isinstance(answer, Rejected), answer
    assert answer.reason == "too_long"
    assert where in answer.detail
    assert f"{limit:,}" in answer.detail
    assert len(answer.detail) <= 200, answer.detail
    assert "\n" not in answer.detail


def dotted(path: tuple[Any, ...]) -> str:
    text = ""
    for key in path:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else key)
    return text


@pytest.mark.parametrize("event_type, path, limit", STRING_LIMITS, ids=str)
def test_a_string_at_its_limit_is_accepted(
    event_type: str, path: tuple[Any, ...], limit: int
) -> None:
    doc = changed(event_type, path, "a" * limit)
    assert isinstance(decode_every_way(doc), Ok)
    assert schema_accepts(doc, event_type)


@pytest.mark.parametrize("event_type, path, limit", STRING_LIMITS, ids=str)
def test_a_string_over_its_limit_is_too_long(
    event_type: str, path: tuple[Any, ...], limit: int
) -> None:
    doc = changed(event_type, path, "a" * (limit + 1))
    assert_too_long(decode_every_way(doc), dotted(path), limit)
    assert not schema_accepts(doc, event_type)


@pytest.mark.parametrize("path, limit", FIXED_LIMITS, ids=str)
@pytest.mark.parametrize("event_type", list(PAYLOADS))
def test_an_envelope_member_over_its_limit_is_too_long(
    event_type: str, path: tuple[str, ...], limit: int
) -> None:
    doc = changed(event_type, path, "a" * (limit + 1))
    assert_too_long(decode_every_way(doc), dotted(path), limit)
    assert not schema_accepts(doc, event_type)


def test_a_ten_megabyte_cluster_is_refused_without_being_repeated() -> None:
    doc = changed(GPU_SAMPLE_TYPE, ("data", "cluster"), "c" * 10_000_000)
    answer = decode_every_way(doc)
    assert_too_long(answer, "data.cluster", 253)
    assert "10,000,000" in answer.detail


def test_a_time_of_the_longest_length_is_accepted() -> None:
    time = "2026-11-26T10:00:00." + "0" * 43 + "Z"
    assert len(time) == 64
    answer = decode_every_way(changed(GPU_SAMPLE_TYPE, ("time",), time))
    assert isinstance(answer, Ok)


@pytest.mark.parametrize("event_type, name", LABEL_MAPS, ids=str)
def test_label_keys_values_and_counts_have_limits(event_type: str, name: str) -> None:
    checks: list[tuple[dict[str, str], bool, int]] = [
        ({"k" * MAX_LABEL_KEY: "v" * MAX_LABEL_VALUE}, True, 0),
        ({"k" * (MAX_LABEL_KEY + 1): "v"}, False, MAX_LABEL_KEY),
        ({"team": "v" * (MAX_LABEL_VALUE + 1)}, False, MAX_LABEL_VALUE),
        ({f"k{i}": "v" for i in range(MAX_LABELS)}, True, 0),
        ({f"k{i}": "v" for i in range(MAX_LABELS + 1)}, False, MAX_LABELS),
    ]
    for labels, fits, limit in checks:
        doc = changed(event_type, ("data", name), labels)
        answer = decode_every_way(doc)
        assert schema_accepts(doc, event_type) is fits
        if fits:
            assert isinstance(answer, Ok)
        else:
            assert_too_long(answer, f"data.{name}", limit)


def test_a_long_label_key_is_named_by_a_prefix_only() -> None:
    key = "example.com/" + "k" * 100_000
    answer = decode_every_way(changed(POD_TYPE, ("data", "labels"), {key: "v"}))
    assert_too_long(answer, "data.labels", MAX_LABEL_KEY)
    assert "example.com/" in answer.detail
    assert "100,012" in answer.detail


@pytest.mark.parametrize("count, fits", [(MAX_PROCESSES, True), (MAX_PROCESSES + 1, False)])
def test_a_sample_lists_at_most_so_many_processes(count: int, fits: bool) -> None:
    process = event_to_dict(make_event(SAMPLE, event_id="e", source="a", time_ms=TIME_MS))["data"][
        "processes"
    ][0]
    event_type = GPU_SAMPLE_TYPE
    doc = changed(event_type, ("data", "processes"), [process] * count)
    answer = decode_every_way(doc)
    assert schema_accepts(doc, event_type) is fits
    if fits:
        assert isinstance(answer, Ok)
    else:
        assert_too_long(answer, "data.processes", MAX_PROCESSES)


SCHEMA_NODES: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = [
    (GPU_SAMPLE_TYPE, lambda s: s["properties"]["data"]["properties"]),
    (POD_TYPE, lambda s: s["properties"]["data"]["properties"]),
    (TOKENS_TYPE, lambda s: s["properties"]["data"]["properties"]),
    (GPU_SAMPLE_TYPE, lambda s: s["properties"]["data"]["properties"]["processes"]["items"][
        "properties"
    ]),
    (GPU_SAMPLE_TYPE, lambda s: s["properties"]),
]  # fmt: skip


@pytest.mark.parametrize("event_type, members", SCHEMA_NODES)
def test_every_string_and_collection_of_the_published_schemas_is_bounded(
    event_type: str, members: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    for name, schema in members(json_schemas.schema_for(event_type)).items():
        if "const" in schema:
            continue  # specversion and type: one value
        for branch in schema.get("anyOf", [schema]):
            kind = branch["type"]
            if kind == "string":
                assert "maxLength" in branch, name
            elif kind == "array":
                assert "maxItems" in branch, name
            elif kind == "object" and name != "data":
                assert branch["maxProperties"] == MAX_LABELS, name
                assert branch["propertyNames"] == {"maxLength": MAX_LABEL_KEY}, name
                value = branch["additionalProperties"]
                assert value == {"type": "string", "maxLength": MAX_LABEL_VALUE}, name

"""Event schemas: round trips, rejections with reasons, never an exception on any bytes."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import json_schemas
from schemas.events import (
    GPU_SAMPLE_TYPE,
    CloudEvent,
    GpuSample,
    Ok,
    PodInfo,
    ProcessSample,
    Rejected,
    TokenDelta,
    decode_event,
    encode_event,
    event_to_dict,
    format_time,
    make_event,
    parse_time,
)

GIB = 2**30


def gpu_event(**overrides: Any) -> CloudEvent[GpuSample]:
    fields: dict[str, Any] = dict(
        cluster="prod-eu",
        node="gpu-node-1",
        device_uuid="GPU-11111111-2222-3333-4444-555555555555",
        gpu_uuid="GPU-11111111-2222-3333-4444-555555555555",
        gpu_model="NVIDIA H100 80GB HBM3",
        mig_profile=None,
        mig_slices=None,
        gpu_slices=7,
        interval_s=1.0,
        mem_total_bytes=80 * GIB,
        mem_used_bytes=30 * GIB,
        sm_util_pct=55.0,
        node_labels={"karpenter.sh/capacity-type": "spot"},
        processes=(
            ProcessSample(
                4242, "0d1e2f3a-aaaa-bbbb-cccc-000000000001", "containerd://ab12", 20 * GIB, 40.0
            ),
            ProcessSample(77, None, None, 10 * GIB, None),
        ),
    )
    fields.update(overrides)
    return make_event(
        GpuSample(**fields), event_id="e-1", source="agent/gpu-node-1", time_ms=1_795_000_000_123
    )


def pod_event() -> CloudEvent[PodInfo]:
    pod = PodInfo(
        "prod-eu",
        "uid-1",
        "search",
        "vllm-0",
        "gpu-node-1",
        {"team": "search", "app": "vllm"},
        {"cost-center": "CC-7"},
        False,
    )
    return make_event(pod, event_id="p-1", source="pods", time_ms=1_795_000_000_000)


def token_event() -> CloudEvent[TokenDelta]:
    delta = TokenDelta(
        "prod-eu",
        "search",
        "vllm-0",
        "uid-1",
        "llama-3-70b",
        1200,
        300,
        4,
        15.0,
        cached_tokens=200,
        prefill_s=0.8,
        decode_s=3.1,
    )
    return make_event(delta, event_id="t-1", source="tokens", time_ms=1_795_000_015_000)


@pytest.mark.parametrize("event", [gpu_event(), pod_event(), token_event()], ids=str)
def test_round_trip_is_exact(event: CloudEvent[Any]) -> None:
    decoded = decode_event(encode_event(event))
    assert isinstance(decoded, Ok)
    assert decoded.event == event


def test_encoding_is_cloudevents_structured_mode() -> None:
    doc = orjson.loads(encode_event(gpu_event()))
    assert doc["specversion"] == "1.0"
    assert doc["type"] == GPU_SAMPLE_TYPE
    assert doc["time"] == "2026-11-18T11:06:40.123Z"
    assert doc["data"]["processes"][1]["pod_uid"] is None


def _mutated(path: list[Any], value: Any) -> bytes:
    doc = event_to_dict(gpu_event())
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return orjson.dumps(doc)


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "reason", "fragment"),
    [
        (["data", "sm_util_pct"], 101.0, "out_of_range", "data.sm_util_pct"),
        (["data", "mem_used_bytes"], 81 * GIB, "out_of_range", "exceeds mem_total_bytes"),
        (["data", "processes", 0, "mem_used_bytes"], 90 * GIB, "out_of_range", "processes[0]"),
        (["data", "processes", 0, "sm_util_pct"], -1, "out_of_range", "processes[0].sm_util_pct"),
        (["data", "interval_s"], 0, "out_of_range", "data.interval_s"),
        (["data", "interval_s"], "1", "wrong_type", "data.interval_s"),
        (["data", "gpu_slices"], 1.5, "wrong_type", "expected an integer"),
        (["data", "node"], _DELETE, "missing_field", "data.node: missing"),
        (["data", "mig_slices"], 9, "out_of_range", "mig_slices exceeds gpu_slices"),
        (["data", "processes"], {}, "wrong_type", "data.processes"),
        (["type"], "io.gpuledger.gpu.sample.v9", "unknown_type", "not a gpuledger event type"),
        (["specversion"], "0.3", "unknown_version", "specversion"),
        (["time"], "yesterday", "wrong_type", "RFC 3339"),
        (["time"], "2026-11-18T06:13:20", "wrong_type", "UTC offset"),
        (["data"], [], "wrong_type", "expected an object"),
    ],
)
def test_bad_values_are_rejected_with_a_reason(
    path: list[Any], value: Any, reason: str, fragment: str
) -> None:
    decoded = decode_event(_mutated(path, value))
    assert isinstance(decoded, Rejected)
    assert decoded.reason == reason
    assert fragment in decoded.detail


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (None, "empty"),
        (b"[1,2]", "wrong_type"),
        (b'"x"', "wrong_type"),
        (b"{}", "missing_field"),
        (b"[" * 5000, "invalid_json"),
    ],
)
def test_garbage_is_rejected(raw: bytes | None, reason: str) -> None:
    decoded = decode_event(raw)
    assert isinstance(decoded, Rejected)
    assert decoded.reason == reason


@given(st.binary(max_size=300))
def test_no_bytes_make_the_decoder_raise(raw: bytes) -> None:
    assert isinstance(decode_event(raw), Ok | Rejected)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=200)
@given(
    st.sampled_from(
        [
            "cluster",
            "interval_s",
            "processes",
            "sm_util_pct",
            "node_labels",
            "mig_profile",
            "mem_total_bytes",
        ]
    ),
    json_values,
)
def test_any_field_value_decodes_or_is_rejected(name: str, value: Any) -> None:
    doc = event_to_dict(gpu_event())
    doc["data"][name] = value
    result = decode_event(orjson.dumps(doc))
    assert isinstance(result, Ok | Rejected)
    schema = json_schemas.schema_for(GPU_SAMPLE_TYPE)
    schema_ok = jsonschema.Draft202012Validator(schema).is_valid(doc)
    if isinstance(result, Ok):
        # Whatever the decoder accepts, the published schema accepts too.
        assert schema_ok


def test_published_json_schemas_are_current() -> None:
    for name, body in json_schemas.rendered().items():
        shipped = (json_schemas.SCHEMA_DIR / name).read_bytes()
        assert shipped == body, f"{name} is stale: run python -m schemas.json_schemas"


@pytest.mark.parametrize("event", [gpu_event(), pod_event(), token_event()], ids=str)
def test_published_schemas_accept_valid_events(event: CloudEvent[Any]) -> None:
    schema = json_schemas.schema_for(event.type)
    jsonschema.Draft202012Validator(schema).validate(orjson.loads(encode_event(event)))


def test_published_schema_rejects_what_the_decoder_rejects() -> None:
    doc = event_to_dict(gpu_event())
    bad = copy.deepcopy(doc)
    bad["data"]["sm_util_pct"] = 250
    validator = jsonschema.Draft202012Validator(json_schemas.schema_for(GPU_SAMPLE_TYPE))
    assert not validator.is_valid(bad)
    assert isinstance(decode_event(orjson.dumps(bad)), Rejected)


@given(st.integers(min_value=0, max_value=4_102_444_800_000))
def test_time_round_trips_at_millisecond_precision(time_ms: int) -> None:
    assert parse_time(format_time(time_ms)) == time_ms


def test_time_accepts_offsets() -> None:
    assert parse_time("2026-11-18T12:06:40.123+01:00") == 1_795_000_000_123

"""The typed fast decoder and the explaining field-by-field decoder must never disagree.

`decode_event` answers from msgspec when a record is well formed and falls back to the rule
table otherwise; these tests hold the typed fields to the rule table, and feed both paths the
same valid and broken documents.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import msgspec.inspect as mi
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import events, fields
from schemas.events import (
    GPU_SAMPLE_TYPE,
    TOKENS_TYPE,
    GpuSample,
    NodeInfo,
    Ok,
    PodInfo,
    ProcessSample,
    TokenDelta,
    _decode_slowly,
    _Envelope,
    decode_event,
    decode_samples,
    encode_event,
    event_to_dict,
    format_time,
    make_event,
)

STRUCTS: list[tuple[type[msgspec.Struct], tuple[fields.Rule, ...]]] = [
    (ProcessSample, fields.PROCESS),
    (GpuSample, fields.GPU_SAMPLE),
    (TokenDelta, fields.TOKENS),
    (_Envelope, fields.ENVELOPE),
    (PodInfo, fields.POD),  # built, never decoded by msgspec: its defaults are not optionality
    (NodeInfo, fields.NODE),
]


def describe(info: mi.Type) -> tuple[Any, ...]:
    """A type as (kind, nullable, bounds..., lengths...) in the rule table's terms."""
    nullable = False
    if isinstance(info, mi.UnionType):
        others = [t for t in info.types if not isinstance(t, mi.NoneType)]
        nullable = len(others) < len(info.types)
        (info,) = others
    if isinstance(info, mi.StrType):
        return ("string", nullable, info.min_length or 0, info.max_length)
    if isinstance(info, mi.IntType):
        return ("integer", nullable, info.ge, info.le)
    if isinstance(info, mi.FloatType):
        low, exclusive = (info.gt, True) if info.gt is not None else (info.ge, False)
        return ("number", nullable, low, exclusive, info.le)
    if isinstance(info, mi.BoolType):
        return ("boolean", nullable)
    if isinstance(info, mi.DictType):
        key, value = info.key_type, info.value_type
        assert isinstance(key, mi.StrType) and isinstance(value, mi.StrType)
        return ("labels", nullable, info.max_length, key.max_length, value.max_length)
    if isinstance(info, mi.VarTupleType):
        return ("array", nullable, info.max_length)
    if isinstance(info, mi.RawType):
        return ("object", nullable)
    raise AssertionError(f"unexpected type {info!r}")


def expected(rule: fields.Rule) -> tuple[Any, ...]:
    if rule.kind == "string":
        return ("string", rule.nullable, rule.min_length, rule.max_length)
    if rule.kind == "integer":
        return ("integer", rule.nullable, rule.minimum, rule.maximum)
    if rule.kind == "number":
        return ("number", rule.nullable, rule.minimum, rule.exclusive_minimum, rule.maximum)
    if rule.kind == "labels":
        limits = (rule.max_length, fields.MAX_LABEL_KEY, fields.MAX_LABEL_VALUE)
        return ("labels", rule.nullable, *limits)
    if rule.kind == "array":
        return ("array", rule.nullable, rule.max_length)
    return (rule.kind, rule.nullable)


@pytest.mark.parametrize("struct, rules", STRUCTS, ids=lambda x: getattr(x, "__name__", ""))
def test_typed_fields_restate_the_rule_table(
    struct: type[msgspec.Struct], rules: tuple[fields.Rule, ...]
) -> None:
    info = mi.type_info(struct)
    assert isinstance(info, mi.StructType)
    by_name = {f.name: f for f in info.fields}
    for rule in rules:
        field = by_name[rule.name]
        # `time` is an RFC 3339 string, which both paths parse with parse_time.
        assert describe(field.type) == expected(rule), rule.name
        if struct is not PodInfo:
            assert field.required is (rule.name not in fields.OPTIONAL), rule.name
    if struct is not _Envelope:
        assert set(by_name) == {r.name for r in rules} | GPU_COUNTS.get(struct, set())


# Members outside the rule table, checked by `events._gpu_counts` on the explaining path.
GPU_COUNTS: dict[type[msgspec.Struct], set[str]] = {
    PodInfo: {"gpu_requests"},
    NodeInfo: {"gpu_capacity"},
}


@pytest.mark.parametrize("struct", list(GPU_COUNTS), ids=lambda x: x.__name__)
def test_gpu_counts_are_bounded_maps_of_resource_names_to_whole_numbers(
    struct: type[msgspec.Struct],
) -> None:
    info = mi.type_info(struct)
    assert isinstance(info, mi.StructType)
    for field in (f for f in info.fields if f.name in GPU_COUNTS[struct]):
        counts = field.type
        assert isinstance(counts, mi.DictType) and not field.required
        assert counts.max_length == events.MAX_GPU_RESOURCES
        key, value = counts.key_type, counts.value_type
        assert isinstance(key, mi.StrType) and isinstance(value, mi.IntType)
        assert (key.min_length, key.max_length) == (1, fields.MAX_LABEL_KEY)
        assert (value.ge, value.le) == (0, fields.MAX_GPUS)


def test_every_string_and_collection_has_a_maximum_length() -> None:
    tables = [
        fields.ENVELOPE, fields.PROCESS, fields.GPU_SAMPLE, fields.POD, fields.TOKENS, fields.NODE
    ]  # fmt: skip
    for rule in (r for table in tables for r in table):
        if rule.kind in ("string", "labels", "array"):
            assert rule.max_length is not None, rule.name


# --------------------------------------------------------------------------- same answers

PROCESS = ProcessSample(4242, "uid-1", "containerd://ab", 20 * 2**30, 40.0)
SAMPLE = GpuSample(
    "c1", "n1", "MIG-1", "GPU-1", "NVIDIA A100-SXM4-80GB", "3g.40gb", 3, 7, 1.000123,
    40 * 2**30, 30 * 2**30, None, {"karpenter.sh/capacity-type": "spot"},
    (PROCESS, ProcessSample(7, None, None, 2**30, None)),
)  # fmt: skip
TOKENS = TokenDelta("c1", "ns", "pod", "uid-1", "llama", 100, 20, 3, 10.0, 5, 0.5, None)
TIME_MS = 1_795_000_000_123

json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 1, 3, 7, 8, 64, 65, 100, 101, 3600, 2**32, 2**50, 2**50 + 1, 2**63]),
    st.sampled_from([SAMPLE.mem_total_bytes, SAMPLE.mem_total_bytes + 1]),  # cross-field rules
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([0.0, -0.5, 0.5, 1.0, 99.9, 100.0, 100.5, 3600.0, 3600.5, 1e300]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "x", "1.0", "2026-11-26T10:00:00Z", "2026-11-26T10:00:00"]),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["a", "b"]), st.sampled_from(["x", 1, None]), max_size=2),
)
times = st.sampled_from(
    [
        "2026-11-26T10:00:00Z",
        "2026-11-26T10:00:00.123456Z",
        "2026-11-26T10:00:00.123456789Z",
        "2026-11-26T10:00:00+02:00",
        "2026-11-26 10:00:00Z",
        "2026-11-26T10:00:00z",
        "2026-11-26T10:00:00",
        "2026-11-26",
        "20261126T100000Z",
        "26 Nov 2026",
    ]
)


@st.composite
def broken_documents(draw: st.DrawFn, payload: Any) -> dict[str, Any]:
    doc = event_to_dict(make_event(payload, event_id="e-1", source="a", time_ms=TIME_MS))
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        target = draw(st.sampled_from(["envelope", "data", "process"]))
        node = doc if target == "envelope" else doc.get("data")
        if target == "process" and isinstance(node, dict):
            processes = node.get("processes")
            if not isinstance(processes, list) or not processes:
                continue
            node = processes[0]
            if not isinstance(node, dict):
                continue
        if not isinstance(node, dict) or not node:
            continue
        key = draw(st.sampled_from(sorted(node)))
        action = draw(st.sampled_from(["set", "set", "delete", "time"]))
        if action == "delete":
            del node[key]
        elif action == "time":
            doc["time"] = draw(times)
        else:
            node[key] = draw(json_values)
    return doc


def batch_answers(raws: list[bytes | None]) -> list[Any]:
    """What `decode_samples` says of each record, as `decode_event` would put it."""
    events, indices, others = decode_samples(raws)
    answers: dict[int, Any] = {
        index: Ok(event) for index, event in zip(indices, events, strict=True)
    }
    assert not answers.keys() & others.keys()
    return [answers.get(i, others.get(i)) for i in range(len(raws))]


def assert_same_answer(raw: bytes) -> None:
    slow = _decode_slowly(raw)
    assert decode_event(raw) == slow
    assert decode_event(raw, GPU_SAMPLE_TYPE) == slow
    assert decode_event(raw, TOKENS_TYPE) == slow
    assert batch_answers([raw]) == [slow]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.none()
        | st.binary(max_size=16)
        | broken_documents(SAMPLE).map(lambda d: json.dumps(d).encode())
        | broken_documents(TOKENS).map(lambda d: json.dumps(d).encode()),
        max_size=8,
    )
)
def test_a_batch_decodes_as_its_records_one_by_one(raws: list[bytes | None]) -> None:
    assert batch_answers(raws) == [decode_event(raw, GPU_SAMPLE_TYPE) for raw in raws]


@settings(max_examples=600, deadline=None)
@given(broken_documents(SAMPLE))
def test_both_paths_agree_on_gpu_samples(doc: dict[str, Any]) -> None:
    assert_same_answer(json.dumps(doc).encode())  # json: also integers beyond 64 bits


@settings(max_examples=300, deadline=None)
@given(broken_documents(TOKENS))
def test_both_paths_agree_on_token_deltas(doc: dict[str, Any]) -> None:
    assert_same_answer(json.dumps(doc).encode())  # json: also integers beyond 64 bits


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_both_paths_agree_on_any_bytes(raw: bytes) -> None:
    assert_same_answer(raw)


def test_the_fast_path_answers_for_valid_events(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(raw: bytes) -> None:
        raise AssertionError("a valid event took the explaining path")

    monkeypatch.setattr(events, "_decode_slowly", slow)
    raw = encode_event(make_event(SAMPLE, event_id="e-1", source="a", time_ms=TIME_MS))
    assert isinstance(decode_event(raw), Ok)
    assert isinstance(
        decode_event(encode_event(make_event(TOKENS, event_id="t", source="a", time_ms=TIME_MS))),
        Ok,
    )
    decoded = decode_event(raw, GPU_SAMPLE_TYPE)
    assert isinstance(decoded, Ok) and decoded.event.data == SAMPLE
    assert decoded.event.time_ms == TIME_MS
    assert format_time(TIME_MS) in raw.decode()


def test_a_cross_field_rule_is_named_whichever_path_sees_it() -> None:
    doc = event_to_dict(make_event(SAMPLE, event_id="e-1", source="a", time_ms=TIME_MS))
    doc["data"]["processes"][1]["mem_used_bytes"] = 41 * 2**30  # above the device's 40 GiB
    decoded = decode_event(orjson.dumps(doc), GPU_SAMPLE_TYPE)
    assert not isinstance(decoded, Ok)
    assert (decoded.reason, decoded.detail) == (
        "out_of_range",
        "data.processes[1].mem_used_bytes exceeds mem_total_bytes",
    )


def test_none_type_is_what_msgspec_reports_for_null() -> None:
    info = mi.type_info(ProcessSample)
    assert isinstance(info, mi.StructType)
    pod_uid = next(f for f in info.fields if f.name == "pod_uid").type
    assert isinstance(pod_uid, mi.UnionType)
    assert any(isinstance(t, mi.NoneType) for t in pod_uid.types)


@pytest.mark.parametrize(
    "where, key, value",
    [
        ("data", "mem_used_bytes", SAMPLE.mem_total_bytes),
        ("data", "mem_used_bytes", SAMPLE.mem_total_bytes + 1),
        ("data", "mig_slices", 7),
        ("data", "mig_slices", 8),
        ("process", "mem_used_bytes", SAMPLE.mem_total_bytes),
        ("process", "mem_used_bytes", SAMPLE.mem_total_bytes + 1),
    ],
)
def test_both_paths_agree_at_the_cross_field_limits(where: str, key: str, value: int) -> None:
    doc = event_to_dict(make_event(SAMPLE, event_id="e-1", source="a", time_ms=TIME_MS))
    node = doc["data"] if where == "data" else doc["data"]["processes"][1]
    node[key] = value
    raw = orjson.dumps(doc)
    assert_same_answer(raw)
    limit = 7 if key == "mig_slices" else SAMPLE.mem_total_bytes
    assert isinstance(decode_event(raw), Ok) is (value <= limit)


@pytest.mark.parametrize("expect", [None, GPU_SAMPLE_TYPE, TOKENS_TYPE])
def test_deeply_nested_input_is_rejected_not_raised(expect: str | None) -> None:
    nested = b"[" * 200_000 + b"]" * 200_000
    envelope = (
        b'{"specversion":"1.0","id":"a","source":"s","type":"io.gpuledger.gpu.sample.v1",'
        b'"time":"2026-11-26T10:00:00Z","data":' + nested + b"}"
    )
    for raw in (nested, envelope):
        decoded = decode_event(raw, expect)
        assert not isinstance(decoded, Ok)
        assert decoded == _decode_slowly(raw)


@pytest.mark.parametrize(
    "where, member",
    [
        ("envelope", b'"datacontenttype":"application/\xffjson"'),
        ("envelope", b'"x":1e400'),
        ("envelope", b'"traceparent":"00-ab"'),
        ("data", b'"power_w":1e400'),
        ("data", b'"note":"\xc3\x28"'),
        ("data", b'"power_w":350.5'),
        ("process", b'"cmd":"\xc3\x28"'),
        ("process", b'"cmd":"python"'),
    ],
)
def test_members_the_structs_do_not_declare_are_judged_as_the_explaining_path_would(
    where: str, member: bytes
) -> None:
    raw = encode_event(make_event(SAMPLE, event_id="e-1", source="a", time_ms=TIME_MS))
    anchor = {
        "envelope": b'"specversion":',
        "data": b'"cluster":',
        "process": b'"pid":4242,',
    }[where]
    assert raw.count(anchor) == 1
    changed = raw.replace(anchor, member + b"," + anchor)
    assert_same_answer(changed)
    readable = b"\xff" not in member and b"\xc3\x28" not in member and b"1e400" not in member
    assert isinstance(decode_event(changed, GPU_SAMPLE_TYPE), Ok) is readable

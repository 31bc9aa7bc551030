"""A rejection's detail stays short whatever the input: it goes to the dead-letter topic.

A value the detail names (an unknown `type`, an unknown `specversion`, a label key) is repeated
as a short prefix with its length, never whole.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.events import (
    GPU_SAMPLE_TYPE,
    TOKENS_TYPE,
    GpuSample,
    Ok,
    ProcessSample,
    Rejected,
    TokenDelta,
    _decode_slowly,
    decode_event,
    event_to_dict,
    make_event,
)

MAX_DETAIL = 1000

SAMPLE = GpuSample(
    "c1", "n1", "GPU-1", "GPU-1", "NVIDIA H100 80GB HBM3", None, None, 7, 1.0, 80 * 2**30,
    2**30, None, {"team": "a"}, (ProcessSample(7, "uid-1", None, 2**30, None),),
)  # fmt: skip
TOKENS = TokenDelta("c1", "ns", "pod", "uid-1", "llama", 100, 20, 3, 10.0)


def document(payload: Any) -> dict[str, Any]:
    return event_to_dict(make_event(payload, event_id="e-1", source="a", time_ms=0))


def assert_short(answer: Any) -> None:
    assert isinstance(answer, Ok | Rejected)
    if isinstance(answer, Rejected):
        assert len(answer.detail) <= MAX_DETAIL, answer.detail[:200]
        assert len(answer.reason) <= 32


def every_answer(raw: bytes) -> Any:
    answer = decode_event(raw)
    for expect in (GPU_SAMPLE_TYPE, TOKENS_TYPE):
        assert decode_event(raw, expect) == answer
    assert_short(answer)
    return answer


long_texts = st.builds(
    lambda unit, count: unit * count,
    st.text(min_size=1, max_size=3),
    st.integers(min_value=0, max_value=120_000),
)
members = st.sampled_from(
    [
        ("specversion",),
        ("id",),
        ("source",),
        ("type",),
        ("time",),
        ("data", "cluster"),
        ("data", "node_labels"),
        ("data", "processes"),
        ("data", "processes", 0, "container_id"),
        ("data", "model"),
    ]
)


@st.composite
def documents_with_a_long_value(draw: st.DrawFn) -> bytes:
    doc = document(draw(st.sampled_from([SAMPLE, TOKENS])))
    path = draw(members)
    node: Any = doc
    for key in path[:-1]:
        if not isinstance(node, dict | list) or (isinstance(node, dict) and key not in node):
            return orjson.dumps(doc)
        node = node[key]
    text = draw(long_texts)
    shape = draw(st.sampled_from(["text", "key", "value", "list"]))
    value: Any = {
        "text": text,
        "key": {text: "v"},
        "value": {"k": text},
        "list": [text] * draw(st.integers(min_value=0, max_value=3)),
    }[shape]
    if isinstance(node, dict):
        node[path[-1]] = value
    return orjson.dumps(doc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents_with_a_long_value())
def test_any_long_value_gives_a_short_detail(raw: bytes) -> None:
    every_answer(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes_give_an_answer_with_a_short_detail(raw: bytes) -> None:
    every_answer(raw)


@pytest.mark.parametrize("size", [300, 100_000])
def test_an_unknown_type_is_named_by_a_prefix_and_its_length(size: int) -> None:
    doc = document(SAMPLE)
    doc["type"] = "a" * size
    answer = every_answer(orjson.dumps(doc))
    assert isinstance(answer, Rejected)
    assert "a" * 100 not in answer.detail
    assert f"({size:,} characters)" in answer.detail
    assert len(answer.detail) <= 200


def test_a_short_unknown_type_is_named_whole() -> None:
    doc = document(SAMPLE)
    doc["type"] = "io.gpuledger.gpu.sample.v9"
    answer = every_answer(orjson.dumps(doc))
    assert answer == Rejected(
        "unknown_type", "type 'io.gpuledger.gpu.sample.v9' is not a gpuledger event type"
    )


def test_an_unknown_type_within_the_length_limit_is_shortened() -> None:
    doc = document(SAMPLE)
    doc["type"] = "io.example." + "x" * 200
    answer = every_answer(orjson.dumps(doc))
    assert isinstance(answer, Rejected) and answer.reason == "unknown_type"
    assert "'io.example.xxxx" in answer.detail and "(211 characters)" in answer.detail
    assert len(answer.detail) <= 120


@pytest.mark.parametrize("size", [15, 100_000])
def test_an_unknown_specversion_is_named_by_a_prefix(size: int) -> None:
    doc = document(TOKENS)
    doc["specversion"] = "9" * size
    answer = every_answer(orjson.dumps(doc))
    assert isinstance(answer, Rejected)
    assert "9" * 40 not in answer.detail
    assert len(answer.detail) <= 200


def test_the_explaining_path_answers_alike() -> None:
    doc = document(SAMPLE)
    doc["type"] = "t" * 50_000
    raw = orjson.dumps(doc)
    assert decode_event(raw) == _decode_slowly(raw)

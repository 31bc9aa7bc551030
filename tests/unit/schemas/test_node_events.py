"""The node event (`io.gpuledger.node.v1`): round trip, the published JSON Schema, rejections
with their reasons, and no bytes that make the decoder raise."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import json_schemas
from schemas.events import (
    NODE_TYPE,
    NODES_TOPIC,
    CloudEvent,
    NodeInfo,
    Ok,
    Rejected,
    decode_event,
    encode_event,
    event_to_dict,
    make_event,
)
from schemas.fields import MAX_BYTES, MAX_GPUS, MAX_PROVIDER_ID

AZURE_VMSS = (
    "azure:///subscriptions/2f1c0b1e-8f0a-4c53-9a52-3f4f6d0c9a11/resourceGroups/mc_gpu_rg"
    "/providers/Microsoft.Compute/virtualMachineScaleSets/aks-gpu-12345678-vmss/virtualMachines/3"
)


def node_event(**changes: Any) -> CloudEvent[NodeInfo]:
    fields: dict[str, Any] = dict(
        cluster="prod-eu",
        node="gpu-node-1",
        provider_id="aws:///us-east-1a/i-0abc1234567890def",
        instance_type="p5.48xlarge",
        gpus=8,
        cpu_millicores=192_000,
        memory_bytes=2048 * 2**30,
        deleted=False,
    )
    fields.update(changes)
    return make_event(
        NodeInfo(**fields), event_id="uid-1:100", source="pods", time_ms=1_795_000_000_000
    )


def document(**data: Any) -> dict[str, Any]:
    doc = event_to_dict(node_event())
    doc["data"].update(data)
    return doc


def test_the_topic_and_type() -> None:
    assert NODES_TOPIC == "gpuledger.nodes" and NODE_TYPE == "io.gpuledger.node.v1"


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"provider_id": AZURE_VMSS, "instance_type": "Standard_ND96isr_H100_v5"},
        {"provider_id": "gce://my-project/us-central1-a/gke-gpu-pool-1a2b", "gpus": 0},
        {"provider_id": "", "instance_type": "", "cpu_millicores": 0, "memory_bytes": 0},
        {"deleted": True},
    ],
)
def test_round_trip_is_exact_and_the_schema_accepts_it(changes: dict[str, Any]) -> None:
    event = node_event(**changes)
    decoded = decode_event(encode_event(event))
    assert isinstance(decoded, Ok) and decoded.event == event
    jsonschema.validate(event_to_dict(event), json_schemas.schema_for(NODE_TYPE))


@pytest.mark.parametrize(
    "data, reason",
    [
        ({"gpus": -1}, "out_of_range"),
        ({"gpus": MAX_GPUS + 1}, "out_of_range"),
        ({"memory_bytes": MAX_BYTES + 1}, "out_of_range"),
        ({"cpu_millicores": 1.5}, "wrong_type"),
        ({"gpus": True}, "wrong_type"),
        ({"deleted": 0}, "wrong_type"),
        ({"node": ""}, "wrong_type"),
        ({"provider_id": None}, "wrong_type"),
        ({"provider_id": "x" * (MAX_PROVIDER_ID + 1)}, "too_long"),
        ({"instance_type": "x" * 64}, "too_long"),
    ],
)
def test_bad_values_are_rejected_with_a_reason(data: dict[str, Any], reason: str) -> None:
    doc = document(**data)
    decoded = decode_event(orjson.dumps(doc))
    assert isinstance(decoded, Rejected) and decoded.reason == reason, decoded
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, json_schemas.schema_for(NODE_TYPE))


def test_a_missing_field_is_named() -> None:
    doc = document()
    del doc["data"]["provider_id"]
    decoded = decode_event(orjson.dumps(doc))
    assert decoded == Rejected("missing_field", "data.provider_id: missing")


VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=True),
    st.text(max_size=600),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)


@settings(max_examples=300)
@given(
    st.sampled_from([*sorted(document()["data"]), "extra"]),
    VALUES,
    st.sampled_from(["", "id", "time", "type", "specversion"]),
    VALUES,
)
def test_any_field_value_decodes_or_is_rejected(
    name: str, value: Any, envelope_name: str, envelope_value: Any
) -> None:
    doc = copy.deepcopy(document())
    doc["data"][name] = value
    if envelope_name:
        doc[envelope_name] = envelope_value
    decoded = decode_event(json.dumps(doc).encode())  # big integers, NaN: what orjson refuses
    assert isinstance(decoded, Ok | Rejected)
    if isinstance(decoded, Ok):
        assert decoded.event.type == NODE_TYPE or envelope_name == "type"
        assert decode_event(encode_event(decoded.event)) == decoded or envelope_name == "type"


@settings(max_examples=500)
@given(st.binary(max_size=400))
def test_no_bytes_make_the_decoder_raise(raw: bytes) -> None:
    good = encode_event(node_event())
    for candidate in (raw, good[: len(raw)] + raw, raw + good[len(raw) :]):
        assert isinstance(decode_event(candidate), Ok | Rejected)

"""The CloudEvents gpuledger moves through Kafka (SPEC section 2), as frozen dataclasses.

`decode_event` turns any bytes into `Ok(event)` or `Rejected(reason, detail)`; it never raises.
`encode_event` writes CloudEvents 1.0 structured-mode JSON with orjson. Field rules live in
`schemas.fields` so the decoder and the published JSON Schemas cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

import orjson

from schemas import fields

GPU_SAMPLE_TYPE = "io.gpuledger.gpu.sample.v1"
POD_TYPE = "io.gpuledger.pod.v1"
TOKENS_TYPE = "io.gpuledger.tokens.v1"

GPU_SAMPLES_TOPIC = "gpuledger.gpu-samples"
PODS_TOPIC = "gpuledger.pods"
TOKENS_TOPIC = "gpuledger.tokens"
COST_WINDOWS_TOPIC = "gpuledger.cost-windows"
TOKEN_COST_WINDOWS_TOPIC = "gpuledger.token-cost-windows"
DEAD_LETTER_TOPIC = "gpuledger.dead-letter"


@dataclass(frozen=True, slots=True)
class ProcessSample:
    pid: int
    pod_uid: str | None
    container_id: str | None
    mem_used_bytes: int
    sm_util_pct: float | None


@dataclass(frozen=True, slots=True)
class GpuSample:
    cluster: str
    node: str
    device_uuid: str
    gpu_uuid: str
    gpu_model: str
    mig_profile: str | None
    mig_slices: int | None
    gpu_slices: int
    interval_s: float
    mem_total_bytes: int
    mem_used_bytes: int
    sm_util_pct: float | None
    node_labels: Mapping[str, str] = field(default_factory=dict)
    processes: tuple[ProcessSample, ...] = ()


@dataclass(frozen=True, slots=True)
class PodInfo:
    cluster: str
    uid: str
    namespace: str
    name: str
    node: str
    labels: Mapping[str, str] = field(default_factory=dict)
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class TokenDelta:
    cluster: str
    namespace: str
    pod: str
    pod_uid: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    requests: int
    interval_s: float
    cached_tokens: int | None = None
    prefill_s: float | None = None
    decode_s: float | None = None


Payload = GpuSample | PodInfo | TokenDelta
P = TypeVar("P", GpuSample, PodInfo, TokenDelta)


@dataclass(frozen=True, slots=True)
class CloudEvent(Generic[P]):
    """A CloudEvents 1.0 envelope; `time_ms` is the event time in Unix milliseconds (UTC)."""

    id: str
    source: str
    type: str
    time_ms: int
    data: P


@dataclass(frozen=True, slots=True)
class Ok(Generic[P]):
    event: CloudEvent[P]


@dataclass(frozen=True, slots=True)
class Rejected:
    """Why a record could not be used; `reason` is a short stable code for metrics."""

    reason: str
    detail: str


Decoded = Ok[GpuSample] | Ok[PodInfo] | Ok[TokenDelta] | Rejected

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_TYPE_OF_PAYLOAD: dict[type[Any], str] = {
    GpuSample: GPU_SAMPLE_TYPE,
    PodInfo: POD_TYPE,
    TokenDelta: TOKENS_TYPE,
}


def format_time(time_ms: int) -> str:
    """RFC 3339 UTC with millisecond precision, e.g. ``2026-11-26T10:00:00.000Z``."""
    moment = datetime.fromtimestamp(time_ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{time_ms % 1000:03d}Z"


def parse_time(text: str) -> int:
    """Unix milliseconds from an RFC 3339 timestamp; raises ValueError on anything else."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError("timestamp has no UTC offset")
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def make_event(data: P, *, event_id: str, source: str, time_ms: int) -> CloudEvent[P]:
    return CloudEvent(
        id=event_id, source=source, type=_TYPE_OF_PAYLOAD[type(data)], time_ms=time_ms, data=data
    )


def event_to_dict(event: CloudEvent[Any]) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "time": format_time(event.time_ms),
        "datacontenttype": "application/json",
        "data": _payload_to_dict(event.data),
    }


def encode_event(event: CloudEvent[Any]) -> bytes:
    return orjson.dumps(event_to_dict(event))


def _payload_to_dict(data: Payload) -> dict[str, Any]:
    if isinstance(data, GpuSample):
        return {
            "cluster": data.cluster,
            "node": data.node,
            "device_uuid": data.device_uuid,
            "gpu_uuid": data.gpu_uuid,
            "gpu_model": data.gpu_model,
            "mig_profile": data.mig_profile,
            "mig_slices": data.mig_slices,
            "gpu_slices": data.gpu_slices,
            "interval_s": data.interval_s,
            "mem_total_bytes": data.mem_total_bytes,
            "mem_used_bytes": data.mem_used_bytes,
            "sm_util_pct": data.sm_util_pct,
            "node_labels": dict(data.node_labels),
            "processes": [
                {
                    "pid": p.pid,
                    "pod_uid": p.pod_uid,
                    "container_id": p.container_id,
                    "mem_used_bytes": p.mem_used_bytes,
                    "sm_util_pct": p.sm_util_pct,
                }
                for p in data.processes
            ],
        }
    if isinstance(data, PodInfo):
        return {
            "cluster": data.cluster,
            "uid": data.uid,
            "namespace": data.namespace,
            "name": data.name,
            "node": data.node,
            "labels": dict(data.labels),
            "namespace_labels": dict(data.namespace_labels),
            "deleted": data.deleted,
        }
    return {
        "cluster": data.cluster,
        "namespace": data.namespace,
        "pod": data.pod,
        "pod_uid": data.pod_uid,
        "model": data.model,
        "prompt_tokens": data.prompt_tokens,
        "completion_tokens": data.completion_tokens,
        "requests": data.requests,
        "interval_s": data.interval_s,
        "cached_tokens": data.cached_tokens,
        "prefill_s": data.prefill_s,
        "decode_s": data.decode_s,
    }


def decode_event(raw: bytes | bytearray | memoryview | None) -> Decoded:
    """Parse and validate one Kafka value. Never raises."""
    if raw is None:
        return Rejected("empty", "record has no value")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Rejected("invalid_json", f"not JSON: {exc}")
    try:
        return _decode_document(doc)
    except fields.FieldError as exc:
        return Rejected(exc.reason, str(exc))
    except (RecursionError, ValueError, TypeError, OverflowError) as exc:
        return Rejected("invalid", f"unusable record: {exc}")


def _decode_document(doc: Any) -> Decoded:
    envelope = fields.check_object(doc, fields.ENVELOPE, "")
    if envelope["specversion"] != "1.0":
        raise fields.FieldError("unknown_version", f"specversion {envelope['specversion']!r}")
    try:
        time_ms = parse_time(envelope["time"])
    except ValueError as exc:
        raise fields.FieldError("wrong_type", f"time: not an RFC 3339 timestamp ({exc})") from exc
    kind = envelope["type"]
    data = envelope["data"]
    if kind == GPU_SAMPLE_TYPE:
        sample = _gpu_sample(fields.check_object(data, fields.GPU_SAMPLE, "data."))
        return Ok(CloudEvent(envelope["id"], envelope["source"], kind, time_ms, sample))
    if kind == POD_TYPE:
        pod = _pod(fields.check_object(data, fields.POD, "data."))
        return Ok(CloudEvent(envelope["id"], envelope["source"], kind, time_ms, pod))
    if kind == TOKENS_TYPE:
        tokens = _tokens(fields.check_object(data, fields.TOKENS, "data."))
        return Ok(CloudEvent(envelope["id"], envelope["source"], kind, time_ms, tokens))
    raise fields.FieldError("unknown_type", f"type {kind!r} is not a gpuledger event type")


def _gpu_sample(d: dict[str, Any]) -> GpuSample:
    total = d["mem_total_bytes"]
    if d["mem_used_bytes"] > total:
        raise fields.FieldError("out_of_range", "data.mem_used_bytes exceeds mem_total_bytes")
    mig_slices = d["mig_slices"]
    if mig_slices is not None and mig_slices > d["gpu_slices"]:
        raise fields.FieldError("out_of_range", "data.mig_slices exceeds gpu_slices")
    processes = []
    for i, raw in enumerate(d["processes"]):
        p = fields.check_object(raw, fields.PROCESS, f"data.processes[{i}].")
        if p["mem_used_bytes"] > total:
            raise fields.FieldError(
                "out_of_range", f"data.processes[{i}].mem_used_bytes exceeds mem_total_bytes"
            )
        processes.append(
            ProcessSample(
                pid=p["pid"],
                pod_uid=p["pod_uid"],
                container_id=p["container_id"],
                mem_used_bytes=p["mem_used_bytes"],
                sm_util_pct=_float_or_none(p["sm_util_pct"]),
            )
        )
    return GpuSample(
        cluster=d["cluster"],
        node=d["node"],
        device_uuid=d["device_uuid"],
        gpu_uuid=d["gpu_uuid"],
        gpu_model=d["gpu_model"],
        mig_profile=d["mig_profile"],
        mig_slices=mig_slices,
        gpu_slices=d["gpu_slices"],
        interval_s=float(d["interval_s"]),
        mem_total_bytes=total,
        mem_used_bytes=d["mem_used_bytes"],
        sm_util_pct=_float_or_none(d["sm_util_pct"]),
        node_labels=d["node_labels"],
        processes=tuple(processes),
    )


def _pod(d: dict[str, Any]) -> PodInfo:
    return PodInfo(
        cluster=d["cluster"],
        uid=d["uid"],
        namespace=d["namespace"],
        name=d["name"],
        node=d["node"],
        labels=d["labels"],
        namespace_labels=d["namespace_labels"],
        deleted=d["deleted"],
    )


def _tokens(d: dict[str, Any]) -> TokenDelta:
    return TokenDelta(
        cluster=d["cluster"],
        namespace=d["namespace"],
        pod=d["pod"],
        pod_uid=d["pod_uid"],
        model=d["model"],
        prompt_tokens=d["prompt_tokens"],
        completion_tokens=d["completion_tokens"],
        requests=d["requests"],
        interval_s=float(d["interval_s"]),
        cached_tokens=d.get("cached_tokens"),
        prefill_s=_float_or_none(d.get("prefill_s")),
        decode_s=_float_or_none(d.get("decode_s")),
    )


def _float_or_none(value: int | float | None) -> float | None:
    return None if value is None else float(value)

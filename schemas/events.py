"""The CloudEvents gpuledger moves through Kafka (design §2), as frozen typed structs.

`decode_event` turns any bytes into `Ok(event)` or `Rejected(reason, detail)`; it never raises.
`encode_event` writes CloudEvents 1.0 structured-mode JSON with orjson. Field rules live in
`schemas.fields` (the published JSON Schemas and the explaining decoder are made from them); the
typed fields below restate them for the fast decoder, and a test holds the two together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Generic, TypeVar

import msgspec
import orjson
from msgspec import Meta, Struct, field

from schemas import fields

GPU_SAMPLE_TYPE = "io.gpuledger.gpu.sample.v1"
POD_TYPE = "io.gpuledger.pod.v1"
TOKENS_TYPE = "io.gpuledger.tokens.v1"
NODE_TYPE = "io.gpuledger.node.v1"

GPU_SAMPLES_TOPIC = "gpuledger.gpu-samples"
PODS_TOPIC = "gpuledger.pods"
TOKENS_TOPIC = "gpuledger.tokens"
NODES_TOPIC = "gpuledger.nodes"
COST_WINDOWS_TOPIC = "gpuledger.cost-windows"
TOKEN_COST_WINDOWS_TOPIC = "gpuledger.token-cost-windows"
DEAD_LETTER_TOPIC = "gpuledger.dead-letter"


# Constrained field types: decoding into the classes below checks them (msgspec, in C).
# They restate the rule table in `schemas.fields` (which also yields the JSON Schemas); a unit
# test compares the two, field by field. A payload member they do not declare sends the record
# to the explaining decoder (which ignores such members): declare new fields here too.
# Lengths are in characters; `schemas.fields` says why each limit is what it is.
SpecVersion = Annotated[str, Meta(min_length=1, max_length=fields.MAX_SPECVERSION)]
EventId = Annotated[str, Meta(min_length=1, max_length=fields.MAX_EVENT_ID)]
Source = Annotated[str, Meta(min_length=1, max_length=fields.MAX_SOURCE)]
EventType = Annotated[str, Meta(min_length=1, max_length=fields.MAX_TYPE)]
Time = Annotated[str, Meta(min_length=1, max_length=fields.MAX_TIME)]
DnsSubdomain = Annotated[str, Meta(min_length=1, max_length=fields.MAX_DNS_SUBDOMAIN)]
NodeName = Annotated[str, Meta(max_length=fields.MAX_DNS_SUBDOMAIN)]  # "": not scheduled
DnsLabel = Annotated[str, Meta(min_length=1, max_length=fields.MAX_DNS_LABEL)]
Uuid = Annotated[str, Meta(min_length=1, max_length=fields.MAX_UUID)]
SeriesUid = Annotated[str, Meta(min_length=1, max_length=fields.MAX_SERIES_UID)]
NvmlName = Annotated[str, Meta(min_length=1, max_length=fields.MAX_NVML_NAME)]
Model = Annotated[str, Meta(min_length=1, max_length=fields.MAX_MODEL)]
LabelKey = Annotated[str, Meta(max_length=fields.MAX_LABEL_KEY)]
LabelValue = Annotated[str, Meta(max_length=fields.MAX_LABEL_VALUE)]
Pid = Annotated[int, Meta(ge=0, le=2**32 - 1)]
Bytes = Annotated[int, Meta(ge=0, le=fields.MAX_BYTES)]
TotalBytes = Annotated[int, Meta(ge=1, le=fields.MAX_BYTES)]
Percent = Annotated[float, Meta(ge=0, le=100)]
Slices = Annotated[int, Meta(ge=1, le=64)]
IntervalS = Annotated[float, Meta(gt=0, le=fields.MAX_INTERVAL_S)]
Tokens = Annotated[int, Meta(ge=0, le=fields.MAX_TOKENS)]
BusyS = Annotated[float, Meta(ge=0, le=10**9)]
Labels = Annotated[Mapping[LabelKey, LabelValue], Meta(max_length=fields.MAX_LABELS)]
ProviderId = Annotated[str, Meta(max_length=fields.MAX_PROVIDER_ID)]  # "": none
InstanceType = Annotated[str, Meta(max_length=fields.MAX_LABEL_VALUE)]  # "": not labelled
Gpus = Annotated[int, Meta(ge=0, le=fields.MAX_GPUS)]
Millicores = Annotated[int, Meta(ge=0, le=fields.MAX_MILLICORES)]
# GPU extended resources (`nvidia.com/gpu`, `nvidia.com/mig-3g.40gb`, ...) and a count of each:
# a pod's requests, a node's capacity. Resource names are qualified names, bounded as label
# keys are; a node lists a few (whole GPUs, shared GPUs, one per MIG profile). Not in the rule
# table of `schemas.fields`: `_gpu_counts` below checks them on the explaining path.
MAX_GPU_RESOURCES = 64
GpuResource = Annotated[str, Meta(min_length=1, max_length=fields.MAX_LABEL_KEY)]
GpuCount = Annotated[int, Meta(ge=0, le=fields.MAX_GPUS)]
GpuCounts = Annotated[Mapping[GpuResource, GpuCount], Meta(max_length=MAX_GPU_RESOURCES)]


class ProcessSample(Struct, frozen=True, forbid_unknown_fields=True):
    pid: Pid
    pod_uid: Uuid | None
    container_id: Uuid | None
    mem_used_bytes: Bytes
    sm_util_pct: Percent | None


Processes = Annotated[tuple[ProcessSample, ...], Meta(max_length=fields.MAX_PROCESSES)]


class GpuSample(Struct, frozen=True, forbid_unknown_fields=True):
    cluster: DnsSubdomain
    node: DnsSubdomain
    device_uuid: Uuid
    gpu_uuid: Uuid
    gpu_model: NvmlName
    mig_profile: NvmlName | None
    mig_slices: Slices | None
    gpu_slices: Slices
    interval_s: IntervalS
    mem_total_bytes: TotalBytes
    mem_used_bytes: Bytes
    sm_util_pct: Percent | None
    node_labels: Labels
    processes: Processes


class PodInfo(Struct, frozen=True):
    cluster: DnsSubdomain
    uid: Uuid
    namespace: DnsLabel
    name: DnsSubdomain
    node: NodeName
    labels: Labels = field(default_factory=dict)
    namespace_labels: Labels = field(default_factory=dict)
    deleted: bool = False
    # GPU extended resource -> the count the pod holds (Kubernetes' effective request); empty
    # once it finished (Succeeded or Failed). Absent in events of older watchers: empty.
    gpu_requests: GpuCounts = field(default_factory=dict)


class NodeInfo(Struct, frozen=True, forbid_unknown_fields=True):
    """A Kubernetes node's cloud identity and capacity; a count or size that could not be read
    from the node is 0."""

    cluster: DnsSubdomain
    node: DnsSubdomain
    provider_id: ProviderId
    instance_type: InstanceType
    gpus: Gpus
    cpu_millicores: Millicores
    memory_bytes: Bytes
    deleted: bool
    # status.capacity of its GPU extended resources (time-sliced: GPUs x replicas; MIG mixed:
    # one per profile). Absent in events of older watchers: empty.
    gpu_capacity: GpuCounts = field(default_factory=dict)


class TokenDelta(Struct, frozen=True, forbid_unknown_fields=True):
    cluster: DnsSubdomain
    namespace: DnsLabel
    pod: DnsSubdomain
    pod_uid: SeriesUid
    model: Model
    prompt_tokens: Tokens
    completion_tokens: Tokens
    requests: Tokens
    interval_s: IntervalS
    cached_tokens: Tokens | None = None
    prefill_s: BusyS | None = None
    decode_s: BusyS | None = None


Payload = GpuSample | PodInfo | TokenDelta | NodeInfo
P = TypeVar("P", GpuSample, PodInfo, TokenDelta, NodeInfo)


class CloudEvent(Struct, Generic[P], frozen=True):
    """A CloudEvents 1.0 envelope; `time_ms` is the event time in Unix milliseconds (UTC)."""

    id: str
    source: str
    type: str
    time_ms: int
    data: P


class Ok(Struct, Generic[P], frozen=True):
    event: CloudEvent[P]


class Rejected(Struct, frozen=True):
    """Why a record could not be used; `reason` is a short stable code for metrics."""

    reason: str
    detail: str


Decoded = Ok[GpuSample] | Ok[PodInfo] | Ok[TokenDelta] | Ok[NodeInfo] | Rejected

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
_SEPARATORS = ("--T::", "--t::")  # at 4, 7, 10, 13 and 16 in YYYY-MM-DDTHH:MM:SS
_MAX_TIME = fields.MAX_TIME
_FIRST_MS = (datetime(1, 1, 1, tzinfo=UTC) - _EPOCH) // _MILLISECOND
_LAST_MS = (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) - _EPOCH) // _MILLISECOND

_TYPE_OF_PAYLOAD: dict[type[Any], str] = {
    GpuSample: GPU_SAMPLE_TYPE,
    PodInfo: POD_TYPE,
    TokenDelta: TOKENS_TYPE,
    NodeInfo: NODE_TYPE,
}


def format_time(time_ms: int) -> str:
    """RFC 3339 UTC with millisecond precision, e.g. ``2026-11-26T10:00:00.000Z``; raises
    ValueError for a time outside the years 0001-9999. Integer arithmetic: exact at any date."""
    try:
        moment = _EPOCH + timedelta(milliseconds=time_ms)
    except OverflowError as exc:
        raise ValueError(f"{time_ms} ms since 1970 is outside the years 0001-9999") from exc
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}.{time_ms % 1000:03d}Z"
    )


_TIMES: dict[str, int] = {}  # recent timestamps: an agent stamps all its devices alike


def parse_time(text: str) -> int:
    """Unix milliseconds from an RFC 3339 date-time, ``YYYY-MM-DDTHH:MM:SS[.fraction]`` then
    ``Z`` or ``+HH:MM`` / ``-HH:MM`` (RFC 3339 §5.6; ``t`` and ``z`` may be lower case). Digits
    past the millisecond are cut. Raises ValueError on anything else: ISO 8601's other forms
    (week and ordinal dates, the basic format, a space for the ``T``), a missing offset, a
    component out of range (a leap second too: Unix time has none), or an instant outside the
    years 0001-9999 in UTC."""
    known = _TIMES.get(text)
    if known is not None:
        return known
    if len(_TIMES) >= 4096:
        _TIMES.clear()
    _TIMES[text] = time_ms = _parse_time(text)
    return time_ms


def _parse_time(text: str) -> int:
    # The layout is checked here, datetime.fromisoformat (C) checks the digits and the ranges:
    # it takes a superset of RFC 3339, and everything beyond it breaks the layout checked first.
    size = len(text)
    if not (19 <= size <= _MAX_TIME and text.isascii() and text[4:17:3] in _SEPARATORS):
        raise ValueError("not YYYY-MM-DDTHH:MM:SS with Z or an offset")
    zone = text[-1]
    if zone == "Z" or zone == "z":  # two compares: faster than `in`
        zone_at = size - 1
    elif text[-6] in "+-" and text[-3] == ":" and text[-2] <= "5":  # fromisoformat: +01:60 is 2 h
        zone_at = size - 6
    elif zone.isdigit() and size == 19:
        raise ValueError("timestamp has no UTC offset")
    else:
        raise ValueError("UTC offset is not Z, +HH:MM or -HH:MM")
    if zone_at != 19 and (zone_at < 21 or text[19] != "."):  # fromisoformat takes "," and ".Z"
        raise ValueError("seconds are not followed by a dot and digits, nor by the offset")
    moment = datetime.fromisoformat(text if zone != "z" and text[10] != "t" else text.upper())
    time_ms = (moment - _EPOCH) // _MILLISECOND
    if not _FIRST_MS <= time_ms <= _LAST_MS:  # an offset took it past year 1 or 9999
        raise ValueError("outside the years 0001-9999 in UTC")
    return time_ms


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
            "gpu_requests": dict(data.gpu_requests),
        }
    if isinstance(data, NodeInfo):
        return {
            "cluster": data.cluster,
            "node": data.node,
            "provider_id": data.provider_id,
            "instance_type": data.instance_type,
            "gpus": data.gpus,
            "cpu_millicores": data.cpu_millicores,
            "memory_bytes": data.memory_bytes,
            "deleted": data.deleted,
            "gpu_capacity": dict(data.gpu_capacity),
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


class _Envelope(Struct, frozen=True, forbid_unknown_fields=True):
    """The wire form of a CloudEvent: `data` stays raw until `type` says what it is.

    Members it does not know send a record down the explaining path: msgspec skips unknown
    members without checking them (bad UTF-8, numbers out of range), which orjson would reject."""

    specversion: SpecVersion
    id: EventId
    source: Source
    type: EventType
    time: Time
    data: msgspec.Raw
    datacontenttype: str | None = None  # written by encode_event; not checked by either path


class _SampleEnvelope(_Envelope, frozen=True):
    """A GPU sample's wire form, decoded in one pass on the samples topic."""

    data: GpuSample  # type: ignore[assignment]  # narrows Raw: the same member, typed


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_SAMPLE_ENVELOPE = msgspec.json.Decoder(_SampleEnvelope)
# The high-volume payloads. Pod and node events (a few per pod or node lifetime) take the
# explaining path: PodInfo has defaults for convenience, which a typed decode would read as
# optional fields.
_PAYLOAD_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    GPU_SAMPLE_TYPE: msgspec.json.Decoder(GpuSample),
    TOKENS_TYPE: msgspec.json.Decoder(TokenDelta),
}


def decode_event(raw: bytes | bytearray | memoryview | None, expect: str | None = None) -> Decoded:
    """Parse and validate one Kafka value. Never raises.

    A well-formed event is decoded and checked in one typed pass (msgspec); anything that pass
    refuses is decoded again field by field, which says exactly what is wrong. `expect` (an
    event type) only makes the common case faster; any type is still decoded."""
    if raw is None:
        return Rejected("empty", "record has no value")
    if expect == GPU_SAMPLE_TYPE:
        event = _fast_sample(raw)
        return Ok(event) if event is not None else _decode_slowly(raw)
    try:
        envelope = _ENVELOPE.decode(raw)
        decoder = _PAYLOAD_DECODERS.get(envelope.type)
        if decoder is not None and envelope.specversion == "1.0":
            data = decoder.decode(envelope.data)
            if type(data) is not GpuSample or _within_device(data):
                time_ms = parse_time(envelope.time)
                return Ok(CloudEvent(envelope.id, envelope.source, envelope.type, time_ms, data))
    except (msgspec.MsgspecError, RecursionError, ValueError, TypeError, OverflowError):
        pass  # deeply nested, malformed or out of bounds: the explaining path says which
    return _decode_slowly(raw)


def decode_samples(
    raws: Sequence[bytes | bytearray | memoryview | None],
) -> tuple[list[CloudEvent[GpuSample]], list[int], dict[int, Decoded]]:
    """`decode_event(raw, GPU_SAMPLE_TYPE)` over a fetched batch, for the worker: the GPU-sample
    events, the index in `raws` each came from, and what every other record decoded to (a
    rejection, or an event of another type). Same answers as one call per record."""
    events: list[CloudEvent[GpuSample]] = []
    indices: list[int] = []
    others: dict[int, Decoded] = {}
    fast = _fast_sample
    for index, raw in enumerate(raws):
        event = fast(raw)
        if event is not None:
            events.append(event)
            indices.append(index)
            continue
        decoded = decode_event(raw)  # the general path says what it is
        if type(decoded) is Ok and decoded.event.type == GPU_SAMPLE_TYPE:
            events.append(decoded.event)  # type: ignore[arg-type]  # its type says so
            indices.append(index)
        else:
            others[index] = decoded
    return events, indices, others


def _fast_sample(raw: bytes | bytearray | memoryview | None) -> CloudEvent[GpuSample] | None:
    """A well-formed GPU sample, decoded and checked in one typed pass; None for anything the
    explaining path must judge (it names the reason, or accepts what msgspec is strict about)."""
    try:
        sample = _SAMPLE_ENVELOPE.decode(raw)  # type: ignore[arg-type]  # None fails here
        if (
            sample.type == GPU_SAMPLE_TYPE
            and sample.specversion == "1.0"
            and _within_device(sample.data)
        ):
            time_ms = parse_time(sample.time)
            return CloudEvent(sample.id, sample.source, GPU_SAMPLE_TYPE, time_ms, sample.data)
    except (msgspec.MsgspecError, RecursionError, ValueError, TypeError, OverflowError):
        pass  # deeply nested, malformed or out of bounds
    return None


def _within_device(sample: GpuSample) -> bool:
    """The cross-field rules JSON Schema cannot state (the slow path names the broken one)."""
    total = sample.mem_total_bytes
    if sample.mem_used_bytes > total:
        return False
    if sample.mig_slices is not None and sample.mig_slices > sample.gpu_slices:
        return False
    for process in sample.processes:  # noqa: SIM110 (a loop: no generator per event)
        if process.mem_used_bytes > total:
            return False
    return True


def _decode_slowly(raw: bytes | bytearray | memoryview) -> Decoded:
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
        version = fields.excerpt(envelope["specversion"])
        raise fields.FieldError("unknown_version", f"specversion {version} is not 1.0")
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
    if kind == NODE_TYPE:
        node = _node(fields.check_object(data, fields.NODE, "data."))
        return Ok(CloudEvent(envelope["id"], envelope["source"], kind, time_ms, node))
    raise fields.FieldError(
        "unknown_type", f"type {fields.excerpt(kind)} is not a gpuledger event type"
    )


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
        gpu_requests=_gpu_counts(d, "gpu_requests"),
    )


def _node(d: dict[str, Any]) -> NodeInfo:
    return NodeInfo(
        cluster=d["cluster"],
        node=d["node"],
        provider_id=d["provider_id"],
        instance_type=d["instance_type"],
        gpus=d["gpus"],
        cpu_millicores=d["cpu_millicores"],
        memory_bytes=d["memory_bytes"],
        deleted=d["deleted"],
        gpu_capacity=_gpu_counts(d, "gpu_capacity"),
    )


def _gpu_counts(d: dict[str, Any], name: str) -> dict[str, int]:
    """A payload's GPU counts member (`GpuCounts`), checked; an absent one is empty."""
    if name not in d:
        return {}
    counts = d[name]
    path = f"data.{name}"
    if type(counts) is not dict:
        raise fields.FieldError("wrong_type", f"{path}: expected an object of whole numbers")
    if len(counts) > MAX_GPU_RESOURCES:
        raise fields.FieldError(
            "too_long",
            f"{path}: {len(counts):,} resources, more than the limit of {MAX_GPU_RESOURCES:,}",
        )
    for key, count in counts.items():
        if not key:
            raise fields.FieldError("wrong_type", f"{path}: a resource name is empty")
        if len(key) > fields.MAX_LABEL_KEY:
            raise fields.FieldError(
                "too_long",
                f"{path}: key {fields.excerpt(key)} is longer than the limit of "
                f"{fields.MAX_LABEL_KEY:,} characters",
            )
        if type(count) is not int:
            raise fields.FieldError(
                "wrong_type", f"{path}[{fields.excerpt(key)}]: expected a whole number"
            )
        if not 0 <= count <= fields.MAX_GPUS:
            raise fields.FieldError(
                "out_of_range",
                f"{path}[{fields.excerpt(key)}]: {count!r} is out of range "
                f"(must be >= 0 and <= {fields.MAX_GPUS:g})",
            )
    return counts


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

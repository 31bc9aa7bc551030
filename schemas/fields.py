"""Field rules of the event payloads, shared by the decoder and the generated JSON Schemas.

Each rule names a JSON type, whether null is allowed, numeric bounds and a maximum length.
Cross-field rules (process memory not above device memory, MIG slices not above GPU slices) live
in the decoder; JSON Schema cannot express them and the published schema files say so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_INTERVAL_S = 3600.0
MAX_BYTES = 2**50  # 1 PiB: far above any accelerator's memory, well below absurd
MAX_TOKENS = 10**12
MAX_GPUS = 4096  # a node's nvidia.com/gpu capacity: 8-16 GPUs, times time-slicing replicas
MAX_MILLICORES = 10**9  # a node's cpu capacity: a million cores

# Longest values, in characters (design §2, "Field limits"). Each is at or above what a valid
# Kubernetes object, an NVML reading or a gpuledger agent can produce, so only a broken or
# hostile producer is refused; together they bound what one event makes the worker keep (a
# pod's labels stay in memory as long as the pod) and write to ClickHouse and dead letters.
MAX_SPECVERSION = 16  # "1.0"
MAX_EVENT_ID = 1024  # the longest gpuledger writes, "<pod uid>:<model>:<ms>", is up to 913
MAX_SOURCE = 1024  # "gpuledger/agent/<cluster>/<node>": 17 + 253 + 1 + 253
MAX_TYPE = 256  # "io.gpuledger.gpu.sample.v1"; CloudEvents types are reverse-DNS names
MAX_TIME = 64  # RFC 3339 with nanoseconds and an offset is 35
MAX_DNS_SUBDOMAIN = 253  # Kubernetes (DNS-1123 subdomain): node and pod names; a cluster name
MAX_DNS_LABEL = 63  # Kubernetes (DNS-1123 label): namespace names
MAX_UUID = 128  # pod uids and NVML uuids are 36-60, container ids 64 hex and a runtime prefix
MAX_SERIES_UID = 384  # a static scrape target's uid is "static:<namespace>/<pod>", up to 324
MAX_NVML_NAME = 256  # gpu_model and mig_profile: NVML's name buffer holds 96
MAX_MODEL = 512  # served model names: Hugging Face ids (up to 96 + "/" + 96) or a file path
MAX_LABEL_KEY = 317  # Kubernetes label key: DNS-subdomain prefix (253) + "/" + name (63)
MAX_LABEL_VALUE = 63  # Kubernetes label value
# A node's spec.providerID (Kubernetes sets no limit). The longest a cloud writes is Azure's
# scale-set form, about 310: subscription (36), resource group (90), scale set (64), instance.
MAX_PROVIDER_ID = 512
MAX_LABELS = 256  # per map; Kubernetes sets no count, only the object's size (1.5 MiB)
# Processes listed per device and sample. NVML sets no count; each CUDA context holds device
# memory (tens to hundreds of MiB) and MPS serves at most 48 clients, so a real GPU lists a
# few hundred at most.
MAX_PROCESSES = 1024

_SHOWN = 32  # characters of a refused value repeated in a rejection's detail


class FieldError(Exception):
    """A payload breaks a field rule; `reason` is the dead-letter reason code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    kind: str  # "string" | "integer" | "number" | "boolean" | "object" | "array" | "labels"
    nullable: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    min_length: int = 0
    # Characters of a string, members of a labels object (whose keys and values are bounded by
    # MAX_LABEL_KEY and MAX_LABEL_VALUE), items of an array; None for other kinds.
    max_length: int | None = None


def _s(name: str, max_length: int, *, nullable: bool = False, min_length: int = 1) -> Rule:
    return Rule(name, "string", nullable=nullable, min_length=min_length, max_length=max_length)


def _labels(name: str) -> Rule:
    return Rule(name, "labels", max_length=MAX_LABELS)


def _i(name: str, lo: float, hi: float, *, nullable: bool = False) -> Rule:
    return Rule(name, "integer", nullable=nullable, minimum=lo, maximum=hi)


def _n(name: str, lo: float, hi: float, *, nullable: bool = False, exclusive: bool = False) -> Rule:
    return Rule(
        name, "number", nullable=nullable, minimum=lo, maximum=hi, exclusive_minimum=exclusive
    )


ENVELOPE = (
    _s("specversion", MAX_SPECVERSION),
    _s("id", MAX_EVENT_ID),
    _s("source", MAX_SOURCE),
    _s("type", MAX_TYPE),
    _s("time", MAX_TIME),
    Rule("data", "object"),
)

PROCESS = (
    _i("pid", 0, 2**32 - 1),
    _s("pod_uid", MAX_UUID, nullable=True),
    _s("container_id", MAX_UUID, nullable=True),
    _i("mem_used_bytes", 0, MAX_BYTES),
    _n("sm_util_pct", 0, 100, nullable=True),
)

GPU_SAMPLE = (
    _s("cluster", MAX_DNS_SUBDOMAIN),
    _s("node", MAX_DNS_SUBDOMAIN),
    _s("device_uuid", MAX_UUID),
    _s("gpu_uuid", MAX_UUID),
    _s("gpu_model", MAX_NVML_NAME),
    _s("mig_profile", MAX_NVML_NAME, nullable=True),
    _i("mig_slices", 1, 64, nullable=True),
    _i("gpu_slices", 1, 64),
    _n("interval_s", 0, MAX_INTERVAL_S, exclusive=True),
    _i("mem_total_bytes", 1, MAX_BYTES),
    _i("mem_used_bytes", 0, MAX_BYTES),
    _n("sm_util_pct", 0, 100, nullable=True),
    _labels("node_labels"),
    Rule("processes", "array", max_length=MAX_PROCESSES),
)

POD = (
    _s("cluster", MAX_DNS_SUBDOMAIN),
    _s("uid", MAX_UUID),
    _s("namespace", MAX_DNS_LABEL),
    _s("name", MAX_DNS_SUBDOMAIN),
    _s("node", MAX_DNS_SUBDOMAIN, min_length=0),
    _labels("labels"),
    _labels("namespace_labels"),
    Rule("deleted", "boolean"),
)

NODE = (
    _s("cluster", MAX_DNS_SUBDOMAIN),
    _s("node", MAX_DNS_SUBDOMAIN),
    _s("provider_id", MAX_PROVIDER_ID, min_length=0),
    _s("instance_type", MAX_LABEL_VALUE, min_length=0),
    _i("gpus", 0, MAX_GPUS),
    _i("cpu_millicores", 0, MAX_MILLICORES),
    _i("memory_bytes", 0, MAX_BYTES),
    Rule("deleted", "boolean"),
)

TOKENS = (
    _s("cluster", MAX_DNS_SUBDOMAIN),
    _s("namespace", MAX_DNS_LABEL),
    _s("pod", MAX_DNS_SUBDOMAIN),
    _s("pod_uid", MAX_SERIES_UID),
    _s("model", MAX_MODEL),
    _i("prompt_tokens", 0, MAX_TOKENS),
    _i("completion_tokens", 0, MAX_TOKENS),
    _i("requests", 0, MAX_TOKENS),
    _n("interval_s", 0, MAX_INTERVAL_S, exclusive=True),
    _i("cached_tokens", 0, MAX_TOKENS, nullable=True),
    _n("prefill_s", 0, 10**9, nullable=True),
    _n("decode_s", 0, 10**9, nullable=True),
)

# Fields that may be absent in a document (they are then taken as null).
OPTIONAL = frozenset({"cached_tokens", "prefill_s", "decode_s"})


_MISSING = object()


def check_object(value: Any, rules: tuple[Rule, ...], prefix: str) -> dict[str, Any]:
    """Validate `value` against `rules`; return it (unchanged) or raise FieldError.

    This runs once per event per field on the worker's hot path: the common case (a present,
    well-typed value) is decided with one `type()` comparison before any slower check."""
    if type(value) is not dict:
        raise FieldError("wrong_type", f"{prefix.rstrip('.') or 'event'}: expected an object")
    get = value.get
    for rule in rules:
        v: Any = get(rule.name, _MISSING)
        kind = rule.kind
        t = type(v)
        if kind == "string" and t is str:
            size = len(v)
            if size >= rule.min_length and (rule.max_length is None or size <= rule.max_length):
                continue
        if v is None and rule.nullable:
            continue
        if (
            (
                kind == "array"
                and t is list
                and (rule.max_length is None or len(v) <= rule.max_length)
            )
            or (kind == "object" and t is dict)
            or (kind == "boolean" and t is bool)
        ):
            continue
        if kind == "labels" and t is dict and _labels_fit(v, rule.max_length):
            continue
        if _plain_number_in_range(v, t, rule):
            continue
        if v is _MISSING:
            if rule.name in OPTIONAL:
                continue
            raise FieldError("missing_field", f"{prefix}{rule.name}: missing")
        _check(v, rule, prefix + rule.name)
    return value


def _labels_fit(labels: dict[str, Any], max_count: int | None) -> bool:
    if max_count is not None and len(labels) > max_count:
        return False
    for key, value in labels.items():
        if type(value) is not str or len(value) > MAX_LABEL_VALUE or len(key) > MAX_LABEL_KEY:
            return False
    return True


def _plain_number_in_range(v: Any, t: type, rule: Rule) -> bool:
    if not ((rule.kind == "integer" and t is int) or (rule.kind == "number" and t in (int, float))):
        return False
    lo, hi = rule.minimum, rule.maximum
    if lo is None or hi is None or not (lo < v <= hi or (v == lo and not rule.exclusive_minimum)):
        return False
    return t is not float or math.isfinite(v)


def _check(value: Any, rule: Rule, path: str) -> None:
    if value is None:
        if not rule.nullable:
            raise FieldError("wrong_type", f"{path}: must not be null")
        return
    kind = rule.kind
    if kind == "string":
        if not isinstance(value, str):
            raise FieldError("wrong_type", f"{path}: expected a string")
        if len(value) < rule.min_length:
            raise FieldError("wrong_type", f"{path}: must not be empty")
        _check_length(value, rule.max_length, f"{path}:")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise FieldError("wrong_type", f"{path}: expected true or false")
    elif kind in ("integer", "number"):
        _check_number(value, rule, path)
    elif kind == "labels":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise FieldError("wrong_type", f"{path}: expected an object of string values")
        _check_labels(value, rule.max_length, path)
    elif kind == "array":
        if not isinstance(value, list):
            raise FieldError("wrong_type", f"{path}: expected an array")
        if rule.max_length is not None and len(value) > rule.max_length:
            raise FieldError(
                "too_long",
                f"{path}: {len(value):,} items, more than the limit of {rule.max_length:,}",
            )
    elif kind == "object" and not isinstance(value, dict):
        raise FieldError("wrong_type", f"{path}: expected an object")


def _check_length(text: str, max_length: int | None, what: str) -> None:
    if max_length is not None and len(text) > max_length:
        raise FieldError(
            "too_long",
            f"{what} {excerpt(text)} is longer than the limit of {max_length:,} characters",
        )


def _check_labels(labels: dict[str, str], max_count: int | None, path: str) -> None:
    if max_count is not None and len(labels) > max_count:
        raise FieldError(
            "too_long", f"{path}: {len(labels):,} labels, more than the limit of {max_count:,}"
        )
    for key, value in labels.items():
        _check_length(key, MAX_LABEL_KEY, f"{path}: key")
        _check_length(value, MAX_LABEL_VALUE, f"{path}[{excerpt(key)}]:")


def excerpt(text: str) -> str:
    """`text` as a detail may repeat it: whole when short, else its start and its length."""
    if len(text) <= _SHOWN:
        return repr(text)
    return f"{text[:_SHOWN]!r}… ({len(text):,} characters)"


def fit_labels(labels: Mapping[str, str]) -> tuple[dict[str, str], int]:
    """The labels an event can carry: those whose key and value are within the limits, at most
    MAX_LABELS of them (the first in key order); and how many were left out. For producers,
    which must not publish what the decoder refuses."""
    fitting = sorted(
        (key, value)
        for key, value in labels.items()
        if len(key) <= MAX_LABEL_KEY and len(value) <= MAX_LABEL_VALUE
    )
    kept = dict(fitting[:MAX_LABELS])
    return kept, len(labels) - len(kept)


def _check_number(value: Any, rule: Rule, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FieldError("wrong_type", f"{path}: expected a number")
    if rule.kind == "integer" and not isinstance(value, int):
        raise FieldError("wrong_type", f"{path}: expected an integer")
    if isinstance(value, float) and not math.isfinite(value):
        raise FieldError("out_of_range", f"{path}: not a finite number")
    lo, hi = rule.minimum, rule.maximum
    if lo is not None and (value < lo or (rule.exclusive_minimum and value == lo)):
        bound = f"> {lo:g}" if rule.exclusive_minimum else f">= {lo:g}"
        raise FieldError("out_of_range", f"{path}: {value!r} is out of range (must be {bound})")
    if hi is not None and value > hi:
        raise FieldError("out_of_range", f"{path}: {value!r} is out of range (must be <= {hi:g})")


def json_schema_for(rules: tuple[Rule, ...]) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) fragment equivalent to `rules`."""
    props: dict[str, Any] = {}
    for rule in rules:
        props[rule.name] = _rule_schema(rule)
    return {
        "type": "object",
        "required": [r.name for r in rules if r.name not in OPTIONAL],
        "properties": props,
    }


def _rule_schema(rule: Rule) -> dict[str, Any]:
    base: dict[str, Any]
    if rule.kind == "labels":
        base = {
            "type": "object",
            "propertyNames": {"maxLength": MAX_LABEL_KEY},
            "additionalProperties": {"type": "string", "maxLength": MAX_LABEL_VALUE},
        }
        if rule.max_length is not None:
            base["maxProperties"] = rule.max_length
    elif rule.kind in ("integer", "number"):
        base = {"type": rule.kind}
        if rule.minimum is not None:
            key = "exclusiveMinimum" if rule.exclusive_minimum else "minimum"
            base[key] = rule.minimum
        if rule.maximum is not None:
            base["maximum"] = rule.maximum
    elif rule.kind == "string":
        base = {"type": "string", "minLength": rule.min_length}
        if rule.max_length is not None:
            base["maxLength"] = rule.max_length
    else:
        base = {"type": rule.kind}
        if rule.kind == "array" and rule.max_length is not None:
            base["maxItems"] = rule.max_length
    if rule.nullable:
        return {"anyOf": [base, {"type": "null"}]}
    return base

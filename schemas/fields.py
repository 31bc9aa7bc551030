"""Field rules of the event payloads, shared by the decoder and the generated JSON Schemas.

Each rule names a JSON type, whether null is allowed, and numeric bounds. Cross-field rules
(process memory not above device memory, MIG slices not above GPU slices) live in the decoder;
JSON Schema cannot express them and the published schema files say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_INTERVAL_S = 3600.0
MAX_BYTES = 2**50  # 1 PiB: far above any accelerator's memory, well below absurd
MAX_TOKENS = 10**12


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


def _s(name: str, *, nullable: bool = False, min_length: int = 1) -> Rule:
    return Rule(name, "string", nullable=nullable, min_length=min_length)


def _i(name: str, lo: float, hi: float, *, nullable: bool = False) -> Rule:
    return Rule(name, "integer", nullable=nullable, minimum=lo, maximum=hi)


def _n(name: str, lo: float, hi: float, *, nullable: bool = False, exclusive: bool = False) -> Rule:
    return Rule(
        name, "number", nullable=nullable, minimum=lo, maximum=hi, exclusive_minimum=exclusive
    )


ENVELOPE = (
    _s("specversion"),
    _s("id"),
    _s("source"),
    _s("type"),
    _s("time"),
    Rule("data", "object"),
)

PROCESS = (
    _i("pid", 0, 2**32 - 1),
    _s("pod_uid", nullable=True),
    _s("container_id", nullable=True),
    _i("mem_used_bytes", 0, MAX_BYTES),
    _n("sm_util_pct", 0, 100, nullable=True),
)

GPU_SAMPLE = (
    _s("cluster"),
    _s("node"),
    _s("device_uuid"),
    _s("gpu_uuid"),
    _s("gpu_model"),
    _s("mig_profile", nullable=True),
    _i("mig_slices", 1, 64, nullable=True),
    _i("gpu_slices", 1, 64),
    _n("interval_s", 0, MAX_INTERVAL_S, exclusive=True),
    _i("mem_total_bytes", 1, MAX_BYTES),
    _i("mem_used_bytes", 0, MAX_BYTES),
    _n("sm_util_pct", 0, 100, nullable=True),
    Rule("node_labels", "labels"),
    Rule("processes", "array"),
)

POD = (
    _s("cluster"),
    _s("uid"),
    _s("namespace"),
    _s("name"),
    _s("node", min_length=0),
    Rule("labels", "labels"),
    Rule("namespace_labels", "labels"),
    Rule("deleted", "boolean"),
)

TOKENS = (
    _s("cluster"),
    _s("namespace"),
    _s("pod"),
    _s("pod_uid"),
    _s("model"),
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
        if kind == "string" and t is str and len(v) >= rule.min_length:
            continue
        if v is None and rule.nullable:
            continue
        if (
            (kind == "array" and t is list)
            or (kind == "object" and t is dict)
            or (kind == "boolean" and t is bool)
        ):
            continue
        if kind == "labels" and t is dict and all(type(x) is str for x in v.values()):
            continue
        if _plain_number_in_range(v, t, rule):
            continue
        if v is _MISSING:
            if rule.name in OPTIONAL:
                continue
            raise FieldError("missing_field", f"{prefix}{rule.name}: missing")
        _check(v, rule, prefix + rule.name)
    return value


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
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise FieldError("wrong_type", f"{path}: expected true or false")
    elif kind in ("integer", "number"):
        _check_number(value, rule, path)
    elif kind == "labels":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise FieldError("wrong_type", f"{path}: expected an object of string values")
    elif kind == "array":
        if not isinstance(value, list):
            raise FieldError("wrong_type", f"{path}: expected an array")
    elif kind == "object" and not isinstance(value, dict):
        raise FieldError("wrong_type", f"{path}: expected an object")


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
        base = {"type": "object", "additionalProperties": {"type": "string"}}
    elif rule.kind in ("integer", "number"):
        base = {"type": rule.kind}
        if rule.minimum is not None:
            key = "exclusiveMinimum" if rule.exclusive_minimum else "minimum"
            base[key] = rule.minimum
        if rule.maximum is not None:
            base["maximum"] = rule.maximum
    elif rule.kind == "string":
        base = {"type": "string", "minLength": rule.min_length}
    else:
        base = {"type": rule.kind}
    if rule.nullable:
        return {"anyOf": [base, {"type": "null"}]}
    return base

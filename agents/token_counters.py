"""Token counters of inference servers, read from their Prometheus text pages, and the deltas
between two scrapes (design §2). Pure: no I/O. Which metric means what, per server family and
version, is the table in agents/server_profiles.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from agents.server_profiles import ServerProfile, Source, detect_profile
from schemas.fields import MAX_MODEL

UNKNOWN_MODEL = "unknown"
MAX_MODELS_PER_PAGE = 256  # a page is a tenant's input: bound the series it can create


@dataclass(frozen=True, slots=True)
class CounterTotals:
    """Cumulative values of one (pod, model) series at one scrape."""

    server: str
    prompt_tokens: float
    completion_tokens: float
    requests: float
    cached_tokens: float | None = None
    prefill_s: float | None = None
    decode_s: float | None = None
    process_start_s: float | None = None  # process_start_time_seconds, when exposed


@dataclass(frozen=True, slots=True)
class Delta:
    prompt_tokens: int
    completion_tokens: int
    requests: int
    cached_tokens: int | None
    prefill_s: float | None
    decode_s: float | None
    reset: bool

    @property
    def empty(self) -> bool:
        return not (
            self.prompt_tokens
            or self.completion_tokens
            or self.requests
            or self.cached_tokens
            or self.prefill_s
            or self.decode_s
        )


def _values_by_name(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by normalised name: counters (and untyped samples) lose their `_total`, since
    the parser adds it to counters declared without it and keeps it on those declared with it."""
    by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if family.type in ("counter", "unknown") and name.endswith("_total"):
                name = name[: -len("_total")]
            if name.endswith("_created"):
                continue
            by_name.setdefault(name, []).append((dict(sample.labels), float(sample.value)))
    return by_name


Samples = dict[str, list[tuple[dict[str, str], float]]]
_FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "requests",
    "cached_tokens",
    "prefill_s",
    "decode_s",
)
_OPTIONAL = ("cached_tokens", "prefill_s", "decode_s")


def parse_totals(text: str, default_model: str = UNKNOWN_MODEL) -> dict[str, CounterTotals]:
    """Totals per model on one metrics page; raises ValueError on text that is not Prometheus
    exposition format. Series that differ only in other labels (engine, finished_reason,
    cache_source, tp_rank) are summed. A model label that names no model (absent, empty or a
    placeholder such as trtllm-serve's "undefined") gives `default_model`."""
    by_name = _values_by_name(text)
    profile = detect_profile(by_name.keys())
    if profile is None:
        return {}
    start = by_name.get("process_start_time_seconds")
    process_start_s = start[0][1] if start else None
    fields: dict[str, dict[str, float]] = {}
    for field_name in _FIELDS:
        found = _first_found(getattr(profile, field_name), by_name)
        if found is not None:
            fields[field_name] = _per_model(found, by_name, profile, default_model)
    if profile.token_models_only:
        models = {m for f in ("prompt_tokens", "completion_tokens") for m in fields.get(f, {})}
    else:
        models = {m for per_model in fields.values() for m in per_model}
    out: dict[str, CounterTotals] = {}
    for model in sorted(models)[:MAX_MODELS_PER_PAGE]:
        optional: dict[str, float | None] = {}
        for field_name in _OPTIONAL:
            if field_name in fields:
                optional[field_name] = fields[field_name].get(model, 0.0)
            elif profile.lazy and getattr(profile, field_name):
                optional[field_name] = 0.0  # created with its first event: none yet
            else:
                optional[field_name] = None
        out[model] = CounterTotals(
            server=profile.server,
            prompt_tokens=fields.get("prompt_tokens", {}).get(model, 0.0),
            completion_tokens=fields.get("completion_tokens", {}).get(model, 0.0),
            requests=fields.get("requests", {}).get(model, 0.0),
            cached_tokens=optional["cached_tokens"],
            prefill_s=optional["prefill_s"],
            decode_s=optional["decode_s"],
            process_start_s=process_start_s,
        )
    return out


def _first_found(sources: tuple[Source, ...], by_name: Samples) -> Source | None:
    for source in sources:
        if any(source.accepts(labels) for labels, _ in by_name.get(source.name, ())):
            return source
    return None


def _per_model(
    source: Source, by_name: Samples, profile: ServerProfile, default_model: str
) -> dict[str, float]:
    per_model: dict[str, float] = {}
    for labels, value in by_name[source.name]:
        if source.accepts(labels):
            model = _model(labels, profile, default_model)
            per_model[model] = per_model.get(model, 0.0) + value
    return per_model


def _model(labels: dict[str, str], profile: ServerProfile, default: str) -> str:
    """The series' model name, cut to the MAX_MODEL characters an event carries (a served
    model name can be a long file path)."""
    for key in profile.model_labels:
        value = labels.get(key)
        if value and value not in profile.placeholder_models:
            return value[:MAX_MODEL]
    return (default or UNKNOWN_MODEL)[:MAX_MODEL]


def counter_delta(previous: CounterTotals | None, current: CounterTotals) -> Delta | None:
    """What happened between two scrapes of one series; None for the first scrape (it only sets
    the baseline). If any counter went down, or the server's process start time changed, the
    server restarted: every delta is the new value."""
    if previous is None:
        return None
    restarted = (
        previous.process_start_s is not None
        and current.process_start_s is not None
        and current.process_start_s != previous.process_start_s
    )
    pairs = [
        (current.prompt_tokens, previous.prompt_tokens),
        (current.completion_tokens, previous.completion_tokens),
        (current.requests, previous.requests),
        (current.cached_tokens, previous.cached_tokens),
        (current.prefill_s, previous.prefill_s),
        (current.decode_s, previous.decode_s),
    ]
    reset = restarted or any(c is not None and p is not None and c < p for c, p in pairs)

    def diff(cur: float, prev: float) -> float:
        return cur if reset else cur - prev

    def optional(cur: float | None, prev: float | None) -> float | None:
        if cur is None:
            return None
        if prev is None:
            return cur if reset else None  # newly exposed: no baseline yet
        return diff(cur, prev)

    cached = optional(current.cached_tokens, previous.cached_tokens)
    prefill = optional(current.prefill_s, previous.prefill_s)
    decode = optional(current.decode_s, previous.decode_s)
    return Delta(
        prompt_tokens=round(diff(current.prompt_tokens, previous.prompt_tokens)),
        completion_tokens=round(diff(current.completion_tokens, previous.completion_tokens)),
        requests=round(diff(current.requests, previous.requests)),
        cached_tokens=None if cached is None else round(cached),
        prefill_s=None if prefill is None else round(prefill, 6),
        decode_s=None if decode is None else round(decode, 6),
        reset=reset,
    )

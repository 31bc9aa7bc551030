"""Token counters of inference servers, read from their Prometheus text pages, and the deltas
between two scrapes (design §2). Pure: no I/O.

Metric names, from each project's source or docs (cited in agents/README.md):
vLLM `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`, `vllm:request_success_total`,
`vllm:prefix_cache_hits_total`, histograms `vllm:request_prefill_time_seconds`,
`vllm:request_decode_time_seconds` (label `model_name`); SGLang `sglang:prompt_tokens_total`,
`sglang:generation_tokens_total`, `sglang:num_requests_total`, `sglang:cached_tokens_total`
(label `model_name`); TGI histograms `tgi_request_input_length`, `tgi_request_generated_tokens`
and counter `tgi_request_success` (no model label); Triton `nv_inference_request_success`
(label `model`; no token counters); TensorRT-LLM `trtllm_prompt_tokens_total`,
`trtllm_generation_tokens_total`, `trtllm_request_success_total` (label `model_name`).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from schemas.fields import MAX_MODEL

UNKNOWN_MODEL = "unknown"


@dataclass(frozen=True, slots=True)
class ServerProfile:
    """Where one server kind keeps each quantity: candidate metric names, first found wins.
    Counter names are given without `_total`; histogram sums end in `_sum`."""

    server: str
    model_labels: tuple[str, ...]
    prompt_tokens: tuple[str, ...]
    completion_tokens: tuple[str, ...]
    requests: tuple[str, ...]
    cached_tokens: tuple[str, ...] = ()
    prefill_s: tuple[str, ...] = ()
    decode_s: tuple[str, ...] = ()

    def names(self) -> set[str]:
        return {
            *self.prompt_tokens,
            *self.completion_tokens,
            *self.requests,
            *self.cached_tokens,
            *self.prefill_s,
            *self.decode_s,
        }


PROFILES: tuple[ServerProfile, ...] = (
    ServerProfile(
        "vllm",
        ("model_name",),
        ("vllm:prompt_tokens",),
        ("vllm:generation_tokens",),
        ("vllm:request_success",),
        cached_tokens=("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
        prefill_s=("vllm:request_prefill_time_seconds_sum",),
        decode_s=("vllm:request_decode_time_seconds_sum",),
    ),
    ServerProfile(
        "sglang",
        ("model_name",),
        ("sglang:prompt_tokens",),
        ("sglang:generation_tokens",),
        ("sglang:num_requests",),
        cached_tokens=("sglang:cached_tokens",),
    ),
    ServerProfile(
        "tgi",
        ("model_id", "model"),
        ("tgi_request_input_length_sum",),
        ("tgi_request_generated_tokens_sum",),
        ("tgi_request_success", "tgi_request_generated_tokens_count"),
    ),
    ServerProfile(
        "triton",
        ("model",),
        (),
        (),
        ("nv_inference_request_success",),
    ),
    ServerProfile(
        "trtllm",
        ("model_name", "model"),
        ("trtllm_prompt_tokens", "trtllm:prompt_tokens"),
        ("trtllm_generation_tokens", "trtllm:generation_tokens"),
        ("trtllm_request_success", "trtllm:request_success"),
    ),
)


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


def parse_totals(text: str, default_model: str = UNKNOWN_MODEL) -> dict[str, CounterTotals]:
    """Totals per model on one metrics page; raises ValueError on text that is not Prometheus
    exposition format. Series that differ only in other labels (engine, finished_reason, tp_rank)
    are summed."""
    by_name = _values_by_name(text)
    start = by_name.get("process_start_time_seconds")
    process_start_s = start[0][1] if start else None
    out: dict[str, CounterTotals] = {}
    for profile in PROFILES:
        if not profile.names() & by_name.keys():
            continue
        fields: dict[str, dict[str, float]] = {}
        for field_name in (
            "prompt_tokens",
            "completion_tokens",
            "requests",
            "cached_tokens",
            "prefill_s",
            "decode_s",
        ):
            for metric in getattr(profile, field_name):
                if metric in by_name:
                    per_model: dict[str, float] = {}
                    for labels, value in by_name[metric]:
                        model = _model(labels, profile.model_labels, default_model)
                        per_model[model] = per_model.get(model, 0.0) + value
                    fields[field_name] = per_model
                    break
        models = sorted({m for per_model in fields.values() for m in per_model})
        for model in models:
            totals = CounterTotals(
                server=profile.server,
                prompt_tokens=fields.get("prompt_tokens", {}).get(model, 0.0),
                completion_tokens=fields.get("completion_tokens", {}).get(model, 0.0),
                requests=fields.get("requests", {}).get(model, 0.0),
                cached_tokens=fields["cached_tokens"].get(model)
                if "cached_tokens" in fields
                else None,
                prefill_s=fields["prefill_s"].get(model) if "prefill_s" in fields else None,
                decode_s=fields["decode_s"].get(model) if "decode_s" in fields else None,
                process_start_s=process_start_s,
            )
            out.setdefault(model, totals)
    return out


def _model(labels: dict[str, str], keys: tuple[str, ...], default: str) -> str:
    """The series' model name, cut to the MAX_MODEL characters an event carries (a served
    model name can be a long file path)."""
    for key in keys:
        value = labels.get(key)
        if value:
            return value[:MAX_MODEL]
    return default[:MAX_MODEL]


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

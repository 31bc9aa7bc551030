"""Where each inference-server family keeps its token, request, cached-token and phase-time
counters: one table, read by agents/token_counters.py. The sources of every name are in
tests/fixtures/inference_servers/<folder>/SOURCE.md.

A page is matched by the first profile whose `detect` names are all on it, so one page is read
by one profile: Triton pages carry `vllm:*` families too, and must not be read as vLLM's.
Counter names are given without `_total` (the parser's normalised form); histogram sums and
counts end in `_sum` / `_count`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

DEFAULT_METRICS_PATH = "/metrics"


@dataclass(frozen=True, slots=True)
class Source:
    """One metric, optionally only its samples whose labels have the given values."""

    name: str
    where: tuple[tuple[str, str], ...] = ()

    def accepts(self, labels: dict[str, str]) -> bool:
        return all(labels.get(key) == value for key, value in self.where)


def m(name: str, **where: str) -> Source:
    return Source(name, tuple(sorted(where.items())))


@dataclass(frozen=True, slots=True)
class ServerProfile:
    """Candidate sources per quantity, the first one on the page wins.

    `lazy`: the server creates a series with its first event, so an absent optional quantity is
    0, not unknown. `token_models_only`: only models with token metrics are reported (a Triton
    ensemble counts each request on the ensemble and on every composing model).
    `placeholder_models`: model label values that name no model (the pod's annotation wins).
    """

    server: str
    versions: str
    detect: tuple[str, ...]
    model_labels: tuple[str, ...]
    prompt_tokens: tuple[Source, ...]
    completion_tokens: tuple[Source, ...]
    requests: tuple[Source, ...]
    cached_tokens: tuple[Source, ...] = ()
    prefill_s: tuple[Source, ...] = ()
    decode_s: tuple[Source, ...] = ()
    metrics_path: str = DEFAULT_METRICS_PATH
    lazy: bool = False
    token_models_only: bool = False
    placeholder_models: frozenset[str] = field(default_factory=frozenset)


PROFILES: tuple[ServerProfile, ...] = (
    ServerProfile(
        "triton-tensorrtllm",
        "Triton with the TensorRT-LLM backend, nv_llm_* since 24.12 (tensorrtllm_backend 1eeadbe)",
        detect=("nv_llm_input_token_len_sum",),
        model_labels=("model",),
        prompt_tokens=(m("nv_llm_input_token_len_sum"),),
        completion_tokens=(m("nv_llm_output_token_len_sum"),),
        requests=(m("nv_inference_request_success"),),
        token_models_only=True,
    ),
    ServerProfile(
        "triton-vllm",
        "Triton with the vLLM backend (vllm_backend, REPORT_CUSTOM_METRICS)",
        detect=("nv_inference_request_success", "vllm:prompt_tokens"),
        model_labels=("model",),
        prompt_tokens=(m("vllm:prompt_tokens"),),
        completion_tokens=(m("vllm:generation_tokens"),),
        requests=(
            m("vllm:request_prompt_tokens_count"),
            m("vllm:e2e_request_latency_seconds_count"),
            m("nv_inference_request_success"),
        ),
        token_models_only=True,
    ),
    ServerProfile(
        "triton",
        "Triton Inference Server, any backend without token metrics",
        detect=("nv_inference_request_success",),
        model_labels=("model",),
        prompt_tokens=(),
        completion_tokens=(),
        requests=(m("nv_inference_request_success"),),
    ),
    ServerProfile(
        "dynamo-frontend",
        "NVIDIA Dynamo frontend (lib/llm/src/http/service/metrics.rs)",
        detect=("dynamo_frontend_requests",),
        model_labels=("model",),
        prompt_tokens=(m("dynamo_frontend_input_sequence_tokens_sum"),),
        completion_tokens=(
            m("dynamo_frontend_output_tokens"),
            m("dynamo_frontend_output_sequence_tokens_sum"),
        ),
        requests=(m("dynamo_frontend_requests", status="success"),),
        cached_tokens=(m("dynamo_frontend_cached_tokens_sum"),),
        lazy=True,
    ),
    ServerProfile(
        "vllm",
        "vLLM V0 and V1 (0.6 to 0.16+), data-parallel engines summed",
        detect=("vllm:prompt_tokens",),
        model_labels=("model_name", "model"),
        prompt_tokens=(m("vllm:prompt_tokens"),),
        completion_tokens=(m("vllm:generation_tokens"),),
        requests=(m("vllm:request_success"),),
        # 0.16+: prompt_tokens_cached; 0.9+: prefix_cache_hits (tokens). The older
        # gpu_prefix_cache_hits counts blocks in 0.8.x: never read as tokens.
        cached_tokens=(m("vllm:prompt_tokens_cached"), m("vllm:prefix_cache_hits")),
        prefill_s=(m("vllm:request_prefill_time_seconds_sum"),),
        decode_s=(m("vllm:request_decode_time_seconds_sum"),),
    ),
    ServerProfile(
        "sglang",
        "SGLang 0.4 to 0.5.9 (--enable-metrics)",
        detect=("sglang:generation_tokens",),
        model_labels=("model_name",),
        prompt_tokens=(m("sglang:prompt_tokens"),),
        completion_tokens=(m("sglang:generation_tokens"),),
        requests=(m("sglang:num_requests"),),
        cached_tokens=(m("sglang:cached_tokens"),),
        lazy=True,
    ),
    ServerProfile(
        "trtllm-serve",
        "TensorRT-LLM trtllm-serve (tensorrt_llm/metrics/collector.py), return_perf_metrics",
        detect=("trtllm_prompt_cached_tokens",),
        model_labels=("model_name", "model"),
        prompt_tokens=(m("trtllm_prompt_tokens"), m("trtllm:prompt_tokens")),
        completion_tokens=(m("trtllm_generation_tokens"), m("trtllm:generation_tokens")),
        requests=(m("trtllm_request_success"), m("trtllm:request_success")),
        cached_tokens=(m("trtllm_prompt_cached_tokens"),),
        prefill_s=(m("trtllm_request_prefill_time_seconds_sum"),),
        decode_s=(m("trtllm_request_decode_time_seconds_sum"),),
        metrics_path="/prometheus/metrics",
        lazy=True,
        placeholder_models=frozenset({"undefined"}),
    ),
    ServerProfile(
        "trtllm-serve",
        "TensorRT-LLM trtllm-serve releases without the cached-token counter",
        detect=("trtllm_generation_tokens",),
        model_labels=("model_name", "model"),
        prompt_tokens=(m("trtllm_prompt_tokens"),),
        completion_tokens=(m("trtllm_generation_tokens"),),
        requests=(m("trtllm_request_success"),),
        prefill_s=(m("trtllm_request_prefill_time_seconds_sum"),),
        decode_s=(m("trtllm_request_decode_time_seconds_sum"),),
        metrics_path="/prometheus/metrics",
        lazy=True,
        placeholder_models=frozenset({"undefined"}),
    ),
    ServerProfile(
        "tgi",
        "Text Generation Inference 1.x to 3.3.7 (no model label)",
        detect=("tgi_request_success",),
        model_labels=(),
        # counted at validation: requests still generating, or failing later, are included
        prompt_tokens=(m("tgi_request_input_length_sum"),),
        completion_tokens=(m("tgi_request_generated_tokens_sum"),),
        requests=(m("tgi_request_success"), m("tgi_request_generated_tokens_count")),
        lazy=True,
    ),
    ServerProfile(
        "tgi",
        "Text Generation Inference before its first successful request",
        detect=("tgi_request_input_length_sum",),
        model_labels=(),
        prompt_tokens=(m("tgi_request_input_length_sum"),),
        completion_tokens=(m("tgi_request_generated_tokens_sum"),),
        requests=(m("tgi_request_success"),),
        lazy=True,
    ),
    ServerProfile(
        "nim-llm",
        "NVIDIA NIM for LLMs 1.x (2.x passes the backend's vllm:*/sglang:* through)",
        detect=("prompt_tokens", "generation_tokens"),
        model_labels=("model_name",),
        prompt_tokens=(m("prompt_tokens"),),
        completion_tokens=(m("generation_tokens"),),
        requests=(m("request_finish"), m("request_success")),
        metrics_path="/v1/metrics",
    ),
)

# Paths to try, in order, for a pod whose annotations name none.
PROBE_PATHS: tuple[str, ...] = tuple(
    dict.fromkeys([DEFAULT_METRICS_PATH, *(p.metrics_path for p in PROFILES)])
)


def detect_profile(names: Collection[str]) -> ServerProfile | None:
    """The profile that reads a page with these (normalised) metric names, if any."""
    for profile in PROFILES:
        if all(name in names for name in profile.detect):
            return profile
    return None

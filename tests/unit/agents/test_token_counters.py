# ruff: noqa: E501  (real metric pages have long lines)
"""Token counters from real-format pages of each server, and deltas across resets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.token_counters import CounterTotals, counter_delta, parse_totals

VLLM_PAGE = """\
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1200.0
vllm:prompt_tokens_total{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 800.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 300.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="meta-llama/Llama-3.1-8B-Instruct"} 9.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 500.0
# HELP vllm:request_prefill_time_seconds Histogram of time spent in PREFILL phase for request.
# TYPE vllm:request_prefill_time_seconds histogram
vllm:request_prefill_time_seconds_bucket{engine="0",le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 10.0
vllm:request_prefill_time_seconds_count{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 10.0
vllm:request_prefill_time_seconds_sum{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.25
# HELP vllm:request_decode_time_seconds Histogram of time spent in DECODE phase for request.
# TYPE vllm:request_decode_time_seconds histogram
vllm:request_decode_time_seconds_count{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 10.0
vllm:request_decode_time_seconds_sum{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 6.5
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
"""

SGLANG_PAGE = """\
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="meta-llama/Llama-3.1-8B-Instruct"} 8.128902e+06
# HELP sglang:generation_tokens_total Number of generation tokens processed.
# TYPE sglang:generation_tokens_total counter
sglang:generation_tokens_total{model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.557572e+06
# TYPE sglang:cached_tokens_total counter
sglang:cached_tokens_total{model_name="meta-llama/Llama-3.1-8B-Instruct"} 1000
# TYPE sglang:num_requests_total counter
sglang:num_requests_total{model_name="meta-llama/Llama-3.1-8B-Instruct"} 42
# HELP sglang:token_usage The token usage
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.28
"""

TGI_PAGE = """\
# TYPE tgi_request_count counter
tgi_request_count 12
# TYPE tgi_request_success counter
tgi_request_success 11
# TYPE tgi_request_input_length histogram
tgi_request_input_length_bucket{le="+Inf"} 11
tgi_request_input_length_sum 5500
tgi_request_input_length_count 11
# TYPE tgi_request_generated_tokens histogram
tgi_request_generated_tokens_bucket{le="+Inf"} 11
tgi_request_generated_tokens_sum 2200
tgi_request_generated_tokens_count 11
"""

TRITON_PAGE = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="bert-reranker",version="1"} 40
nv_inference_request_success{model="bert-reranker",version="2"} 2
nv_inference_request_success{model="resnet",version="1"} 7
"""


def test_vllm_sums_engines_and_reasons_and_reads_optional_fields() -> None:
    totals = parse_totals(VLLM_PAGE)["meta-llama/Llama-3.1-8B-Instruct"]
    assert totals.server == "vllm"
    assert (totals.prompt_tokens, totals.completion_tokens, totals.requests) == (2000, 300, 10)
    assert totals.cached_tokens == 500
    assert totals.prefill_s == 1.25
    assert totals.decode_s == 6.5


def test_sglang_counters_with_exponent_notation() -> None:
    totals = parse_totals(SGLANG_PAGE)["meta-llama/Llama-3.1-8B-Instruct"]
    assert totals.prompt_tokens == 8_128_902
    assert totals.completion_tokens == 7_557_572
    assert (totals.requests, totals.cached_tokens, totals.prefill_s) == (42, 1000, None)


def test_tgi_uses_histogram_sums_and_the_annotated_model() -> None:
    totals = parse_totals(TGI_PAGE, default_model="google/gemma-2-9b-it")
    assert list(totals) == ["google/gemma-2-9b-it"]
    t = totals["google/gemma-2-9b-it"]
    assert (t.server, t.prompt_tokens, t.completion_tokens, t.requests) == ("tgi", 5500, 2200, 11)


def test_triton_requests_per_model_without_tokens() -> None:
    totals = parse_totals(TRITON_PAGE)
    assert totals["bert-reranker"].requests == 42
    assert totals["resnet"].requests == 7
    assert totals["resnet"].prompt_tokens == 0


def test_a_page_without_known_servers_gives_nothing() -> None:
    page = "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 12.5\n"
    assert parse_totals(page) == {}


def test_garbage_is_rejected() -> None:
    with pytest.raises(ValueError):
        parse_totals("vllm:prompt_tokens_total{model_name=unterminated 12\n")


def _t(prompt: float, completion: float = 0, requests: float = 0, **kw: float) -> CounterTotals:
    return CounterTotals("vllm", prompt, completion, requests, **kw)


def test_first_scrape_only_sets_the_baseline() -> None:
    assert counter_delta(None, _t(100, 10, 1)) is None


def test_growth_gives_the_difference() -> None:
    delta = counter_delta(_t(100, 10, 1, cached_tokens=5), _t(150, 30, 3, cached_tokens=25))
    assert delta is not None
    assert (delta.prompt_tokens, delta.completion_tokens, delta.requests) == (50, 20, 2)
    assert delta.cached_tokens == 20
    assert not delta.reset


def test_a_counter_that_goes_down_was_reset_and_the_delta_is_the_new_value() -> None:
    # prompt grew past its old value after the restart; requests shows the reset.
    delta = counter_delta(_t(100, 50, 10), _t(120, 5, 2))
    assert delta is not None
    assert delta.reset
    assert (delta.prompt_tokens, delta.completion_tokens, delta.requests) == (120, 5, 2)


def test_a_new_process_start_time_is_a_reset_even_if_every_counter_grew() -> None:
    before = _t(100, 10, 1, process_start_s=1000.0)
    after = _t(130, 20, 2, process_start_s=2000.0)
    delta = counter_delta(before, after)
    assert delta is not None and delta.reset
    assert delta.prompt_tokens == 130


def test_an_optional_counter_appearing_later_has_no_baseline() -> None:
    delta = counter_delta(_t(100), _t(110, cached_tokens=7))
    assert delta is not None
    assert delta.cached_tokens is None
    assert delta.prompt_tokens == 10


def test_unchanged_counters_give_an_empty_delta() -> None:
    delta = counter_delta(_t(100, 10, 1), _t(100, 10, 1))
    assert delta is not None and delta.empty


@given(
    st.lists(
        st.tuples(st.integers(0, 10_000), st.booleans()),  # increment, restart before it
        min_size=1,
        max_size=40,
    )
)
def test_deltas_add_up_to_all_tokens_served_across_restarts(steps: list[tuple[int, bool]]) -> None:
    """A series scraped after every step: the deltas sum to everything served after the
    baseline, provided each restart is visible (the counter ends below where it was)."""
    value = 0
    previous = _t(0)
    served = 0
    for increment, restart in steps:
        if restart and increment < value:
            value = increment  # restarted, then served `increment`: visible as a drop
        else:
            value += increment
        current = _t(value)
        delta = counter_delta(previous, current)
        assert delta is not None
        assert delta.prompt_tokens >= 0
        served += delta.prompt_tokens
        previous = current
    expected = 0
    value = 0
    for increment, restart in steps:
        if restart and increment < value:
            value = increment
        else:
            value += increment
        expected += increment
    assert served == expected

"""Baselines: the first good scrape of a pod sets them; a series that appears later on the same
pod starts from zero; a series that vanishes for a scrape keeps its baseline."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from agents.metrics import TokensMetrics
from agents.token_counters import parse_totals
from agents.token_scraper import ScrapeTarget, TokenScraper

TARGET = ScrapeTarget("ns", "pod", "uid-1", "http://10.0.0.1:8000/metrics", "annotated/m")


def scraper() -> TokenScraper:
    async def never(_: ScrapeTarget) -> str:
        raise AssertionError("not fetched")

    return TokenScraper("c", TokensMetrics(CollectorRegistry(), "c", "n"), never, lambda: 0.0)


def sglang(model: str, prompt: int, start: float = 1000.0) -> str:
    return (
        f"process_start_time_seconds {start}\n"
        "# TYPE sglang:prompt_tokens_total counter\n"
        f'sglang:prompt_tokens_total{{model_name="{model}"}} {prompt}\n'
        "# TYPE sglang:generation_tokens_total counter\n"
        f'sglang:generation_tokens_total{{model_name="{model}"}} {prompt // 10}\n'
    )


def test_the_first_scrape_of_a_pod_is_a_baseline_even_with_traffic_on_it() -> None:
    s = scraper()
    assert s.observe(TARGET, sglang("a", 500), 0.0) == []


def test_a_model_new_on_a_scraped_pod_starts_from_zero() -> None:
    s = scraper()
    s.observe(TARGET, sglang("a", 500), 0.0)
    page = sglang("a", 600) + sglang("b", 70).split("\n", 1)[1]
    events = {e.data.model: e.data for e in s.observe(TARGET, page, 15.0)}
    assert events["a"].prompt_tokens == 100
    assert events["b"].prompt_tokens == 70 and events["b"].completion_tokens == 7
    assert events["b"].interval_s == 15


def test_an_empty_first_page_counts_as_the_pods_first_scrape() -> None:
    s = scraper()
    assert s.observe(TARGET, "", 0.0) == []
    [event] = s.observe(TARGET, sglang("a", 200), 30.0)
    assert (event.data.prompt_tokens, event.data.interval_s) == (200, 30)


def test_a_series_missing_from_one_page_keeps_its_baseline() -> None:
    s = scraper()
    s.observe(TARGET, sglang("a", 500), 0.0)
    assert s.observe(TARGET, sglang("b", 0), 15.0) == []
    [event] = s.observe(TARGET, sglang("a", 540), 30.0)
    assert event.data.prompt_tokens == 40  # not 540 again


def test_a_restarted_server_still_counts_from_its_new_values() -> None:
    s = scraper()
    s.observe(TARGET, sglang("a", 500), 0.0)
    [event] = s.observe(TARGET, sglang("a", 520, start=2000.0), 15.0)
    assert event.data.prompt_tokens == 520


def test_a_forgotten_pod_starts_again_from_a_baseline() -> None:
    s = scraper()
    s.observe(TARGET, sglang("a", 500), 0.0)
    s.forget_except(set())
    assert s.observe(TARGET, sglang("a", 900), 15.0) == []


def test_vllm_0_8_block_counter_is_not_read_as_tokens() -> None:
    page = (
        "# TYPE vllm:prompt_tokens_total counter\n"
        'vllm:prompt_tokens_total{model_name="m"} 100\n'
        "# TYPE vllm:gpu_prefix_cache_hits_total counter\n"
        'vllm:gpu_prefix_cache_hits_total{model_name="m"} 6\n'
    )
    assert parse_totals(page)["m"].cached_tokens is None


def test_a_triton_ensemble_is_counted_once_on_the_model_with_tokens() -> None:
    page = "".join(
        f'nv_inference_request_success{{model="{m}",version="1"}} 7\n'
        for m in ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing")
    ) + (
        "# TYPE nv_llm_input_token_len histogram\n"
        'nv_llm_input_token_len_count{model="tensorrt_llm",version="1"} 7\n'
        'nv_llm_input_token_len_sum{model="tensorrt_llm",version="1"} 4034\n'
    )
    totals = parse_totals(page)
    assert list(totals) == ["tensorrt_llm"]
    assert (totals["tensorrt_llm"].requests, totals["tensorrt_llm"].prompt_tokens) == (7, 4034)


def test_a_placeholder_model_label_loses_to_the_annotation() -> None:
    page = 'trtllm_prompt_cached_tokens_total{engine_type="undefined",model_name="undefined"} 0\n'
    assert list(parse_totals(page, "org/m")) == ["org/m"]
    assert list(parse_totals(page)) == ["unknown"]


def test_a_dynamo_worker_page_is_read_as_its_engine_with_injected_labels() -> None:
    labels = (
        'dynamo_component="backend",dynamo_endpoint="generate",dynamo_namespace="dynamo",'
        'engine="0",model="Qwen/Qwen3-0.6B",model_name="Qwen/Qwen3-0.6B"'
    )
    page = (
        "# TYPE dynamo_component_requests_total counter\n"
        f"dynamo_component_requests_total{{{labels}}} 3\n"
        "# TYPE vllm:prompt_tokens_total counter\n"
        f"vllm:prompt_tokens_total{{{labels}}} 300\n"
        "# TYPE vllm:generation_tokens_total counter\n"
        f"vllm:generation_tokens_total{{{labels}}} 30\n"
    )
    totals = parse_totals(page)
    assert list(totals) == ["Qwen/Qwen3-0.6B"]
    assert (totals["Qwen/Qwen3-0.6B"].server, totals["Qwen/Qwen3-0.6B"].prompt_tokens) == (
        "vllm",
        300,
    )

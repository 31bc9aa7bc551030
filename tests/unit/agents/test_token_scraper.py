"""The token scraper against real-format metric pages served over local HTTP."""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer
from kube_api import recorded
from prometheus_client import CollectorRegistry

from agents.demo_scenario import demo_scenario
from agents.metrics import TokensMetrics
from agents.scenario import SimClock
from agents.scenario_views import metrics_page, pod_object
from agents.token_scraper import (
    ScrapeTarget,
    TokenScraper,
    http_fetcher,
    parse_static_target,
    targets_from_pods,
)

START = 1_800_000_000.0


class InferenceServers:
    """Serves each scenario pod's page at /<pod name>/metrics, at the scenario clock's time."""

    def __init__(self, clock: SimClock) -> None:
        self.scenario = demo_scenario(START, duration_s=600)
        self.clock = clock
        self.server: TestServer | None = None
        self.fail = False
        self.step_s = 0.0  # advance the clock by this much on every request

    async def __aenter__(self) -> InferenceServers:
        app = web.Application()
        app.router.add_get("/{pod}/metrics", self._page)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        await self.server.close()

    async def _page(self, request: web.Request) -> web.Response:
        if self.fail:
            return web.Response(status=503)
        self.clock.advance(self.step_s)
        pod = next(p for p in self.scenario.pods if p.name == request.match_info["pod"])
        text = metrics_page(self.scenario, pod, self.scenario.time_s(self.clock()))
        return web.Response(text=text, content_type="text/plain")

    def targets(self) -> list[ScrapeTarget]:
        assert self.server is not None
        return [
            ScrapeTarget(
                p.namespace,
                p.name,
                p.uid,
                f"http://127.0.0.1:{self.server.port}/{p.name}/metrics",
                p.inference.model,
            )
            for p in self.scenario.pods
            if p.inference is not None
        ]


async def test_deltas_per_pod_and_model_across_scrapes_and_a_restart() -> None:
    clock = SimClock(START + 100)
    registry = CollectorRegistry()
    metrics = TokensMetrics(registry, "demo", "n1")
    async with InferenceServers(clock) as servers, aiohttp.ClientSession() as session:
        scraper = TokenScraper("demo", metrics, http_fetcher(session, 5), clock)
        targets = servers.targets()
        assert await scraper.scrape_all(targets) == []  # first scrape: baselines only
        clock.advance(15)
        events = await scraper.scrape_all(targets)
        by_pod = {(e.data.pod, e.data.model): e.data for e in events}
        llama = by_pod[("llama-vllm-0", "meta-llama/Llama-3.1-8B-Instruct")]
        assert llama.interval_s == 15
        assert 2400 * 15 * 0.9 < llama.prompt_tokens < 2400 * 15 * 1.3
        assert llama.cached_tokens is not None and llama.prefill_s is not None and llama.decode_s
        gemma = by_pod[("gemma-tgi-0", "google/gemma-2-9b-it")]  # TGI: model from annotation
        assert gemma.prompt_tokens > 0 and gemma.cached_tokens is None
        triton = by_pod[("ranker-triton-0", "bert-reranker")]
        assert triton.requests > 0 and triton.prompt_tokens == 0
        assert {e.id for e in events} == {
            f"{e.data.pod_uid}:{e.data.model}:{int(clock() * 1000)}" for e in events
        }
        # llama-vllm-0 restarts at t=300 (half the scenario): counters reset
        clock.now_s = START + 310
        after = {e.data.pod: e.data for e in await scraper.scrape_all(targets)}
        assert 0 < after["llama-vllm-0"].prompt_tokens < 2400 * 15
        assert (
            registry.get_sample_value(
                "gpuledger_tokens_counter_resets_total", {"cluster": "demo", "node": "n1"}
            )
            == 1
        )


async def test_failed_scrapes_keep_the_baseline() -> None:
    clock = SimClock(START + 100)
    registry = CollectorRegistry()
    async with InferenceServers(clock) as servers, aiohttp.ClientSession() as session:
        scraper = TokenScraper(
            "demo", TokensMetrics(registry, "demo", ""), http_fetcher(session, 5), clock
        )
        targets = servers.targets()[:1]
        await scraper.scrape_all(targets)
        servers.fail = True
        clock.advance(10)
        assert await scraper.scrape_all(targets) == []
        servers.fail = False
        clock.advance(10)
        (event,) = await scraper.scrape_all(targets)
    assert event.data.interval_s == 20  # covers the failed scrape too: nothing lost
    assert (
        registry.get_sample_value(
            "gpuledger_tokens_scrapes_total", {"cluster": "demo", "node": "", "result": "error"}
        )
        == 1
    )


def test_discovery_by_prometheus_annotations() -> None:
    scenario = demo_scenario(START)
    objects = [pod_object(scenario, p) for p in scenario.pods]
    targets = targets_from_pods(objects + recorded("podlist.json")["items"])
    by_pod = {t.pod: t for t in targets}
    assert by_pod["llama-vllm-0"].url.endswith(":8000/metrics")
    assert by_pod["gemma-tgi-0"].default_model == "google/gemma-2-9b-it"
    assert "notebook-alice" not in by_pod  # not annotated
    recorded_pod = by_pod["llama-vllm-7d9c5b6f4-x2k8q"]
    assert recorded_pod.url == "http://10.42.1.17:8000/metrics"
    assert "pending-job-6b8d9f7c5-zzz11" not in by_pod  # not running


def test_static_target_syntax() -> None:
    t = parse_static_target(
        "search/llama-0/dde1244b-5bb5-4297-b544-85f3bc0d80bf=http://h:8000/metrics#m"
    )
    assert (t.namespace, t.pod, t.pod_uid, t.url, t.default_model) == (
        "search",
        "llama-0",
        "dde1244b-5bb5-4297-b544-85f3bc0d80bf",
        "http://h:8000/metrics",
        "m",
    )
    assert parse_static_target("a/b=http://x/metrics").pod_uid == "static:a/b"


async def test_tokens_command_end_to_end_dry_run() -> None:
    clock = SimClock(START + 100)
    async with InferenceServers(clock) as servers:
        target = servers.targets()[0]
        servers.step_s = 10.0  # every request sees ten more seconds of traffic
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gpuledger.cli",
            "tokens",
            "--dry-run",
            "--no-discovery",
            "--interval",
            "0.2",
            "--count",
            "4",
            "--metrics-port",
            "0",
            "--cluster",
            "demo",
            "--target",
            f"{target.namespace}/{target.pod}/{target.pod_uid}={target.url}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    events = [orjson.loads(line) for line in out.splitlines()]
    assert len(events) == 3  # four scrapes: one baseline, three deltas
    assert {e["data"]["model"] for e in events} == {"meta-llama/Llama-3.1-8B-Instruct"}
    assert all(e["data"]["prompt_tokens"] > 0 for e in events)

"""Scrape targets are the pod's own address: annotations cannot point the scraper elsewhere
(server-side request forgery), pages are size-capped, redirects are not followed, and a server
whose page is not at /metrics (trtllm-serve, NIM) is found at its own default path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from agents.metrics import TokensMetrics
from agents.token_scraper import (
    MAX_BODY_BYTES,
    ScrapeTarget,
    TokenScraper,
    http_fetcher,
    targets_from_pods,
    valid_path,
)

FIXTURES = Path(__file__).parents[2] / "fixtures" / "inference_servers"
TRTLLM = FIXTURES / "trtllm_serve"


class Recorder:
    """A local HTTP server that records every path asked of it."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.pages: dict[str, web.Response | Any] = {}
        self.server: TestServer | None = None

    async def _any(self, request: web.Request) -> web.StreamResponse:
        self.paths.append(request.path_qs)
        page = self.pages.get(request.path)
        if page is None:
            return web.Response(status=404)
        if callable(page):
            result: web.StreamResponse = await page(request)
            return result
        assert isinstance(page, web.Response)
        return web.Response(body=page.body, status=page.status, headers=page.headers)

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.port is not None
        return self.server.port


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec._any)
    rec.server = TestServer(app, host="127.0.0.1")
    await rec.server.start_server()
    yield rec
    await rec.server.close()


def pod(notes: dict[str, str], ip: str = "127.0.0.1", **extra: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "tenant",
            "name": "llm-0",
            "uid": "uid-1",
            "annotations": {"prometheus.io/scrape": "true", **notes},
        },
        "status": {"phase": "Running", "podIP": ip},
        **extra,
    }


def scraper(session: aiohttp.ClientSession, registry: CollectorRegistry) -> TokenScraper:
    clock = iter(float(t) for t in range(100, 10_000, 15))
    return TokenScraper(
        "c", TokensMetrics(registry, "c", "n"), http_fetcher(session, 5), lambda: next(clock)
    )


def scrapes(registry: CollectorRegistry, result: str) -> float:
    value = registry.get_sample_value(
        "gpuledger_tokens_scrapes_total", {"cluster": "c", "node": "n", "result": result}
    )
    return value or 0.0


async def test_a_forged_scheme_annotation_is_refused_and_never_fetched(
    recorder: Recorder,
) -> None:
    recorder.pages["/metrics"] = web.Response(text="vllm:prompt_tokens_total 1\n")
    forged = f"http://127.0.0.1:{recorder.port}/latest/meta-data/iam/security-credentials?"
    pods = [pod({"prometheus.io/port": str(recorder.port), "prometheus.io/scheme": forged})]
    targets = targets_from_pods(pods)
    assert targets == []
    registry = CollectorRegistry()
    async with aiohttp.ClientSession() as session:
        assert await scraper(session, registry).scrape_all(targets) == []
    assert recorder.paths == []


@pytest.mark.parametrize("scheme", ["HTTPS", "http", " https "])
def test_allowed_schemes(scheme: str) -> None:
    [target] = targets_from_pods(
        [pod({"prometheus.io/port": "8000", "prometheus.io/scheme": scheme})]
    )
    assert target.url == f"{scheme.strip().lower()}://127.0.0.1:8000/metrics"


@pytest.mark.parametrize("scheme", ["file", "gopher", "http://evil", "ftp", "unix"])
def test_other_schemes_are_refused(scheme: str) -> None:
    assert (
        targets_from_pods([pod({"prometheus.io/port": "8000", "prometheus.io/scheme": scheme})])
        == []
    )


@pytest.mark.parametrize(
    "path",
    [
        "/metrics?x=1",
        "/metrics#frag",
        "/@evil.example/metrics",
        "//evil.example/metrics",
        "/../../latest/meta-data",
        "/a b",
        "/a\tb",
        "/a\nb",
        "/%2e%2e/meta-data",
        "/" + "m" * 300,
    ],
)
def test_paths_that_could_change_the_target_are_refused(path: str) -> None:
    assert not valid_path(path)
    notes = {"prometheus.io/port": "8000", "prometheus.io/path": path}
    assert targets_from_pods([pod(notes)]) == []


@pytest.mark.parametrize("path", ["/metrics", "/prometheus/metrics", "/v1/metrics", "metrics"])
def test_plain_paths_are_kept(path: str) -> None:
    notes = {"prometheus.io/port": "8000", "prometheus.io/path": path}
    [target] = targets_from_pods([pod(notes)])
    assert target.url == "http://127.0.0.1:8000/" + path.lstrip("/")
    assert target.probe_urls == ()  # an annotated path is the only one tried


@pytest.mark.parametrize(
    "port", ["0", "65536", "80a", "-1", "8000/x", "\uff11\uff12\uff13", "99999999"]
)
def test_ports_outside_1_to_65535_are_refused(port: str) -> None:
    assert targets_from_pods([pod({"prometheus.io/port": port})]) == []


@pytest.mark.parametrize("ip", ["evil.example", "127.0.0.1/metadata", "10.0.0.1:80", ""])
def test_a_pod_ip_that_is_not_an_address_is_refused(ip: str) -> None:
    assert targets_from_pods([pod({"prometheus.io/port": "8000"}, ip=ip)]) == []


def test_ipv6_pod_addresses_are_bracketed() -> None:
    [target] = targets_from_pods([pod({"prometheus.io/port": "8000"}, ip="fd00::7")])
    assert target.url == "http://[fd00::7]:8000/metrics"


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_huge_page_is_refused_with_a_warning(
    recorder: Recorder, chunked: bool, caplog: pytest.LogCaptureFixture
) -> None:
    line = b'vllm:prompt_tokens_total{model_name="m"} 1\n'
    body = line * (MAX_BODY_BYTES // len(line) + 10)

    async def streamed(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 1 << 20):
            await response.write(body[start : start + (1 << 20)])
        return response

    recorder.pages["/metrics"] = streamed if chunked else web.Response(body=body)
    target = ScrapeTarget("t", "p", "u", f"http://127.0.0.1:{recorder.port}/metrics")
    registry = CollectorRegistry()
    async with aiohttp.ClientSession() as session:
        assert await scraper(session, registry).scrape_all([target]) == []
    assert scrapes(registry, "too_large") == 1 and scrapes(registry, "ok") == 0
    assert "over" in caplog.text and str(MAX_BODY_BYTES) in caplog.text


async def test_redirects_are_not_followed(recorder: Recorder) -> None:
    recorder.pages["/metrics"] = web.Response(
        status=302, headers={"Location": "/latest/meta-data/"}
    )
    recorder.pages["/latest/meta-data/"] = web.Response(text="vllm:prompt_tokens_total 1\n")
    target = ScrapeTarget("t", "p", "u", f"http://127.0.0.1:{recorder.port}/metrics")
    registry = CollectorRegistry()
    async with aiohttp.ClientSession() as session:
        assert await scraper(session, registry).scrape_all([target]) == []
    assert recorder.paths == ["/metrics"]
    assert scrapes(registry, "error") == 1


async def test_trtllm_serve_is_found_at_its_own_path_and_named_by_the_annotation(
    recorder: Recorder,
) -> None:
    pages = iter([TRTLLM / "scrape1.prom", TRTLLM / "scrape2.prom"])

    async def prometheus(_: web.Request) -> web.Response:
        return web.Response(text=next(pages).read_text())

    recorder.pages["/metrics"] = web.json_response([{"gpuCacheUsage": 0.1}])
    recorder.pages["/prometheus/metrics"] = prometheus
    notes = {"prometheus.io/port": str(recorder.port), "gpuledger.io/model": "org/served-model"}
    [target] = targets_from_pods([pod(notes)])
    registry = CollectorRegistry()
    async with aiohttp.ClientSession() as session:
        scrape = scraper(session, registry)
        assert await scrape.scrape_all([target]) == []
        [event] = await scrape.scrape_all([target])
    assert event.data.model == "org/served-model"
    assert (event.data.prompt_tokens, event.data.completion_tokens) == (5012, 714)
    assert (event.data.requests, event.data.cached_tokens) == (3, 2560)
    # the JSON /metrics is tried once; afterwards the path that gave a page is kept
    assert recorder.paths == ["/metrics", "/prometheus/metrics", "/prometheus/metrics"]
    assert scrapes(registry, "ok") == 2 and scrapes(registry, "unparsable") == 0


async def test_nim_is_found_at_v1_metrics(recorder: Recorder) -> None:
    nim = FIXTURES / "nim_llm"
    pages = iter([nim / "scrape1.prom", nim / "scrape2.prom"])

    async def prometheus(_: web.Request) -> web.Response:
        return web.Response(text=next(pages).read_text())

    recorder.pages["/v1/metrics"] = prometheus
    [target] = targets_from_pods([pod({"prometheus.io/port": str(recorder.port)})])
    registry = CollectorRegistry()
    async with aiohttp.ClientSession() as session:
        scrape = scraper(session, registry)
        await scrape.scrape_all([target])
        [event] = await scrape.scrape_all([target])
    assert (event.data.model, event.data.prompt_tokens, event.data.requests) == (
        "meta/llama-3.1-8b-instruct",
        1580,
        3,
    )

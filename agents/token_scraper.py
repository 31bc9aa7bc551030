"""Scrapes inference servers and turns their counters into `io.gpuledger.tokens.v1` deltas.

Targets come from pods annotated `prometheus.io/scrape: "true"` (with `prometheus.io/port`,
`prometheus.io/path`, `prometheus.io/scheme`) and from a static list. A pod annotated
`gpuledger.io/model` names the model for servers whose metrics carry no model label (TGI,
trtllm-serve). Annotations are tenants' input: a target is always the pod's own IP, with an
allow-listed scheme, a checked port and path, and a bounded response.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from agents.metrics import TokensMetrics
from agents.server_profiles import DEFAULT_METRICS_PATH, PROBE_PATHS
from agents.token_counters import UNKNOWN_MODEL, CounterTotals, counter_delta, parse_totals
from runtime.errors import ConfigError
from schemas.events import CloudEvent, TokenDelta, make_event
from schemas.fields import MAX_DNS_LABEL, MAX_DNS_SUBDOMAIN, MAX_MODEL, MAX_SERIES_UID

log = logging.getLogger(__name__)

SCRAPE = "prometheus.io/scrape"
PORT = "prometheus.io/port"
PATH = "prometheus.io/path"
SCHEME = "prometheus.io/scheme"
MODEL = "gpuledger.io/model"

SCHEMES = ("http", "https")
MAX_PATH = 256
MAX_BODY_BYTES = 8 * 1024 * 1024


class ResponseTooLarge(Exception):
    """A metrics page over the size cap: the scrape is skipped."""


class NotPrometheusText(Exception):
    """The endpoint answered with something other than Prometheus text (trtllm-serve's JSON
    `/metrics`)."""


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    namespace: str
    pod: str
    pod_uid: str
    url: str
    default_model: str = UNKNOWN_MODEL
    # Tried in order after `url` while none has given a page (no path annotation): the
    # servers' default paths, e.g. trtllm-serve's /prometheus/metrics, NIM's /v1/metrics.
    probe_urls: tuple[str, ...] = ()


def valid_path(path: str) -> bool:
    """A metrics path from an annotation: absolute, bounded, no query, fragment, credentials,
    whitespace or parent segments, so it cannot turn the pod's URL into another one."""
    return (
        path.startswith("/")
        and not path.startswith("//")
        and len(path) <= MAX_PATH
        and path.isprintable()
        and not any(c in path for c in "?#@\\%")
        and not any(c.isspace() for c in path)
        and ".." not in path
    )


def _port(value: object) -> int | None:
    text = str(value).strip()
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


def targets_from_pods(pods: Iterable[Mapping[str, Any]]) -> list[ScrapeTarget]:
    """Scrape targets from Kubernetes Pod objects: running, with an IP, annotated for scraping.
    Without a port annotation, the first declared container port is used."""
    targets = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        notes = meta.get("annotations") or {}
        status = pod.get("status") or {}
        if str(notes.get(SCRAPE, "")).lower() != "true":
            continue
        if status.get("phase") != "Running" or not status.get("podIP"):
            continue
        who = f"{meta.get('namespace')}/{meta.get('name')}"
        port_note = notes.get(PORT)
        if not port_note:
            ports = [
                p.get("containerPort")
                for c in (pod.get("spec") or {}).get("containers") or []
                for p in c.get("ports") or []
            ]
            port_note = ports[0] if ports else None
        port = _port(port_note) if port_note else None
        if port is None:
            if port_note:
                log.warning(
                    "pod %s: %s %.40r is not a port 1-65535; not scraped", who, PORT, port_note
                )
            continue
        path_note = notes.get(PATH)
        path = str(path_note) if path_note else DEFAULT_METRICS_PATH
        if path_note and not path.startswith("/"):
            path = "/" + path
        if not valid_path(path):
            log.warning("pod %s: %s %.60r is not a plain path; not scraped", who, PATH, path)
            continue
        scheme = str(notes.get(SCHEME) or "http").strip().lower()
        if scheme not in SCHEMES:
            log.warning("pod %s: %s %.60r is not http or https; not scraped", who, SCHEME, scheme)
            continue
        try:
            ip = ipaddress.ip_address(str(status["podIP"]))
        except ValueError:
            log.warning(
                "pod %s: podIP %.60r is not an IP address; not scraped", who, status["podIP"]
            )
            continue
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        base = f"{scheme}://{host}:{port}"
        probes = () if path_note else tuple(base + p for p in PROBE_PATHS if p != path)
        model = str(notes.get(MODEL) or UNKNOWN_MODEL)
        if len(model) > MAX_MODEL:  # annotations are bounded only by their total, 256 KiB
            log.warning(
                "pod %s/%s: annotation %s has %d characters; its events carry the first %d",
                meta.get("namespace"),
                meta.get("name"),
                MODEL,
                len(model),
                MAX_MODEL,
            )
            model = model[:MAX_MODEL]
        targets.append(
            ScrapeTarget(
                namespace=str(meta.get("namespace", "")),
                pod=str(meta.get("name", "")),
                pod_uid=str(meta.get("uid", "")),
                url=base + path,
                default_model=model,
                probe_urls=probes,
            )
        )
    return targets


def parse_static_target(text: str) -> ScrapeTarget:
    """`NAMESPACE/POD[/UID]=URL[#MODEL]`; the uid defaults to `static:NAMESPACE/POD`."""
    who, sep, rest = text.partition("=")
    parts = who.strip().split("/")
    if not sep or len(parts) not in (2, 3) or not all(parts) or "://" not in rest:
        raise ConfigError(f"--target must be NAMESPACE/POD[/UID]=URL[#MODEL], got {text!r}")
    url, _, model = rest.strip().partition("#")
    uid = parts[2] if len(parts) == 3 else f"static:{parts[0]}/{parts[1]}"
    for what, value, limit in (
        ("namespace", parts[0], MAX_DNS_LABEL),
        ("pod", parts[1], MAX_DNS_SUBDOMAIN),
        ("uid", uid, MAX_SERIES_UID),
        ("model", model, MAX_MODEL),
    ):
        if len(value) > limit:  # every event of the target would be refused
            raise ConfigError(
                f"--target {what} has {len(value)} characters; events carry at most {limit}"
            )
    return ScrapeTarget(parts[0], parts[1], uid, url, model or UNKNOWN_MODEL)


Fetch = Callable[[ScrapeTarget], Awaitable[str]]


@dataclass(slots=True)
class _Series:
    totals: CounterTotals
    time_s: float


class TokenScraper:
    """Keeps the last totals of every (pod uid, model) series and emits deltas."""

    def __init__(
        self,
        cluster: str,
        metrics: TokensMetrics,
        fetch: Fetch,
        clock: Callable[[], float],
        *,
        max_concurrency: int = 32,
    ) -> None:
        self.cluster = cluster
        self.metrics = metrics
        self.fetch = fetch
        self.clock = clock
        self.source = f"gpuledger/tokens/{cluster}/{metrics.node}"
        self._series: dict[tuple[str, str], _Series] = {}
        # pod uid -> time of its last good scrape; a series new on such a pod starts from 0
        self._pods: dict[str, float] = {}
        self._resolved_urls: dict[str, str] = {}  # pod uid -> the probed URL that gave a page
        self._limit = asyncio.Semaphore(max_concurrency)

    def observe(
        self, target: ScrapeTarget, text: str, time_s: float
    ) -> list[CloudEvent[TokenDelta]]:
        """Fold one scraped page into the series state; returns the deltas to publish.

        The first good scrape of a pod only sets baselines. A series that appears on a pod
        scraped before starts from zero: servers create series with their first request
        (SGLang, TGI, trtllm-serve, labelled children), so its whole value was served since."""
        totals_by_model = parse_totals(text, target.default_model)
        pod_seen_s = self._pods.get(target.pod_uid)
        self._pods[target.pod_uid] = time_s
        events = []
        time_ms = round(time_s * 1000)
        for model, totals in totals_by_model.items():
            key = (target.pod_uid, model)
            previous = self._series.get(key)
            self._series[key] = _Series(totals, time_s)
            if previous is None:
                if len(model) == MAX_MODEL:
                    log.warning(
                        "pod %s/%s: model names of %d characters or more are cut to %d: %.60r…",
                        target.namespace,
                        target.pod,
                        MAX_MODEL,
                        MAX_MODEL,
                        model,
                    )
                if pod_seen_s is None:
                    continue  # the first scrape of a pod only sets the baseline
                previous = _Series(_zero_like(totals), pod_seen_s)
            delta = counter_delta(previous.totals, totals)
            if delta is None:
                continue
            if delta.reset:
                self.metrics.counter_reset()
            if delta.empty:
                continue
            data = TokenDelta(
                cluster=self.cluster,
                namespace=target.namespace,
                pod=target.pod,
                pod_uid=target.pod_uid,
                model=model,
                prompt_tokens=max(0, delta.prompt_tokens),
                completion_tokens=max(0, delta.completion_tokens),
                requests=max(0, delta.requests),
                interval_s=round(max(0.0, time_s - previous.time_s), 6),
                cached_tokens=delta.cached_tokens,
                prefill_s=delta.prefill_s,
                decode_s=delta.decode_s,
            )
            events.append(
                make_event(
                    data,
                    event_id=f"{target.pod_uid}:{model}:{time_ms}",
                    source=self.source,
                    time_ms=time_ms,
                )
            )
        return events

    def forget_except(self, pod_uids: set[str]) -> None:
        """Drop series of pods no longer scraped, so a returning pod starts from a baseline."""
        for key in [k for k in self._series if k[0] not in pod_uids]:
            del self._series[key]
        for uid in [u for u in self._pods if u not in pod_uids]:
            del self._pods[uid]
        for uid in [u for u in self._resolved_urls if u not in pod_uids]:
            del self._resolved_urls[uid]

    async def scrape_all(self, targets: list[ScrapeTarget]) -> list[CloudEvent[TokenDelta]]:
        self.metrics.targets(len(targets))
        self.forget_except({t.pod_uid for t in targets})
        results = await asyncio.gather(*(self._scrape(t) for t in targets))
        events = [e for batch in results for e in batch]
        self.metrics.deltas(len(events))
        return events

    async def _scrape(self, target: ScrapeTarget) -> list[CloudEvent[TokenDelta]]:
        resolved = self._resolved_urls.get(target.pod_uid)
        urls = [resolved] if resolved else [target.url, *target.probe_urls]
        async with self._limit:
            for index, url in enumerate(urls):
                last = index == len(urls) - 1
                at = target if url == target.url else dataclasses.replace(target, url=url)
                try:
                    text = await self.fetch(at)
                except ResponseTooLarge as exc:
                    self.metrics.scrape("too_large", self.clock())
                    log.warning("scrape %s skipped: %s", url, exc)
                    return []
                except NotPrometheusText as exc:
                    if last:
                        self.metrics.scrape("unparsable", self.clock())
                        log.warning("scrape %s: %s", url, exc)
                    continue
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    if last:
                        self.metrics.scrape("error", self.clock())
                        log.debug("scrape %s failed: %s", url, exc)
                    continue
                time_s = self.clock()
                try:
                    events = self.observe(at, text, time_s)
                except (ValueError, TypeError) as exc:
                    if last:
                        self.metrics.scrape("unparsable", time_s)
                        log.warning("scrape %s: not Prometheus text (%s)", url, exc)
                    continue
                if target.probe_urls:
                    self._resolved_urls[target.pod_uid] = url
                self.metrics.scrape("ok", time_s)
                return events
        self._resolved_urls.pop(target.pod_uid, None)  # look for the page again next time
        return []


def _zero_like(totals: CounterTotals) -> CounterTotals:
    """The baseline of a series new on a pod already scraped: nothing served, same process."""

    def zero(value: float | None) -> float | None:
        return None if value is None else 0.0

    return dataclasses.replace(
        totals,
        prompt_tokens=0.0,
        completion_tokens=0.0,
        requests=0.0,
        cached_tokens=zero(totals.cached_tokens),
        prefill_s=zero(totals.prefill_s),
        decode_s=zero(totals.decode_s),
    )


def http_fetcher(
    session: aiohttp.ClientSession, timeout_s: float, *, max_body_bytes: int = MAX_BODY_BYTES
) -> Fetch:
    """GETs a target's URL: no redirects (a page could send the scraper anywhere), at most
    `max_body_bytes` read (decompressed), JSON refused."""

    async def fetch(target: ScrapeTarget) -> str:
        async with session.get(
            target.url,
            headers={"Accept": "text/plain;version=0.0.4"},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,
        ) as response:
            if 300 <= response.status < 400:
                raise aiohttp.ClientResponseError(
                    response.request_info,
                    response.history,
                    status=response.status,
                    message="redirects are not followed",
                )
            response.raise_for_status()
            if response.content_type == "application/json":
                raise NotPrometheusText("the endpoint answers JSON, not Prometheus text")
            if (response.content_length or 0) > max_body_bytes:
                raise ResponseTooLarge(
                    f"Content-Length {response.content_length} is over {max_body_bytes} bytes"
                )
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > max_body_bytes:
                    raise ResponseTooLarge(f"the page is over {max_body_bytes} bytes")
            return body.decode(response.charset or "utf-8", errors="replace")

    return fetch

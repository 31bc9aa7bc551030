"""Scrapes inference servers and turns their counters into `io.gpuledger.tokens.v1` deltas.

Targets come from pods annotated `prometheus.io/scrape: "true"` (with `prometheus.io/port`,
`prometheus.io/path`, `prometheus.io/scheme`) and from a static list. A pod annotated
`gpuledger.io/model` names the model for servers whose metrics carry no model label (TGI).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from agents.metrics import TokensMetrics
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


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    namespace: str
    pod: str
    pod_uid: str
    url: str
    default_model: str = UNKNOWN_MODEL


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
        port = notes.get(PORT)
        if not port:
            ports = [
                p.get("containerPort")
                for c in (pod.get("spec") or {}).get("containers") or []
                for p in c.get("ports") or []
            ]
            port = ports[0] if ports else None
        if not port or not str(port).isdigit():
            continue
        path = str(notes.get(PATH) or "/metrics")
        if not path.startswith("/"):
            path = "/" + path
        scheme = str(notes.get(SCHEME) or "http")
        ip = str(status["podIP"])
        host = f"[{ip}]" if ":" in ip else ip
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
                url=f"{scheme}://{host}:{port}{path}",
                default_model=model,
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
        self._limit = asyncio.Semaphore(max_concurrency)

    def observe(
        self, target: ScrapeTarget, text: str, time_s: float
    ) -> list[CloudEvent[TokenDelta]]:
        """Fold one scraped page into the series state; returns the deltas to publish."""
        totals_by_model = parse_totals(text, target.default_model)
        events = []
        time_ms = round(time_s * 1000)
        for model, totals in totals_by_model.items():
            key = (target.pod_uid, model)
            previous = self._series.get(key)
            self._series[key] = _Series(totals, time_s)
            if previous is None:
                if len(model) == MAX_MODEL:
                    log.warning(
                        "pod %s/%s: model names of %d characters or more are cut to %d: %.60s…",
                        target.namespace,
                        target.pod,
                        MAX_MODEL,
                        MAX_MODEL,
                        model,
                    )
                continue  # the first scrape of a series only sets the baseline
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

    async def scrape_all(self, targets: list[ScrapeTarget]) -> list[CloudEvent[TokenDelta]]:
        self.metrics.targets(len(targets))
        self.forget_except({t.pod_uid for t in targets})
        results = await asyncio.gather(*(self._scrape(t) for t in targets))
        events = [e for batch in results for e in batch]
        self.metrics.deltas(len(events))
        return events

    async def _scrape(self, target: ScrapeTarget) -> list[CloudEvent[TokenDelta]]:
        async with self._limit:
            try:
                text = await self.fetch(target)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self.metrics.scrape("error", self.clock())
                log.debug("scrape %s failed: %s", target.url, exc)
                return []
            time_s = self.clock()
            try:
                events = self.observe(target, text, time_s)
            except (ValueError, TypeError) as exc:
                self.metrics.scrape("unparsable", time_s)
                log.warning("scrape %s: not Prometheus text (%s)", target.url, exc)
                return []
            self.metrics.scrape("ok", time_s)
            return events


def http_fetcher(session: aiohttp.ClientSession, timeout_s: float) -> Fetch:
    async def fetch(target: ScrapeTarget) -> str:
        async with session.get(
            target.url,
            headers={"Accept": "text/plain;version=0.0.4"},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as response:
            response.raise_for_status()
            return await response.text()

    return fetch

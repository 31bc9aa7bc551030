"""`gpuledger tokens`: the token scraper. Scrapes inference servers' Prometheus endpoints each
interval and publishes per-(pod, model) deltas as `io.gpuledger.tokens.v1` to `gpuledger.tokens`,
keyed by pod uid. Run it as a DaemonSet (`--node` = this node) or one Deployment for the cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from agents.kube_client import (
    KubeClient,
    KubeSettings,
    add_kube_options,
    kube_settings_from,
)
from agents.metrics import TokensMetrics
from agents.runtime import (
    RunSettings,
    add_node_option,
    add_run_options,
    configure_logging,
    make_publisher,
    run_producer,
    run_settings_from,
)
from agents.token_scraper import (
    ScrapeTarget,
    TokenScraper,
    http_fetcher,
    parse_static_target,
    targets_from_pods,
)
from runtime.errors import ConfigError, GpuledgerError, KubeApiError
from runtime.options import add_log_level_option
from schemas.events import TOKENS_TOPIC

DEFAULT_METRICS_PORT = 9111


@dataclass(frozen=True, slots=True)
class TokensConfig:
    run: RunSettings
    kube: KubeSettings | None  # None: static targets only
    node: str | None  # only pods on this node (DaemonSet mode)
    static_targets: tuple[ScrapeTarget, ...] = ()
    discover_interval_s: float = 30.0
    scrape_timeout_s: float = 5.0
    log_level: str = "INFO"


def register(subparsers: Any, env: Mapping[str, str]) -> None:
    parser = subparsers.add_parser(
        "tokens",
        help="token scraper: publish token deltas from inference servers' /metrics",
        description=__doc__,
    )
    add_run_options(
        parser,
        env,
        interval_env="GPULEDGER_TOKENS_INTERVAL",
        metrics_port_env="GPULEDGER_TOKENS_METRICS_PORT",
        default_interval_s=15.0,
        default_metrics_port=DEFAULT_METRICS_PORT,
    )
    add_kube_options(parser, env)
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAMESPACE/POD[/UID]=URL[#MODEL]",
        help="a static scrape target (repeatable)",
    )
    parser.add_argument(
        "--no-discovery",
        action="store_true",
        help="do not discover annotated pods through the Kubernetes API",
    )
    add_node_option(parser, env, "scrape only pods on this node")
    parser.add_argument("--discover-interval", type=float, default=30.0, metavar="SECONDS")
    parser.add_argument("--scrape-timeout", type=float, default=5.0, metavar="SECONDS")
    add_log_level_option(parser, env)
    parser.set_defaults(handler=lambda args: main(tokens_config_from(args)))


def tokens_config_from(args: argparse.Namespace) -> TokensConfig:
    targets = tuple(parse_static_target(t) for t in args.target)
    kube = None if args.no_discovery else kube_settings_from(args)
    if kube is None and not targets:
        raise ConfigError("nothing to scrape: give --target or allow discovery")
    if args.scrape_timeout <= 0 or args.discover_interval <= 0:
        raise ConfigError("--scrape-timeout and --discover-interval must be positive")
    return TokensConfig(
        run=run_settings_from(args),
        kube=kube,
        node=args.node or None,
        static_targets=targets,
        discover_interval_s=float(args.discover_interval),
        scrape_timeout_s=float(args.scrape_timeout),
        log_level=args.log_level,
    )


async def run_tokens(config: TokensConfig, registry: CollectorRegistry | None = None) -> int:
    registry = registry or CollectorRegistry()
    metrics = TokensMetrics(registry, config.run.cluster, config.node or "")
    publisher = make_publisher(config.run, TOKENS_TOPIC, metrics.buffer)
    session = aiohttp.ClientSession()
    client = KubeClient(config.kube) if config.kube is not None else None
    if client is not None:
        await client.start()
    scraper = TokenScraper(
        config.run.cluster, metrics, http_fetcher(session, config.scrape_timeout_s), time.time
    )
    discovered: list[ScrapeTarget] = []
    next_discovery = [0.0]
    last_scrape_ok = [time.monotonic()]

    async def discover() -> None:
        if client is None or time.monotonic() < next_discovery[0]:
            return
        params = {"fieldSelector": f"spec.nodeName={config.node}"} if config.node else {}
        try:
            pods, _ = await client.list_all("/api/v1/pods", params)
        except KubeApiError as exc:
            print(f"gpuledger tokens: pod discovery failed: {exc}", file=sys.stderr)
            next_discovery[0] = time.monotonic() + min(config.discover_interval_s, 5.0)
            return
        discovered[:] = targets_from_pods(pods)
        next_discovery[0] = time.monotonic() + config.discover_interval_s

    async def one_pass() -> None:
        await discover()
        targets = [*config.static_targets, *discovered]
        events = await scraper.scrape_all(targets)
        last_scrape_ok[0] = time.monotonic()
        for event in events:
            publisher.publish(TOKENS_TOPIC, event.data.pod_uid, event)

    def health() -> tuple[bool, str]:
        age = time.monotonic() - last_scrape_ok[0]
        if age > max(60.0, 4 * config.run.interval_s):
            return False, f"no scrape pass for {age:.0f} s"
        return True, f"ok: {len(config.static_targets) + len(discovered)} targets"

    try:
        return await run_producer(config.run, registry, publisher, health, one_pass)
    finally:
        await session.close()
        if client is not None:
            await client.close()


def main(config: TokensConfig) -> int:
    configure_logging(config.log_level)
    try:
        return asyncio.run(run_tokens(config))
    except GpuledgerError as exc:
        print(f"gpuledger tokens: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

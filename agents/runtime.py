"""What the three producers share at run time: the common flags, the publisher choice (Kafka or
`--dry-run`), the `/metrics` endpoint, a drift-free ticker and bounded runs (`--count`,
`--duration`), and signal handling.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from agents.http_endpoint import HealthCheck, MetricsEndpoint
from agents.metrics import BufferMetrics
from agents.publisher import DEFAULT_BUFFER_MAX_EVENTS, DryRunPublisher, KafkaPublisher, Publisher
from runtime.errors import ConfigError
from runtime.kafka import (
    KafkaSettings,
    add_kafka_options,
    default_topics,
    kafka_settings_from,
)
from runtime.options import add_env_option
from schemas.fields import MAX_DNS_SUBDOMAIN


@dataclass(frozen=True, slots=True)
class RunSettings:
    """Flags every producer has."""

    cluster: str
    interval_s: float
    dry_run: bool
    kafka: KafkaSettings | None  # None in --dry-run
    metrics_host: str
    metrics_port: int  # 0: no endpoint
    count: int | None  # stop after this many passes
    duration_s: float | None  # stop after this long
    buffer_max_events: int
    topic_partitions: int


def add_run_options(
    parser: argparse.ArgumentParser,
    env: Mapping[str, str],
    *,
    interval_env: str,
    metrics_port_env: str,
    default_interval_s: float,
    default_metrics_port: int,
) -> None:
    """`interval_env` and `metrics_port_env` name this producer's own variables
    (GPULEDGER_<PART>_INTERVAL, GPULEDGER_<PART>_METRICS_PORT); the others are shared."""
    add_env_option(
        parser,
        env,
        "--cluster",
        env="GPULEDGER_CLUSTER",
        default="default",
        help="cluster name carried by every event (default: default)",
    )
    add_env_option(
        parser,
        env,
        "--interval",
        env=interval_env,
        type=float,
        default=default_interval_s,
        metavar="SECONDS",
        help=f"seconds between passes (default {default_interval_s:g})",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print each event as one JSON line on stdout instead of sending it",
    )
    add_kafka_options(parser, env)
    add_env_option(
        parser,
        env,
        "--metrics-port",
        env=metrics_port_env,
        type=int,
        default=default_metrics_port,
        help=f"port of /metrics and /healthz (default {default_metrics_port}; 0 disables)",
    )
    add_env_option(
        parser,
        env,
        "--metrics-host",
        env="GPULEDGER_METRICS_HOST",
        default="0.0.0.0",
        help="address /metrics listens on (default 0.0.0.0)",
    )
    parser.add_argument("--count", type=int, default=None, help="stop after N passes")
    parser.add_argument(
        "--duration", type=float, default=None, metavar="SECONDS", help="stop after SECONDS"
    )
    add_env_option(
        parser,
        env,
        "--buffer-max-events",
        env="GPULEDGER_BUFFER_MAX_EVENTS",
        type=int,
        default=DEFAULT_BUFFER_MAX_EVENTS,
        help="events kept locally while Kafka is unreachable; beyond it the oldest are dropped "
        f"(default {DEFAULT_BUFFER_MAX_EVENTS})",
    )
    add_env_option(
        parser,
        env,
        "--topic-partitions",
        env="GPULEDGER_TOPIC_PARTITIONS",
        type=int,
        default=6,
        help="partitions of topics this producer creates when missing (default 6)",
    )


def add_node_option(parser: argparse.ArgumentParser, env: Mapping[str, str], help: str) -> None:
    """`--node`: this node's name (the agent's, or the node a token scraper serves)."""
    add_env_option(parser, env, "--node", env="GPULEDGER_NODE_NAME", help=help)


def run_settings_from(args: argparse.Namespace) -> RunSettings:
    if args.interval <= 0:
        raise ConfigError(f"--interval must be positive, got {args.interval}")
    if args.count is not None and args.count < 1:
        raise ConfigError("--count must be at least 1")
    if args.duration is not None and args.duration <= 0:
        raise ConfigError("--duration must be positive")
    if not 0 <= args.metrics_port <= 65535:
        raise ConfigError(f"--metrics-port out of range: {args.metrics_port}")
    if args.buffer_max_events < 1:
        raise ConfigError("--buffer-max-events must be at least 1")
    if not str(args.cluster).strip():
        raise ConfigError("--cluster must not be empty")
    for option, value in (("--cluster", args.cluster), ("--node", getattr(args, "node", None))):
        if value is not None and len(str(value).strip()) > MAX_DNS_SUBDOMAIN:
            raise ConfigError(
                f"{option} is {len(str(value).strip())} characters; events allow at most "
                f"{MAX_DNS_SUBDOMAIN} (a Kubernetes name)"
            )
    return RunSettings(
        cluster=str(args.cluster).strip(),
        interval_s=float(args.interval),
        dry_run=bool(args.dry_run),
        kafka=None if args.dry_run else kafka_settings_from(args),
        metrics_host=str(args.metrics_host),
        metrics_port=int(args.metrics_port),
        count=args.count,
        duration_s=args.duration,
        buffer_max_events=int(args.buffer_max_events),
        topic_partitions=max(1, int(args.topic_partitions)),
    )


def make_publisher(
    settings: RunSettings, topic: str | Sequence[str], metrics: BufferMetrics
) -> Publisher:
    """A publisher to `topic` (or to each of several), which it creates where missing."""
    if settings.kafka is None:
        return DryRunPublisher(metrics)
    names = {topic} if isinstance(topic, str) else set(topic)
    specs = [t for t in default_topics(settings.topic_partitions) if t.name in names]
    return KafkaPublisher(
        settings.kafka, specs, metrics, max_buffer_events=settings.buffer_max_events
    )


async def run_producer(
    settings: RunSettings,
    registry: CollectorRegistry,
    publisher: Publisher,
    health: HealthCheck,
    one_pass: Callable[[], Awaitable[None]],
    *,
    background: Sequence[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = (),
) -> int:
    """Start the endpoint and publisher, run `one_pass` every interval (no drift) until a bound
    or a signal, then flush and stop. `background` coroutines run alongside (e.g. watches) and
    get the stop event."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    endpoint = None
    if settings.metrics_port:
        endpoint = MetricsEndpoint(registry, health, settings.metrics_host, settings.metrics_port)
        await endpoint.start()
    await publisher.start()
    tasks = [asyncio.create_task(fn(stop)) for fn in background]
    started = time.monotonic()
    passes = 0
    try:
        while not stop.is_set():
            await one_pass()
            publisher.check()
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            passes += 1
            if settings.count is not None and passes >= settings.count:
                break
            now = time.monotonic()
            if settings.duration_s is not None and now - started >= settings.duration_s:
                break
            next_tick = started + passes * settings.interval_s
            if next_tick < now:  # a pass overran: skip missed ticks rather than burst
                passes_behind = int((now - started) / settings.interval_s)
                next_tick = started + (passes_behind + 1) * settings.interval_s
            if settings.duration_s is not None:
                next_tick = min(next_tick, started + settings.duration_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, next_tick - now))
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await publisher.stop()
        if endpoint is not None:
            await endpoint.stop()
    return 0


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

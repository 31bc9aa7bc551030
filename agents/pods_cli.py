"""`gpuledger pods`: the pod watcher. Publishes `io.gpuledger.pod.v1` to the compacted
`gpuledger.pods` topic, keyed by pod uid, on every pod add, label or node change and delete;
and `io.gpuledger.node.v1` to the compacted `gpuledger.nodes` topic, keyed by
`<cluster>/<node>`, when a node appears, changes its providerID, instance type or capacity, or
goes (`--no-nodes`: not). Run it once per cluster (a Deployment with one replica).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from agents.kube_client import KubeClient, KubeSettings, add_kube_options, kube_settings_from
from agents.metrics import PodsMetrics
from agents.node_state import NodeEmission, NodeState
from agents.pod_state import PodEmission, PodState
from agents.pod_watcher import PodWatcher
from agents.runtime import (
    RunSettings,
    add_run_options,
    configure_logging,
    make_publisher,
    run_producer,
    run_settings_from,
)
from runtime.errors import GpuledgerError
from runtime.options import add_env_flag, add_log_level_option
from schemas.events import NODES_TOPIC, PODS_TOPIC, make_event

DEFAULT_METRICS_PORT = 9110


@dataclass(frozen=True, slots=True)
class PodsConfig:
    run: RunSettings  # interval_s: how often to list everything again
    kube: KubeSettings
    log_level: str = "INFO"
    nodes: bool = True  # publish node events (needs get, list and watch on nodes)


def register(subparsers: Any, env: Mapping[str, str]) -> None:
    parser = subparsers.add_parser(
        "pods",
        help="pod watcher: publish pod and namespace labels from the Kubernetes API",
        description=__doc__,
    )
    add_run_options(
        parser,
        env,
        interval_env="GPULEDGER_PODS_INTERVAL",
        metrics_port_env="GPULEDGER_PODS_METRICS_PORT",
        default_interval_s=300.0,
        default_metrics_port=DEFAULT_METRICS_PORT,
    )
    add_kube_options(parser, env)
    add_env_flag(
        parser,
        env,
        "--nodes",
        env="GPULEDGER_PODS_NODES",
        default=True,
        help=f"also publish node events to {NODES_TOPIC} (default); --no-nodes where this "
        "watcher may not read nodes",
    )
    add_log_level_option(parser, env)
    parser.set_defaults(handler=lambda args: main(pods_config_from(args)))


def pods_config_from(args: argparse.Namespace) -> PodsConfig:
    return PodsConfig(
        run=run_settings_from(args),
        kube=kube_settings_from(args),
        log_level=args.log_level,
        nodes=bool(args.nodes),
    )


async def run_pods(config: PodsConfig, registry: CollectorRegistry | None = None) -> int:
    registry = registry or CollectorRegistry()
    metrics = PodsMetrics(registry, config.run.cluster)
    topics = [PODS_TOPIC, NODES_TOPIC] if config.nodes else [PODS_TOPIC]
    publisher = make_publisher(config.run, topics, metrics.buffer)
    source = f"gpuledger/pods/{config.run.cluster}"

    def emit(emission: PodEmission) -> None:
        event = make_event(
            emission.info, event_id=emission.event_id, source=source, time_ms=emission.time_ms
        )
        publisher.publish(PODS_TOPIC, emission.info.uid, event)

    def emit_node(emission: NodeEmission) -> None:
        event = make_event(
            emission.info, event_id=emission.event_id, source=source, time_ms=emission.time_ms
        )
        publisher.publish(NODES_TOPIC, emission.key, event)

    client = KubeClient(config.kube)
    await client.start()
    watcher = PodWatcher(
        client,
        PodState(config.run.cluster),
        emit,
        metrics,
        nodes=NodeState(config.run.cluster) if config.nodes else None,
        emit_node=emit_node if config.nodes else None,
    )
    first = [True]

    async def one_pass() -> None:
        if first[0]:
            first[0] = False  # the watcher's own start lists everything
            return
        if watcher.synced:
            try:
                await watcher.resync()
            except GpuledgerError:
                metrics.api_error("resync")

    def health() -> tuple[bool, str]:
        if not watcher.synced:
            return False, "initial list not done"
        age = time.time() - (watcher.last_contact_s or 0)
        if age > 2 * watcher.watch_timeout_s:
            return False, f"no answer from the API server for {age:.0f} s"
        nodes = "nodes refused (403)" if watcher.nodes_forbidden else ""
        if watcher.nodes is not None and not nodes:
            nodes = f"{len(watcher.nodes.published)} nodes"
        return True, f"ok: {len(watcher.state.pods)} pods" + (f", {nodes}" if nodes else "")

    try:
        return await run_producer(
            config.run, registry, publisher, health, one_pass, background=[watcher.run]
        )
    finally:
        await client.close()


def main(config: PodsConfig) -> int:
    configure_logging(config.log_level)
    try:
        return asyncio.run(run_pods(config))
    except GpuledgerError as exc:
        print(f"gpuledger pods: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

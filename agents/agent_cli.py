"""`gpuledger agent`: the node agent. Samples every GPU and MIG instance through NVML each
interval and publishes `io.gpuledger.gpu.sample.v1` to `gpuledger.gpu-samples`, keyed by device
uuid. `--fake-nvml [SCENARIO]` runs it on the simulated NVML instead of the driver.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from agents.cgroup import ProcCgroupReader
from agents.demo_scenario import SCENARIOS
from agents.metrics import AgentMetrics
from agents.runtime import (
    RunSettings,
    add_node_option,
    add_run_options,
    configure_logging,
    make_publisher,
    run_producer,
    run_settings_from,
)
from agents.sampler import DeviceSampler, SamplerSettings
from runtime.errors import ConfigError, GpuledgerError
from runtime.options import add_env_option, add_log_level_option
from schemas.events import GPU_SAMPLES_TOPIC

DEFAULT_METRICS_PORT = 9109


@dataclass(frozen=True, slots=True)
class AgentConfig:
    run: RunSettings
    node: str
    node_labels: Mapping[str, str] = field(default_factory=dict)
    fake_scenario: str | None = None  # a name in SCENARIOS; None: the real pynvml
    proc_root: str = "/proc"
    log_level: str = "INFO"


def register(subparsers: Any, env: Mapping[str, str]) -> None:
    parser = subparsers.add_parser(
        "agent",
        help="node agent: sample GPUs through NVML and publish GPU samples",
        description=__doc__,
    )
    add_run_options(
        parser,
        env,
        interval_env="GPULEDGER_AGENT_INTERVAL",
        metrics_port_env="GPULEDGER_AGENT_METRICS_PORT",
        default_interval_s=1.0,
        default_metrics_port=DEFAULT_METRICS_PORT,
    )
    add_node_option(
        parser,
        env,
        "this node's name (e.g. from spec.nodeName; "
        "default: the host name, or the scenario's first node with --fake-nvml)",
    )
    add_env_option(
        parser,
        env,
        "--node-label",
        env="GPULEDGER_NODE_LABELS",
        separator=",",
        metavar="KEY=VALUE",
        help="a node label to carry in samples (repeatable; the variable lists them as "
        "k=v,k=v), e.g. karpenter.sh/capacity-type=spot",
    )
    parser.add_argument(
        "--fake-nvml",
        nargs="?",
        const="demo",
        default=None,
        metavar="SCENARIO",
        help=f"run on the simulated NVML; scenarios: {', '.join(SCENARIOS)} (default demo)",
    )
    add_env_option(
        parser,
        env,
        "--proc-root",
        env="GPULEDGER_PROC_ROOT",
        default="/proc",
        help="the host's /proc, for PID to pod mapping (default /proc)",
    )
    add_log_level_option(parser, env)
    parser.set_defaults(handler=lambda args: main(agent_config_from(args)))


def _parse_labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"node label must be KEY=VALUE, got {item!r}")
        labels[key.strip()] = value.strip()
    return labels


def agent_config_from(args: argparse.Namespace) -> AgentConfig:
    if args.fake_nvml is not None and args.fake_nvml not in SCENARIOS:
        raise ConfigError(f"unknown scenario {args.fake_nvml!r}; known: {', '.join(SCENARIOS)}")
    return AgentConfig(
        run=run_settings_from(args),
        node=args.node or "",
        node_labels=_parse_labels(args.node_label or []),
        fake_scenario=args.fake_nvml,
        proc_root=args.proc_root,
        log_level=args.log_level,
    )


def build_sampler(config: AgentConfig, metrics_registry: CollectorRegistry) -> DeviceSampler:
    """The sampler over the real pynvml, or over the fake NVML of the configured scenario."""
    node = config.node or socket.gethostname()
    labels = dict(config.node_labels)
    if config.fake_scenario is not None:
        from agents.fake_nvml import FakeNvml
        from agents.scenario_views import cgroup_reader

        # Start the simulation back in time so its workloads are already running (the faults
        # scenario only 20 s back, so its GPU loss and driver restart are still to come).
        lead_s = 20.0 if config.fake_scenario == "faults" else 120.0
        scenario = SCENARIOS[config.fake_scenario](time.time() - lead_s)
        names = [n.name for n in scenario.nodes]
        node = config.node if config.node in names else names[0]
        labels = {**scenario.node(node).labels, **labels}
        nvml: Any = FakeNvml(scenario, node, time.time)
        reader: Any = cgroup_reader(scenario)
    else:
        import pynvml

        nvml = pynvml
        reader = ProcCgroupReader(config.proc_root)
    metrics = AgentMetrics(metrics_registry, config.run.cluster, node)
    settings = SamplerSettings(
        cluster=config.run.cluster, node=node, interval_s=config.run.interval_s, node_labels=labels
    )
    return DeviceSampler(
        nvml,
        settings,
        metrics,
        cgroup_reader=reader,
        wall_clock=time.time,
        monotonic_clock=time.monotonic,
    )


async def run_agent(config: AgentConfig, registry: CollectorRegistry | None = None) -> int:
    registry = registry or CollectorRegistry()
    sampler = build_sampler(config, registry)
    publisher = make_publisher(config.run, GPU_SAMPLES_TOPIC, sampler.metrics.buffer)
    offload = config.fake_scenario is None  # real NVML calls block: keep them off the loop
    stale_after_s = max(10.0, 5 * config.run.interval_s)
    last_ok = [time.monotonic()]

    async def one_pass() -> None:
        events = await asyncio.to_thread(sampler.sample) if offload else sampler.sample()
        if events:
            last_ok[0] = time.monotonic()
        for event in events:
            publisher.publish(GPU_SAMPLES_TOPIC, event.data.device_uuid, event)

    def health() -> tuple[bool, str]:
        age = time.monotonic() - last_ok[0]
        if not sampler.healthy:
            return False, sampler.last_error or "NVML not initialised"
        if age > stale_after_s:
            return False, f"no sample for {age:.0f} s"
        return True, f"ok: {len(sampler.devices or ())} devices"

    try:
        return await run_producer(config.run, registry, publisher, health, one_pass)
    finally:
        sampler.close()


def main(config: AgentConfig) -> int:
    configure_logging(config.log_level)
    try:
        return asyncio.run(run_agent(config))
    except GpuledgerError as exc:
        print(f"gpuledger agent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # `python -m agents.agent_cli ...`: the agent alone, fewer imports
    import os

    from runtime.options import gpuledger_env

    _env = gpuledger_env(os.environ)
    _parser = argparse.ArgumentParser(prog="gpuledger")
    register(_parser.add_subparsers(dest="command"), _env)
    _args = _parser.parse_args()
    sys.exit(int(_args.handler(_args)))

"""`gpuledger agent` end to end on the fake NVML: dry-run output, /metrics and /healthz."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

import aiohttp
import orjson
import pytest

from agents import agent_cli
from runtime.errors import ConfigError
from schemas.events import Ok, decode_event


def _parse(argv: list[str], env: dict[str, str] | None = None) -> agent_cli.AgentConfig:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    agent_cli.register(sub, env or {})
    return agent_cli.agent_config_from(parser.parse_args(["agent", *argv]))


def test_flags_and_environment_build_the_config() -> None:
    env = {
        "GPULEDGER_CLUSTER": "prod",
        "GPULEDGER_NODE_LABELS": "a=1,b=2",
        "GPULEDGER_KAFKA_BOOTSTRAP": "k:9092",
    }
    config = _parse(["--node", "n7", "--interval", "2"], env)
    assert (config.run.cluster, config.node, config.run.interval_s) == ("prod", "n7", 2.0)
    assert config.node_labels == {"a": "1", "b": "2"}
    assert config.run.kafka is not None and config.run.kafka.bootstrap == "k:9092"
    assert config.run.metrics_port == 9109
    assert config.fake_scenario is None
    assert _parse(["--fake-nvml"]).fake_scenario == "demo"
    assert _parse(["--fake-nvml", "bench", "--dry-run"]).run.kafka is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--interval", "0"],
        ["--fake-nvml", "nope"],
        ["--node-label", "novalue"],
        ["--count", "0"],
        ["--cluster", "c" * 254],  # every event would be refused as too long
        ["--node", "n" * 254],
    ],
)
def test_bad_flags_are_config_errors(argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        _parse(argv)


async def test_dry_run_prints_valid_sample_events() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gpuledger.cli",
        "agent",
        "--fake-nvml",
        "--dry-run",
        "--count",
        "3",
        "--interval",
        "0.2",
        "--node",
        "gpu-node-1",
        "--metrics-port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = out.splitlines()
    assert len(lines) == 3 * 7  # three passes over 4 MIG instances and 3 whole GPUs
    decoded = [decode_event(line) for line in lines]
    assert all(isinstance(d, Ok) for d in decoded)
    ids = [orjson.loads(line)["id"] for line in lines]
    assert len(set(ids)) == len(ids)
    last = [orjson.loads(line)["data"] for line in lines[-7:]]
    assert all(0.15 < d["interval_s"] < 1.0 for d in last)  # real elapsed, ~0.2 s
    assert any(p["pod_uid"] for d in last for p in d["processes"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_metrics_and_health_endpoints() -> None:
    port = _free_port()
    config = _parse(
        [
            "--fake-nvml",
            "--dry-run",
            "--duration",
            "2.5",
            "--interval",
            "0.25",
            "--metrics-port",
            str(port),
            "--metrics-host",
            "127.0.0.1",
            "--node",
            "gpu-node-2",
            "--cluster",
            "c9",
        ]
    )
    run = asyncio.create_task(agent_cli.run_agent(config))
    await asyncio.sleep(1.0)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            text = await response.text()
        async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
            health = (response.status, await response.text())
    assert await run == 0
    assert 'gpuledger_agent_samples_total{cluster="c9",node="gpu-node-2"}' in text
    assert 'gpuledger_agent_last_sample_timestamp_seconds{cluster="c9",node="gpu-node-2"}' in text
    assert "gpuledger_agent_process_util_unsupported{" in text
    assert "gpuledger_agent_buffer_events{" in text
    assert health[0] == 200 and "6 devices" in health[1]

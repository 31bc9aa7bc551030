"""docker-compose.yml, checked by a real Compose parser (`docker-compose config`, which needs no
engine) and then for what the stack promises: pinned images, health checks, named volumes, no
secrets in the file, Prometheus scraping what runs, gpuledger commands the CLI accepts."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_tools import (
    CLICKHOUSE_PASSWORD_KEYS,
    PASSWORD_NOT_READ,
    REPO,
    read_by_code,
    require,
)

from gpuledger.cli import build_parser

COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
# The installed packages, as pyproject.toml lists them ("agents*" -> "agents").
PACKAGES = [
    name.rstrip("*")
    for name in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
]
GPULEDGER_PORTS = {"worker": 9108, "agent": 9109, "pods": 9110, "tokens": 9111}
SECRET_KEYS = re.compile(r"PASSWORD|SECRET|TOKEN", re.IGNORECASE)


def compose_config(
    *extra: str, env_file: Path = ENV_EXAMPLE, environ: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    tool = require("docker-compose", "apt-get install docker-compose")
    base_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(
        [tool, "-f", str(COMPOSE), "--env-file", str(env_file), *extra, "config"],
        cwd=REPO,
        env=base_env | (environ or {}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    result = compose_config("--profile", "kubernetes")
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = yaml.safe_load(result.stdout)
    return parsed


def gpuledger_services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in config["services"].items() if "build" in s}


def test_the_stack_has_every_part(config: dict[str, Any]) -> None:
    services = config["services"]
    assert {"kafka", "clickhouse", "grafana", "prometheus", "worker", "pods", "tokens"} <= set(
        services
    )
    commands = {n: s["command"][0] for n, s in gpuledger_services(config).items()}
    assert sorted(set(commands.values())) == ["agent", "pods", "tokens", "worker"]
    simulated = [n for n, s in gpuledger_services(config).items() if "--fake-nvml" in s["command"]]
    assert len(simulated) >= 2, "simulated agents, so the stack shows data without GPUs"
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"], "KRaft, no ZooKeeper"
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    plugins = services["grafana"]["environment"]["GF_PLUGINS_PREINSTALL_SYNC"]
    assert re.fullmatch(r"grafana-clickhouse-datasource@\d+\.\d+\.\d+", plugins)


def test_images_pinned_health_checked_and_volumes_named(config: dict[str, Any]) -> None:
    for name, service in config["services"].items():
        assert "healthcheck" in service and service["healthcheck"]["test"], name
        image = service["image"]
        if "build" in service:
            assert Path(service["build"]["context"]) == REPO
            assert service["build"]["dockerfile"] == "deploy/docker/Dockerfile"
            continue
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and re.match(r"v?\d+\.\d+", tag), image
    declared = set(config["volumes"])
    used = set()
    for service in config["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source and not source.startswith(("/", ".", "~")):
                used.add(source)
    assert used == declared and {"kafka-data", "clickhouse-data", "grafana-data"} <= declared
    for name in ("kafka", "clickhouse", "prometheus", "grafana"):
        mounts = config["services"][name]["volumes"]
        assert any(not str(m).startswith("/") for m in mounts), f"{name} keeps no named volume"


def test_host_ports_bind_to_loopback_only(config: dict[str, Any]) -> None:
    for name, service in config["services"].items():
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else port.split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond this machine"


def test_no_secret_in_the_file() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    services = raw["services"]
    for name, service in services.items():
        env = service.get("environment") or {}
        for key, value in env.items():
            if SECRET_KEYS.search(key) and not key.endswith("_FILE"):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{name}.{key} = {value}"
    # Without the .env values the parser refuses the file and names what is missing.
    empty = REPO / ".cache" / "empty.env"
    empty.parent.mkdir(exist_ok=True)
    empty.write_text("")
    result = compose_config(env_file=empty)
    assert result.returncode != 0
    assert "PASSWORD" in result.stderr and ".env.example" in result.stderr


def test_env_example_documents_every_variable_and_holds_placeholders() -> None:
    text = COMPOSE.read_text()
    used = set(re.findall(r"\$\{(\w+)", text)) - {"HOME"}
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    missing = used - set(example) - {"GPULEDGER_KUBECONFIG_FILE", "GPULEDGER_LOG_LEVEL"}
    assert not missing, f".env.example does not mention {missing}"
    assert "GPULEDGER_KUBECONFIG_FILE" in ENV_EXAMPLE.read_text()
    for key, value in example.items():
        if SECRET_KEYS.search(key):
            assert value.startswith("CHANGE-ME"), f"{key} in .env.example looks like a real secret"


def test_gpuledger_commands_parse_with_the_real_cli(config: dict[str, Any]) -> None:
    for name, service in gpuledger_services(config).items():
        env = {k: str(v) for k, v in service["environment"].items()}
        args = build_parser(env).parse_args(service["command"])
        assert getattr(args, "handler", None) is not None, name
        assert env["GPULEDGER_KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert env["GPULEDGER_CLICKHOUSE_DSN"].startswith("http://")
        assert "@clickhouse:8123/gpuledger" in env["GPULEDGER_CLICKHOUSE_DSN"]
        port = GPULEDGER_PORTS[service["command"][0]]
        assert f"127.0.0.1:{port}/healthz" in " ".join(service["healthcheck"]["test"]), name
    worker = config["services"]["worker"]["environment"]
    assert worker["GPULEDGER_HTTP_HOST"] == "0.0.0.0", "Prometheus scrapes from another container"


def test_every_gpuledger_variable_is_read_by_the_code(config: dict[str, Any]) -> None:
    for service in gpuledger_services(config).values():
        for key in service["environment"]:
            if key.startswith("GPULEDGER_") and key not in CLICKHOUSE_PASSWORD_KEYS:
                assert read_by_code(key), f"{key} is set in compose but no code reads it"


@PASSWORD_NOT_READ
def test_the_clickhouse_password_variable_is_read_by_the_code(config: dict[str, Any]) -> None:
    for service in gpuledger_services(config).values():
        for key in service["environment"]:
            if key in CLICKHOUSE_PASSWORD_KEYS:
                assert read_by_code(key), f"{key} is set in compose but no code reads it"


def test_prometheus_scrapes_every_gpuledger_service(config: dict[str, Any]) -> None:
    prom = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {
        t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    for name, service in gpuledger_services(config).items():
        port = GPULEDGER_PORTS[service["command"][0]]
        assert f"{name}:{port}" in targets, f"Prometheus does not scrape {name}"
    mounts = config["services"]["prometheus"]["volumes"]
    assert any(str(m).endswith(":/etc/prometheus/rules:ro") for m in mounts)


def test_dockerfile_installs_the_project_as_a_non_root_user() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", text, re.MULTILINE)
    assert stages == [("python:3.11-slim", "build"), ("python:3.11-slim", "")]
    build, image = text.split("\nFROM python:3.11-slim\n")
    # The wheel is built in the first stage, then installed; every package goes into it.
    assert "pip wheel --no-deps --wheel-dir /wheels ." in build
    assert "pip install /tmp/wheels/gpuledger-*.whl" in image
    copied_packages = set(re.findall(r"^COPY (\S+)/ ", build, re.MULTILINE))
    assert copied_packages == set(PACKAGES), copied_packages
    user = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert user and not user[-1].startswith(("0", "root"))
    assert 'ENTRYPOINT ["gpuledger"]' in text
    for copied in re.findall(r"^COPY (\S+)/ ", text, re.MULTILINE):
        assert (REPO / copied).is_dir(), copied
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[1:2] == ["*"] or "*" in ignore, "the build context sends only what it needs"


def test_clickhouse_init_script_is_valid_bash() -> None:
    script = REPO / "deploy" / "clickhouse" / "initdb" / "10-grafana-reader.sh"
    result = subprocess.run(
        ["bash", "-n", str(script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "GRANT SELECT ON gpuledger.*" in script.read_text()


def test_the_worker_exposes_metrics_and_health_but_never_costs(config: dict[str, Any]) -> None:
    """Prometheus reaches /metrics from its container and the host reaches 127.0.0.1:9108;
    the worker writes to the ClickHouse server, so it serves no reports, and has them off."""
    from urllib.parse import urlsplit

    from streams.worker.http import reads_listener
    from streams.worker_cli import read_settings_from

    service = config["services"]["worker"]
    env = {k: str(v) for k, v in service["environment"].items()}
    args = build_parser(env).parse_args(service["command"])
    assert urlsplit(args.clickhouse).scheme == "http"
    reads = read_settings_from(args)
    assert reads_listener(False, args.http_host, reads) is None
    assert reads_listener(True, args.http_host, reads) is None
    # `docker-compose config` keeps the short form, HOST_IP:PUBLISHED:TARGET/PROTOCOL
    assert service["ports"] == ["127.0.0.1:9108:9108/tcp"], "on the host's loopback alone"

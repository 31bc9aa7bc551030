"""No ClickHouse password in anything gpuledger prints: the failing `report`, `export` and
`worker` paths run for real in subprocesses, with the password in every place a DSN can hold
it, and all of their stdout and stderr (the worker's logs at DEBUG included) is searched."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECRET = "Passw0rd"
pytestmark = pytest.mark.slow


def closed_port() -> int:
    """A local port nothing listens on: connections to it are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


PORT = closed_port()
# Every form a DSN can carry a password in, each as someone would type it.
LEAKY_DSNS = [
    f"gpuledger:{SECRET}@127.0.0.1:{PORT}",  # no scheme
    f"gpuledger:{SECRET}@127.0.0.1:{PORT}/gpuledger",
    f"http://gpuledger:{SECRET}@127.0.0.1:{PORT}/gpuledger",
    f"http://gpuledger@127.0.0.1:{PORT}/gpuledger?password={SECRET}",
    f"https://127.0.0.1:{PORT}/gpuledger?user=gpuledger&password={SECRET}&secure=1",
    f"http://127.0.0.1:{PORT}/gpuledger?access_token={SECRET}",
    f"clickhouse://gpuledger:{SECRET}@127.0.0.1:{PORT}/gpuledger",
    f"http://gpuledger:{SECRET}@127.0.0.1:{PORT}/bad-name!",
]


def gpuledger(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GPULEDGER_")}
    return subprocess.run(
        [sys.executable, "-m", "gpuledger.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean, **(env or {})},
        timeout=120,
        check=False,
    )


def assert_no_secret(result: subprocess.CompletedProcess[str]) -> None:
    printed = result.stdout + result.stderr
    assert result.returncode != 0, printed  # each of these must fail, and say why
    assert printed.strip(), "a failure must say something"
    assert SECRET not in printed, printed
    assert SECRET.lower() not in printed.lower(), printed


@pytest.mark.parametrize("dsn", LEAKY_DSNS)
def test_report_cli_errors_never_print_the_clickhouse_password(dsn: str) -> None:
    assert_no_secret(gpuledger("report", "showback", "--clickhouse", dsn))


@pytest.mark.parametrize("dsn", LEAKY_DSNS[:4])
def test_export_cli_errors_never_print_the_clickhouse_password(dsn: str) -> None:
    assert_no_secret(gpuledger("export", "chargeback", "--clickhouse", dsn, "--period", "2026-11"))


@pytest.mark.parametrize("dsn", LEAKY_DSNS)
def test_worker_errors_and_logs_never_print_the_clickhouse_password(dsn: str) -> None:
    result = gpuledger(
        "worker",
        "--kafka",
        f"127.0.0.1:{PORT}",
        "--clickhouse",
        dsn,
        "--metrics-port",
        "0",
        "--log-level",
        "DEBUG",
    )
    assert_no_secret(result)


def test_the_password_from_the_environment_is_never_printed_either() -> None:
    env = {
        "GPULEDGER_CLICKHOUSE_DSN": f"http://gpuledger@127.0.0.1:{PORT}/gpuledger",
        "GPULEDGER_CLICKHOUSE_PASSWORD": SECRET,
    }
    assert_no_secret(gpuledger("report", "tags", env=env))
    assert_no_secret(
        gpuledger("worker", "--kafka", f"127.0.0.1:{PORT}", "--log-level", "DEBUG", env=env)
    )

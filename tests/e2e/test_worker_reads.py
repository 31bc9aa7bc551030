"""`gpuledger worker` on an embedded store, run for real: exposing /metrics beyond loopback
exposes no costs; the reads stay on 127.0.0.1, where the owner file says they are."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            code: int = response.status
            return code
    except urllib.error.HTTPError as exc:
        return exc.code


def test_an_embedded_worker_on_all_addresses_serves_reports_on_loopback_only(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    folder = tmp_path / "data"
    metrics_port, reads_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPULEDGER_")}
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpuledger.cli",
            "worker",
            "--kafka",
            kafka_bootstrap,
            "--clickhouse",
            f"chdb://{folder}",
            "--group-id",
            f"reads-{metrics_port}",
            "--http-host",
            "0.0.0.0",
            "--metrics-port",
            str(metrics_port),
            "--reports-port",
            str(reads_port),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    owner_file = folder / ".gpuledger-owner.json"
    try:
        deadline = time.monotonic() + 90
        while not owner_file.exists():
            assert worker.poll() is None, worker.communicate()[0]
            assert time.monotonic() < deadline, "the worker wrote no owner file"
            time.sleep(0.2)
        owner = json.loads(owner_file.read_text(encoding="utf-8"))
        assert owner["url"] == f"http://127.0.0.1:{reads_port}"
        assert owner["metrics_url"] == f"http://0.0.0.0:{metrics_port}"
        exposed = f"http://127.0.0.1:{metrics_port}"
        assert status_of(f"{exposed}/metrics") == 200
        for path in ("/report/showback", "/export/chargeback?period=2026-11", "/"):
            assert status_of(exposed + path) == 404, path
        assert status_of(f"{owner['url']}/report/showback?format=json") == 200
        assert status_of(f"{owner['url']}/metrics") == 404
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            output = worker.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            worker.kill()
            output = worker.communicate()[0]
    assert worker.returncode == 0, output
    assert not owner_file.exists(), "a stopped worker removes its owner file"

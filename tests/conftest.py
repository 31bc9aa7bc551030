"""Shared pytest fixtures for gpuledger's test tiers.

Kafka: one real broker per test session (tests/kafka_broker.py), or the broker named by
GPULEDGER_TEST_KAFKA="host:port". Tests that use it are marked `kafka`.
Kubernetes: one real kube-apiserver + etcd per test session (tests/kube_apiserver.py), built by
.ci/build-kubernetes when missing. Tests that use it are marked `kube`.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from chdb_folder import chdb_folder
from kafka_broker import DEFAULT_LIBS_DIR, KAFKA_VERSION, KafkaBroker, fetch_kafka_libs
from kube_apiserver import KubeApiServer, build_binaries

from streams.store import ClickHouseStore

# --- Kafka -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """The "host:port" of a real Kafka broker, shared by the whole session."""
    external = os.environ.get("GPULEDGER_TEST_KAFKA")
    if external:
        yield external
        return
    if not (DEFAULT_LIBS_DIR / f"kafka_2.13-{KAFKA_VERSION}.jar").exists():
        fetch_kafka_libs()
    with KafkaBroker(DEFAULT_LIBS_DIR) as broker:
        yield broker.bootstrap


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> str:
    """A topic name no other test (or earlier run against the same broker) uses."""
    test_name = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:100]
    return f"test.{test_name}.{uuid.uuid4().hex[:12]}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kube: needs the real kube-apiserver of the test harness")
    config.addinivalue_line(
        "markers", "deploy: under tests/deploy (kustomize, promtool, the manifests' tools)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Any test that needs the broker is a kafka test, so `-m "not kafka"` skips them all;
    # likewise `kube` for the API server; `deploy` for the tests of deploy/ (.ci/test runs
    # `kube or deploy` once .ci/build-kubernetes, started beside the other tests, is done).
    deploy = Path(__file__).parent / "deploy"
    for item in items:
        if deploy in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.deploy)
        if "kafka_bootstrap" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kafka)
        if "kube_apiserver" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kube)


# --- Kubernetes (a real kube-apiserver and etcd; no kubelet, no controllers) --------------------


@pytest.fixture(scope="session")
def kube_apiserver() -> Iterator[KubeApiServer]:
    """A real kube-apiserver (its admin kubeconfig: `.kubeconfig`), shared by the session."""
    # The build script returns at once when its pinned build is there.
    with KubeApiServer(build_binaries()) as server:
        yield server


# --- ClickHouse (embedded chDB: the real engine, in-process) -----------------------------------
# chDB opens one data folder per process, so the whole session shares one folder and each test
# gets a database of its own.


@pytest.fixture(scope="session")
def chdb_dsn() -> str:
    return f"chdb://{chdb_folder()}"


@contextlib.contextmanager
def fresh_store(chdb_dsn: str) -> Iterator[ClickHouseStore]:
    """A ClickHouseStore on a fresh database with the gpuledger schema created, dropped after."""
    database = f"t_{uuid.uuid4().hex[:12]}"
    ch = ClickHouseStore(chdb_dsn, database=database)
    ch.create_schema()
    try:
        yield ch
    finally:
        ch.command(f"DROP DATABASE IF EXISTS {database}")
        ch.close()


@pytest.fixture
def store(chdb_dsn: str) -> Iterator[ClickHouseStore]:
    """A ClickHouseStore on a fresh database with the gpuledger schema created."""
    with fresh_store(chdb_dsn) as ch:
        yield ch


@pytest.fixture
def second_store(chdb_dsn: str) -> Iterator[ClickHouseStore]:
    """Another fresh database beside `store`, e.g. for a replay to compare with a live run."""
    with fresh_store(chdb_dsn) as ch:
        yield ch

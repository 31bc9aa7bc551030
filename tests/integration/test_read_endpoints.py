"""The worker's read endpoints (`/report/...`, `/export/...`, `/`) on the real engine: served
only where the worker owns an embedded store, on loopback unless asked otherwise, on a
read-only connection of their own, within a time limit and a concurrency limit."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from test_reports_data import cluster_rows

from runtime.errors import StoreError
from runtime.kafka import KafkaSettings
from streams.store import OWNER_FILE, ClickHouseStore
from streams.worker import http as http_module
from streams.worker.http import HttpEndpoint, ReadSettings

SPAN = "from=2026-11-01&to=2026-11-02"
ReportHandler = Callable[[ClickHouseStore, str, Mapping[str, str]], tuple[int, str, bytes]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class ServedWorker:
    """What the endpoint reads of a worker, around a real store."""

    def __init__(self, store: ClickHouseStore) -> None:
        self.registry = CollectorRegistry()
        self.store = store
        self.stopping = asyncio.Event()
        self.open_windows = 0

    def unhealthy_sinks(self) -> dict[str, dict[str, Any]]:
        return {}


@pytest.fixture
def costs(store: ClickHouseStore) -> Iterator[ClickHouseStore]:
    store.insert_rows(cluster_rows(hours=2))
    yield store


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


class SlowReport:
    """A report handler that holds its connection `seconds` in one query, and records when it
    started and finished."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = threading.Event()
        self.finished_at: float | None = None
        self.store: ClickHouseStore | None = None

    def __call__(
        self, store: ClickHouseStore, path: str, query: Mapping[str, str]
    ) -> tuple[int, str, bytes]:
        self.store = store
        self.started.set()
        try:
            store.query_rows(f"SELECT sleep({self.seconds})")
        except StoreError as exc:  # as streams.reports.http answers a store failure
            return 503, "text/plain", f"{exc}\n".encode()
        finally:
            self.finished_at = time.monotonic()
        return 200, "text/plain", b"slow\n"


def use_handler(monkeypatch: pytest.MonkeyPatch, handler: ReportHandler) -> None:
    monkeypatch.setattr(http_module, "_report_handler", lambda: handler)


async def test_with_a_clickhouse_server_the_worker_serves_no_costs_only_metrics_and_health(
    costs: ClickHouseStore,
) -> None:
    costs.embedded = False  # this store stands for a ClickHouse server's
    endpoint = HttpEndpoint(ServedWorker(costs), "127.0.0.1", free_port())  # type: ignore[arg-type]
    await endpoint.start()
    try:
        assert (await get(f"{endpoint.url}/metrics"))[0] == 200
        assert (await get(f"{endpoint.url}/healthz"))[0] == 200
        for path in (f"/report/showback?{SPAN}", "/export/chargeback?period=2026-11", "/"):
            status, text = await get(endpoint.url + path)
            assert status == 404, (path, text[:200])
            assert text.count("\n") == 1 and "gpuledger report" in text and "Grafana" in text
            assert "team" not in text
        assert endpoint.reads_url is None
    finally:
        await endpoint.stop()


async def test_an_embedded_worker_on_loopback_serves_reads_on_its_one_listener(
    costs: ClickHouseStore,
) -> None:
    endpoint = HttpEndpoint(ServedWorker(costs), "127.0.0.1", free_port())  # type: ignore[arg-type]
    await endpoint.start()
    try:
        assert endpoint.reads_url == endpoint.url
        status, text = await get(f"{endpoint.url}/report/showback?{SPAN}&format=json")
        assert status == 200 and json.loads(text)["lines"]
        status, text = await get(f"{endpoint.url}/?{SPAN}")
        assert status == 200 and "<html" in text.lower()  # the live dashboard
        assert (await get(f"{endpoint.url}/metrics"))[0] == 200
    finally:
        await endpoint.stop()


async def test_an_embedded_worker_exposed_beyond_loopback_keeps_reads_on_loopback(
    costs: ClickHouseStore,
) -> None:
    metrics_port, reads_port = free_port(), free_port()
    endpoint = HttpEndpoint(
        ServedWorker(costs),  # type: ignore[arg-type]
        "0.0.0.0",
        metrics_port,
        reads=ReadSettings(host="127.0.0.1", port=reads_port),
    )
    await endpoint.start()
    try:
        assert endpoint.reads_url == f"http://127.0.0.1:{reads_port}"
        exposed = f"http://127.0.0.1:{metrics_port}"
        assert (await get(f"{exposed}/metrics"))[0] == 200
        for path in (f"/report/showback?{SPAN}", "/export/chargeback?period=2026-11", "/"):
            status, text = await get(exposed + path)
            assert status == 404 and text.count("\n") == 1, (path, text[:200])
        status, text = await get(f"{endpoint.reads_url}/report/showback?{SPAN}&format=json")
        assert status == 200 and json.loads(text)["lines"]
        assert (await get(f"{endpoint.reads_url}/metrics"))[0] == 404
        # the reads listener is bound to loopback alone
        lan = _non_loopback_address()
        if lan is not None:
            with pytest.raises(OSError), socket.create_connection((lan, reads_port), timeout=2):
                pass
    finally:
        await endpoint.stop()


async def test_an_insert_proceeds_while_a_slow_report_is_in_flight(
    costs: ClickHouseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = SlowReport(2.0)
    use_handler(monkeypatch, slow)
    endpoint = HttpEndpoint(ServedWorker(costs), "127.0.0.1", free_port())  # type: ignore[arg-type]
    await endpoint.start()
    try:
        read = asyncio.create_task(get(f"{endpoint.url}/report/slow"))
        assert await asyncio.to_thread(slow.started.wait, 30)
        inserted_at: list[float] = []

        def insert() -> None:
            costs.insert_rows(cluster_rows(hours=1, start_ms=1_793_577_600_000))
            inserted_at.append(time.monotonic())

        await asyncio.to_thread(insert)
        status, _ = await read
        assert status == 200
        assert slow.finished_at is not None and inserted_at[0] < slow.finished_at
        assert slow.store is not costs  # the read ran on a connection of its own
        assert slow.store is not None and slow.store.read_only
    finally:
        await endpoint.stop()


async def test_the_read_connection_refuses_writes(costs: ClickHouseStore) -> None:
    reader = costs.reader()
    try:
        with pytest.raises(StoreError, match="readonly"):
            reader.command(f"DROP TABLE {costs.database}.gpu_cost_windows")
        assert reader.query_rows(f"SELECT count() FROM {costs.database}.gpu_cost_windows")
    finally:
        reader.close()


async def test_a_report_past_its_time_limit_gets_504_naming_the_limit(
    costs: ClickHouseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = SlowReport(3.0)
    use_handler(monkeypatch, slow)
    endpoint = HttpEndpoint(
        ServedWorker(costs),  # type: ignore[arg-type]
        "127.0.0.1",
        free_port(),
        reads=ReadSettings(timeout_s=0.5),
    )
    await endpoint.start()
    try:
        started = time.monotonic()
        status, text = await get(f"{endpoint.url}/report/slow")
        took_s = time.monotonic() - started
        assert status == 504, text
        assert text.count("\n") == 1 and "0.5 s" in text and "--report-timeout-s" in text
        assert took_s < 2.9  # ClickHouse stopped the query; it did not run its 3 s
    finally:
        await endpoint.stop()


async def test_reports_over_the_concurrency_limit_get_429_with_one_line(
    costs: ClickHouseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = SlowReport(1.5)
    use_handler(monkeypatch, slow)
    endpoint = HttpEndpoint(
        ServedWorker(costs),  # type: ignore[arg-type]
        "127.0.0.1",
        free_port(),
        reads=ReadSettings(concurrency=1),
    )
    await endpoint.start()
    try:
        first = asyncio.create_task(get(f"{endpoint.url}/report/slow"))
        assert await asyncio.to_thread(slow.started.wait, 30)
        status, text = await get(f"{endpoint.url}/report/slow")
        assert status == 429 and text.count("\n") == 1 and "--report-concurrency" in text
        assert (await get(f"{endpoint.url}/healthz"))[0] == 200  # health is never limited
        assert (await first)[0] == 200
        assert (await get(f"{endpoint.url}/report/slow"))[0] == 200
    finally:
        await endpoint.stop()


@pytest.mark.parametrize("reads_port", [None, 0])
async def test_the_owner_file_names_where_reads_are_served(
    costs: ClickHouseStore, reads_port: int | None
) -> None:
    """`gpuledger report` on a held folder points at the owner file's `url`: the reads
    listener, not the exposed metrics one; no `url` when the worker serves no reads."""
    from streams.pricing import EXAMPLE_PRICE_BOOK, load_price_book
    from streams.worker.app import Worker, WorkerConfig

    config = WorkerConfig(kafka=KafkaSettings(bootstrap="127.0.0.1:1"), clickhouse_dsn=costs.dsn)
    worker = Worker(config, load_price_book(EXAMPLE_PRICE_BOOK), store=costs)
    port = reads_port if reads_port is not None else free_port()
    worker.http = HttpEndpoint(worker, "0.0.0.0", free_port(), reads=ReadSettings(port=port))
    await worker.http.start()
    owner_file = Path(urlsplit(costs.dsn).path) / OWNER_FILE
    try:
        worker._write_owner_file()
        owner = json.loads(owner_file.read_text(encoding="utf-8"))
        assert owner["pid"] == os.getpid() and owner["metrics_url"] == worker.http.url
        if reads_port is None:
            assert owner["url"] == worker.http.reads_url == f"http://127.0.0.1:{port}"
        else:
            assert "url" not in owner and worker.http.reads_url is None
    finally:
        worker._remove_owner_file()
        await worker.http.stop()
    assert not owner_file.exists()


def _non_loopback_address() -> str | None:
    """An address of this host other than loopback, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
            address: str = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address

"""The worker's HTTP endpoints: `/metrics` and `/healthz`, and, where the worker owns an
embedded store, the reads (`/report/...`, `/export/...`, the live dashboard `/`).

With a ClickHouse server anyone with access reads ClickHouse itself, so the worker serves no
costs: its read paths answer 404. With an embedded store the worker is the only process that
may open the folder, so it serves the reads, on loopback unless asked otherwise: on its one
listener when that is a loopback address, else on a listener of their own
(`ReadSettings.host`/`port`, default 127.0.0.1:9112), so that exposing `/metrics` to
Prometheus never exposes costs. Reads run on read-only connections of their own (one per
concurrent read), never on the writer's, each within a time limit; reads beyond the
concurrency limit are refused at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import ipaddress
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from runtime.errors import GpuledgerError
from streams.store import ClickHouseStore

log = logging.getLogger("gpuledger.worker.http")

TEXT = "text/plain; charset=utf-8"
READ_PATHS = ("/report/{name}", "/export/{name}", "/")
# Past its limit a read's queries are stopped by ClickHouse; this much longer, the answer
# goes out whatever the thread still does (its connection stays taken until it ends).
TIMEOUT_GRACE_S = 1.0
NO_READS_IN_SERVER_MODE = (
    "this worker writes to a ClickHouse server and serves no reports: read them from "
    "ClickHouse, Grafana or `gpuledger report --clickhouse http://...`\n"
)
NO_READS_HERE = (
    "reports are not served on this address: with --http-host beyond loopback they have a "
    "listener of their own (--reports-host, --reports-port)\n"
)

ReportHandler = Callable[[ClickHouseStore, str, Mapping[str, str]], tuple[int, str, bytes]]


@dataclass(frozen=True, slots=True)
class ReadSettings:
    """Where and how an embedded worker serves reads. `host`/`port` are used only when the
    metrics listener is not on a loopback address (port 0: no reads then)."""

    host: str = "127.0.0.1"
    port: int = 9112
    timeout_s: float = 30.0
    concurrency: int = 2


class Served(Protocol):
    """What the endpoint reads of the worker it serves."""

    @property
    def registry(self) -> CollectorRegistry: ...
    @property
    def store(self) -> ClickHouseStore: ...
    @property
    def stopping(self) -> asyncio.Event: ...
    @property
    def open_windows(self) -> int: ...
    def unhealthy_sinks(self) -> dict[str, dict[str, Any]]: ...


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def reads_listener(embedded: bool, http_host: str, reads: ReadSettings) -> str | None:
    """Where reads are served: "main" (the metrics listener, on loopback), "own" (their own
    listener, `reads.host`:`reads.port`), or None (a ClickHouse server's worker, or a reads
    port of 0)."""
    if not embedded:
        return None
    if is_loopback(http_host):
        return "main"
    return "own" if reads.port else None


class HttpEndpoint:
    def __init__(
        self, worker: Served, host: str, port: int, *, reads: ReadSettings | None = None
    ) -> None:
        self.worker = worker
        self.host = host
        self.port = port
        self.reads = reads or ReadSettings()
        if self.reads.timeout_s <= 0 or self.reads.concurrency < 1:
            raise GpuledgerError("the report time limit and concurrency must be positive")
        self._runners: list[web.AppRunner] = []
        self._readers: asyncio.Queue[ClickHouseStore] = asyncio.Queue()
        self._opened: list[ClickHouseStore] = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._reads_on: str | None = None  # "main", "own" or None (no reads)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def reads_url(self) -> str | None:
        """Where reads are served (what the owner file names), or None."""
        if self._reads_on == "main":
            return self.url
        if self._reads_on == "own":
            return f"http://{self.reads.host}:{self.reads.port}"
        return None

    async def start(self) -> None:
        self._reads_on = reads_listener(self.worker.store.embedded, self.host, self.reads)
        if self._reads_on == "own" and self.reads.port == self.port:
            raise GpuledgerError(
                f"--reports-port {self.reads.port} is the metrics port: reads need a listener "
                "of their own when --http-host is not a loopback address"
            )
        if self._reads_on is not None:
            await self._open_readers()
        main = web.Application()
        main.router.add_get("/metrics", self._metrics)
        main.router.add_get("/healthz", self._healthz)
        refusal = NO_READS_IN_SERVER_MODE if not self.worker.store.embedded else NO_READS_HERE
        self._add_reads(main, None if self._reads_on == "main" else refusal)
        await self._serve(main, self.host, self.port)
        if self._reads_on == "own":
            own = web.Application()
            self._add_reads(own, None)
            await self._serve(own, self.reads.host, self.reads.port)

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        for reader in self._opened:
            reader.close()
        self._opened.clear()

    async def _open_readers(self) -> None:
        """One read-only connection per concurrent read, and threads of their own for them,
        so that reads take neither the writer's connection nor the threads its sinks use."""
        for _ in range(self.reads.concurrency):
            reader = await asyncio.to_thread(self.worker.store.reader)
            self._opened.append(reader)
            self._readers.put_nowait(reader)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self.reads.concurrency, thread_name_prefix="gpuledger-reads"
        )

    def _add_reads(self, app: web.Application, refusal: str | None) -> None:
        if refusal is None:
            app.router.add_get("/report/{name}", self._report)
            app.router.add_get("/export/{name}", self._report)
            app.router.add_get("/", self._dashboard)
            return

        async def refuse(_: web.Request) -> web.Response:
            return web.Response(status=404, text=refusal, content_type="text/plain")

        for path in READ_PATHS:
            app.router.add_get(path, refuse)

    async def _serve(self, app: web.Application, host: str, port: int) -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, host, port).start()

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self.worker.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        """200 `{"status": "ok", "open_windows": n}`; 503 while stopping, or once a sink has
        failed its threshold of times in a row: `"status": "unhealthy"`, a `reason` and, per
        failing sink, its consecutive failures, last error and since when."""
        if self.worker.stopping.is_set():
            return web.json_response({"status": "stopping"}, status=503)
        failing = self.worker.unhealthy_sinks()
        if failing:
            reason = "; ".join(
                f"{sink}: {f['consecutive_failures']} failed writes in a row, last: "
                f"{f['last_error']}"
                for sink, f in failing.items()
            )
            body = {
                "status": "unhealthy",
                "open_windows": self.worker.open_windows,
                "reason": reason,
                "sinks": failing,
            }
            return web.json_response(body, status=503)
        return web.json_response({"status": "ok", "open_windows": self.worker.open_windows})

    async def _report(self, request: web.Request) -> web.Response:
        return await self._read(request.path, dict(request.query))

    async def _dashboard(self, request: web.Request) -> web.Response:
        return await self._read("/report/html", dict(request.query))

    async def _read(self, path: str, query: dict[str, str]) -> web.Response:
        """One read on a free reader, within the time limit; 429 when none is free."""
        handler = _report_handler()
        if handler is None:
            return _line(404, "reports are not available in this build")
        try:
            reader = self._readers.get_nowait()
        except asyncio.QueueEmpty:
            return _line(
                429,
                f"{self.reads.concurrency} reports are being served already "
                "(--report-concurrency); retry shortly",
                headers={"Retry-After": "1"},
            )
        limit_s = self.reads.timeout_s
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(
            self._executor, _run_read, handler, reader, path, query, limit_s
        )
        try:
            status, content_type, body, exceeded = await asyncio.wait_for(
                asyncio.shield(future), timeout=limit_s + TIMEOUT_GRACE_S
            )
        except TimeoutError:
            # The reader comes back once its thread ends (its queries are already stopped).
            future.add_done_callback(lambda _: self._readers.put_nowait(reader))
            return _timed_out(limit_s)
        except Exception:
            self._readers.put_nowait(reader)
            log.exception("a report failed")
            return _line(500, "the report failed; see the worker's log")
        self._readers.put_nowait(reader)
        if exceeded:
            return _timed_out(limit_s)
        return web.Response(status=status, body=body, headers={"Content-Type": content_type})


def _run_read(
    handler: ReportHandler,
    reader: ClickHouseStore,
    path: str,
    query: Mapping[str, str],
    limit_s: float,
) -> tuple[int, str, bytes, bool]:
    with reader.time_limit(limit_s) as limit:
        status, content_type, body = handler(reader, path, query)
    return status, content_type, body, limit.exceeded


def _timed_out(limit_s: float) -> web.Response:
    return _line(504, f"the report ran past its {limit_s:g} s limit (--report-timeout-s)")


def _line(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=f"{text}\n", content_type="text/plain", headers=headers)


def _report_handler() -> ReportHandler | None:
    try:
        module = importlib.import_module("streams.reports.http")
    except ModuleNotFoundError:
        return None
    handler: ReportHandler | None = getattr(module, "handle_report_request", None)
    return handler

"""The worker's HTTP endpoint: `/metrics`, `/healthz`, and read access to its ClickHouse.

In embedded mode the worker is the only process that may open its chDB folder, so it also
serves the reports (`/report/...`, `/export/...`) and a live dashboard (`/`).
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from streams.store import ClickHouseStore


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


class HttpEndpoint:
    def __init__(self, worker: Served, host: str, port: int) -> None:
        self.worker = worker
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/report/{name}", self._report)
        app.router.add_get("/export/{name}", self._report)
        app.router.add_get("/", self._dashboard)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

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
        handler = _report_handler()
        if handler is None:
            return web.Response(status=404, text="reports are not available in this build\n")
        status, content_type, body = await asyncio.to_thread(
            handler, self.worker.store, request.path, dict(request.query)
        )
        return web.Response(status=status, body=body, headers={"Content-Type": content_type})

    async def _dashboard(self, request: web.Request) -> web.Response:
        handler = _report_handler()
        if handler is None:
            return web.Response(text="gpuledger worker: see /metrics\n")
        status, content_type, body = await asyncio.to_thread(
            handler, self.worker.store, "/report/html", dict(request.query)
        )
        return web.Response(status=status, body=body, headers={"Content-Type": content_type})


def _report_handler() -> Any:
    try:
        module = importlib.import_module("streams.reports.http")
    except ModuleNotFoundError:
        return None
    return getattr(module, "handle_report_request", None)

"""The `/metrics` and `/healthz` endpoint every producer serves (aiohttp, same event loop)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

HealthCheck = Callable[[], tuple[bool, str]]


class MetricsEndpoint:
    """Owns one aiohttp site on `host:port`; port 0 in the config means "do not serve"."""

    def __init__(
        self, registry: CollectorRegistry, health: HealthCheck, host: str, port: int
    ) -> None:
        self.registry = registry
        self.health = health
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:  # an ephemeral port (tests): find out which
            for sock in getattr(site._server, "sockets", None) or ():
                self.port = int(sock.getsockname()[1])

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        ok, detail = self.health()
        return web.Response(status=200 if ok else 503, text=detail + "\n")

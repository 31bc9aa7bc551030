"""A local Kubernetes API server for tests: serves recorded list and watch responses (in order)
over real HTTP, and records the requests it got."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

RECORDED = Path(__file__).parent / "k8s"


def recorded(name: str) -> Any:
    text = (RECORDED / name).read_text()
    return json.loads(text) if name.endswith(".json") else text


class FakeKubeApi:
    """`lists[path]` and `watches[path]` are queues of responses: a dict (JSON 200), a str (a
    watch stream body), or an int (that HTTP status). An exhausted watch queue holds the
    connection open, like a quiet watch."""

    def __init__(self) -> None:
        self.lists: dict[str, list[Any]] = {}
        self.watches: dict[str, list[Any]] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.server: TestServer | None = None

    async def __aenter__(self) -> FakeKubeApi:
        app = web.Application()
        app.router.add_get("/api/v1/{resource}", self._handle)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        await self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        query = dict(request.query)
        self.requests.append((path, query))
        queue = (self.watches if query.get("watch") else self.lists).setdefault(path, [])
        if not queue:
            if query.get("watch"):
                await asyncio.sleep(3600)
            return web.json_response({"kind": "Status", "code": 500}, status=500)
        answer = queue.pop(0)
        if isinstance(answer, int):
            status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": answer}
            return web.json_response(status, status=answer)
        if isinstance(answer, dict):
            return web.json_response(answer)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        # Send in uneven chunks so lines straddle reads, as a real stream does.
        data = answer.encode()
        for i in range(0, len(data), 777):
            await response.write(data[i : i + 777])
        await response.write_eof()
        return response

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / "kubeconfig"
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
            f"clusters:\n- name: local\n  cluster:\n    server: {self.url}\n"
            "contexts:\n- name: test\n  context:\n    cluster: local\n    user: tester\n"
            "users:\n- name: tester\n  user:\n    token: test-token\n"
        )
        return path

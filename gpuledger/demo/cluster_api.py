"""The demo cluster's HTTP face on 127.0.0.1: a Kubernetes API (list and watch of namespaces,
nodes and pods) and every inference server's `/metrics` page, both views of one `Scenario` at
simulated time. Its nodes are the scenario's as AWS instances (`agents.demo_nodes`: providerIDs,
instance types and their capacity).

The pod watcher and the token scraper talk to it exactly as to a real cluster. Pod objects are
the scenario's, with two changes: their scrape annotations point at this server
(`127.0.0.1:<port>/pods/<uid>/metrics`), since simulated pod IPs cannot be reached, and their
first container's limits hold the pod's GPU requests (extended resources: request == limit).
Nodes advertise their GPUs as the device plugin would (time-slicing replicas, MIG profiles).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from agents.demo_nodes import DemoNode, cloud_nodes
from agents.scenario import PodSpec, Scenario
from agents.scenario_views import metrics_page, namespace_object, pod_object

WATCH_KEEPALIVE_S = 1.0


class SimulatedClusterApi:
    """Owns one aiohttp server. `advance(t)` moves the cluster to scenario time `t`: pods that
    started are ADDED, pods that ended are DELETED, and open watches receive the events."""

    def __init__(self, scenario: Scenario, clock: Callable[[], float]) -> None:
        self.scenario = scenario
        self.clock = clock
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._version = 1  # namespaces are created at version 1
        self._live: dict[str, tuple[PodSpec, str]] = {}  # uid -> (pod, resourceVersion)
        self._log: list[tuple[int, str, dict[str, Any]]] = []  # pod watch events
        self._changed = asyncio.Condition()
        self._closing = False
        self._by_uid = {p.uid: p for p in scenario.pods}
        self.nodes = cloud_nodes(scenario)
        self._node_labels = {spec.name: dict(spec.labels) for spec in scenario.nodes}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces", self._namespaces)
        app.router.add_get("/api/v1/nodes", self._nodes)
        app.router.add_get("/api/v1/pods", self._pods)
        app.router.add_get("/pods/{uid}/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        self._closing = True
        async with self._changed:
            self._changed.notify_all()
        if self._runner is not None:
            await self._runner.cleanup()

    async def advance(self, t: float) -> None:
        alive = {p.uid for p in self.scenario.pods_at(t)}
        events: list[tuple[str, PodSpec]] = []
        for uid in [u for u in self._live if u not in alive]:
            events.append(("DELETED", self._live.pop(uid)[0]))
        for pod in self.scenario.pods:
            if pod.uid in alive and pod.uid not in self._live:
                events.append(("ADDED", pod))
        if not events:
            return
        for kind, pod in events:
            self._version += 1
            version = str(self._version)
            if kind == "ADDED":
                self._live[pod.uid] = (pod, version)
            self._log.append((self._version, kind, self._pod_object(pod, version)))
        async with self._changed:
            self._changed.notify_all()

    # --- objects -------------------------------------------------------------------------------

    def _pod_object(self, pod: PodSpec, version: str) -> dict[str, Any]:
        obj = pod_object(self.scenario, pod, version)
        annotations = obj["metadata"]["annotations"]
        if annotations.get("prometheus.io/scrape") == "true":
            annotations["prometheus.io/port"] = str(self.port)
            annotations["prometheus.io/path"] = f"/pods/{pod.uid}/metrics"
            obj["status"]["podIP"] = "127.0.0.1"
            obj["status"]["podIPs"] = [{"ip": "127.0.0.1"}]
        for container in obj["spec"]["containers"]:
            limits = container.get("resources", {}).get("limits", {})
            for name in [n for n in limits if n.startswith("nvidia.com/")]:
                del limits[name]  # the scenario's requests say what the pod holds
        if pod.gpu_requests:
            resources = obj["spec"]["containers"][0].setdefault("resources", {})
            limits = resources.setdefault("limits", {})
            limits.update({name: str(count) for name, count in pod.gpu_requests.items()})
        return obj

    def _node_object(self, node: DemoNode) -> dict[str, Any]:
        capacity = {
            "cpu": str(node.cpu_millicores // 1000),
            "memory": f"{node.memory_bytes // 1024}Ki",  # as the kubelet reports it
            "pods": "110",
            **{name: str(count) for name, count in node.gpu_capacity.items()},
        }
        return {
            "kind": "Node",
            "apiVersion": "v1",
            "metadata": {
                "name": node.name,
                "uid": f"node-{node.instance_id}",
                "resourceVersion": "1",
                "creationTimestamp": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.scenario.start_unix_s)
                ),
                "labels": {
                    "kubernetes.io/hostname": node.name,
                    "kubernetes.io/os": "linux",
                    "topology.kubernetes.io/region": node.region,
                    **self._node_labels[node.name],
                },
            },
            "spec": {"providerID": node.provider_id},
            "status": {"capacity": capacity, "allocatable": capacity},
        }

    def _namespace_objects(self) -> list[dict[str, Any]]:
        return [namespace_object(self.scenario, ns.name) for ns in self.scenario.namespaces]

    # --- handlers ------------------------------------------------------------------------------

    async def _namespaces(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch"):
            return await self._watch(request, lambda _: [])  # namespaces never change here
        return _list("NamespaceList", self._namespace_objects(), str(self._version))

    async def _nodes(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch"):
            return await self._watch(request, lambda _: [])  # nodes never change here
        items = [self._node_object(node) for node in self.nodes]
        return _list("NodeList", items, str(self._version))

    async def _pods(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch"):
            return await self._watch(request, self._pod_events_after)
        items = [self._pod_object(pod, version) for pod, version in self._live.values()]
        node = request.query.get("fieldSelector", "").removeprefix("spec.nodeName=")
        if node:
            items = [i for i in items if i["spec"]["nodeName"] == node]
        return _list("PodList", items, str(self._version))

    def _pod_events_after(self, version: int) -> list[tuple[int, str, dict[str, Any]]]:
        return [e for e in self._log if e[0] > version]

    async def _watch(
        self,
        request: web.Request,
        events_after: Callable[[int], list[tuple[int, str, dict[str, Any]]]],
    ) -> web.StreamResponse:
        try:
            sent = int(request.query.get("resourceVersion") or "0")
        except ValueError:
            sent = 0
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while not self._closing:
                for version, kind, obj in events_after(sent):
                    line = json.dumps({"type": kind, "object": obj}) + "\n"
                    await response.write(line.encode())
                    sent = version
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), WATCH_KEEPALIVE_S)
        return response

    async def _metrics(self, request: web.Request) -> web.Response:
        pod = self._by_uid.get(request.match_info["uid"])
        t = self.scenario.time_s(self.clock())
        if pod is None or pod.inference is None or not pod.active(t):
            return web.Response(status=404, text="no such inference server\n")
        return web.Response(
            text=metrics_page(self.scenario, pod, t),
            content_type="text/plain",
            charset="utf-8",
        )


def _list(kind: str, items: list[dict[str, Any]], version: str) -> web.Response:
    return web.json_response(
        {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": version}, "items": items}
    )

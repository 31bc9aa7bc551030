"""The pod watcher's nodes over real HTTP (a local API server serving given answers): list then
watch, 410 Gone and the relist, a 403 for nodes said once while pods go on, and `--no-nodes`."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from kube_api import FakeKubeApi, recorded
from prometheus_client import CollectorRegistry

from agents.kube_client import KubeClient, KubeSettings
from agents.metrics import PodsMetrics
from agents.node_state import NodeEmission, NodeState
from agents.pod_state import PodEmission, PodState
from agents.pod_watcher import PodWatcher

NODES = "/api/v1/nodes"


def node(name: str, rv: str, gpus: str = "8") -> dict[str, Any]:
    return {
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "resourceVersion": rv,
            "creationTimestamp": "2026-11-01T08:00:00Z",
            "labels": {"node.kubernetes.io/instance-type": "p5.48xlarge"},
        },
        "spec": {"providerID": f"aws:///us-east-1a/i-{name}"},
        "status": {"capacity": {"cpu": "192", "memory": "2048Gi", "nvidia.com/gpu": gpus}},
    }


def node_list(rv: str, *items: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "NodeList", "metadata": {"resourceVersion": rv}, "items": list(items)}


def watch(*events: tuple[str, dict[str, Any]]) -> str:
    return "".join(json.dumps({"type": t, "object": o}) + "\n" for t, o in events)


class Run:
    def __init__(self, api: FakeKubeApi, *, nodes: bool = True) -> None:
        self.client = KubeClient(KubeSettings(server=api.url, token="t"))
        self.registry = CollectorRegistry()
        self.pods: list[PodEmission] = []
        self.nodes: list[NodeEmission] = []
        self.watcher = PodWatcher(
            self.client,
            PodState("prod"),
            self.pods.append,
            PodsMetrics(self.registry, "prod"),
            retry_max_s=0.2,
            nodes=NodeState("prod") if nodes else None,
            emit_node=self.nodes.append if nodes else None,
        )

    async def until(self, done: Callable[[], bool], timeout_s: float = 5.0) -> None:
        await self.client.start()
        stop = asyncio.Event()
        task = asyncio.create_task(self.watcher.run(stop))
        try:
            deadline = asyncio.get_running_loop().time() + timeout_s
            while not done() and asyncio.get_running_loop().time() < deadline:
                assert not task.done(), task
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)
            await self.client.close()

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, {"cluster": "prod", **labels}) or 0.0


def pods_and_namespaces(api: FakeKubeApi, lists: int = 1) -> None:
    api.lists["/api/v1/namespaces"] = [recorded("namespacelist.json")] * lists
    api.lists["/api/v1/pods"] = [recorded("podlist.json")] * lists


async def test_nodes_are_listed_watched_and_relisted_after_410() -> None:
    async with FakeKubeApi() as api:
        pods_and_namespaces(api)
        api.lists[NODES] = [
            node_list("10", node("a", "5"), node("b", "6")),
            node_list("40", node("b", "30", gpus="7"), node("c", "31")),
        ]
        api.watches[NODES] = [
            watch(
                ("MODIFIED", node("a", "11")),  # a heartbeat: no news
                ("MODIFIED", node("a", "12", gpus="4")),
                ("DELETED", node("a", "13", gpus="4")),
            ),
            410,
        ]
        run = Run(api)
        await run.until(lambda: len(run.nodes) >= 6)
    seen = [(e.kind, e.info.node, e.info.gpus) for e in run.nodes]
    assert seen[:4] == [
        ("added", "a", 8),
        ("added", "b", 8),
        ("updated", "a", 4),
        ("deleted", "a", 4),
    ]
    assert sorted(seen[4:]) == [("added", "c", 8), ("updated", "b", 7)]
    assert run.nodes[0].key == "prod/a" and run.nodes[3].event_id == "uid-a:deleted"
    watched_from = [q["resourceVersion"] for p, q in api.requests if p == NODES and q.get("watch")]
    assert watched_from[:2] == ["10", "13"]
    assert run.metric("gpuledger_pods_relists_total", resource="nodes", reason="expired") == 1
    assert run.metric("gpuledger_pods_node_events_total", kind="deleted") == 1
    assert run.metric("gpuledger_pods_nodes_known") == 2
    assert [e.kind for e in run.pods] == ["added", "added"]  # the pods as without nodes


async def test_a_403_for_nodes_is_one_error_line_and_pods_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agents.pod_watcher")
    async with FakeKubeApi() as api:
        pods_and_namespaces(api, lists=3)
        api.watches["/api/v1/pods"] = [recorded("watch-pods-1.jsonl")]
        api.lists[NODES] = [403, 403, 403]
        run = Run(api)

        async def resyncs() -> None:  # two periodic resyncs, as `gpuledger pods` runs them
            while not run.watcher.synced:
                await asyncio.sleep(0.02)
            for _ in range(2):
                await run.watcher.resync()

        extra = asyncio.create_task(resyncs())
        await run.until(lambda: len(run.pods) >= 6 and extra.done())
        await extra
    assert run.nodes == [] and run.watcher.nodes_forbidden
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0].getMessage()
    assert "403" in errors[0].getMessage() and "--no-nodes" in errors[0].getMessage()
    assert sum(1 for p, q in api.requests if p == NODES and q.get("watch")) == 0
    # the pod watch went on: its events, a deletion among them, then the resyncs' answers
    assert len(run.pods) >= 6 and "deleted" in [e.kind for e in run.pods[:6]]


async def test_nodes_readable_again_at_a_resync_are_published_and_watched() -> None:
    async with FakeKubeApi() as api:
        pods_and_namespaces(api, lists=2)
        api.lists[NODES] = [403, node_list("10", node("a", "5"))]
        run = Run(api)

        async def resync() -> None:
            while not run.watcher.synced:
                await asyncio.sleep(0.02)
            await run.watcher.resync()

        extra = asyncio.create_task(resync())
        await run.until(lambda: any(p == NODES and q.get("watch") for p, q in api.requests))
        await extra
    assert [(e.kind, e.info.node) for e in run.nodes] == [("added", "a")]
    assert not run.watcher.nodes_forbidden


async def test_no_nodes_asks_for_none() -> None:
    async with FakeKubeApi() as api:
        pods_and_namespaces(api)
        run = Run(api, nodes=False)
        await run.until(lambda: len(run.pods) >= 3, timeout_s=1.0)
    assert not any(p == NODES for p, _ in api.requests)
    assert run.nodes == []

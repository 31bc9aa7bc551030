"""The pod watcher against recorded API responses served by a local HTTP server: list, watch,
410 Gone (as an ERROR event and as an HTTP status) and the relist that follows."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import orjson
from kube_api import FakeKubeApi, recorded
from prometheus_client import CollectorRegistry

from agents.kube_client import KubeClient, KubeSettings, kubeconfig_settings
from agents.metrics import PodsMetrics
from agents.pod_state import PodEmission, PodState
from agents.pod_watcher import PodWatcher


async def _run_until(watcher: PodWatcher, seen: list[PodEmission], count: int) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    try:
        for _ in range(200):
            if len(seen) >= count or task.done():
                break
            await asyncio.sleep(0.025)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_list_watch_and_relist_after_410_lose_nothing() -> None:
    async with FakeKubeApi() as api:
        api.lists["/api/v1/namespaces"] = [recorded("namespacelist.json")]
        api.lists["/api/v1/pods"] = [recorded("podlist.json"), recorded("podlist-after-410.json")]
        api.watches["/api/v1/pods"] = [
            recorded("watch-pods-1.jsonl"),
            recorded("watch-pods-410.jsonl"),
        ]
        client = KubeClient(KubeSettings(server=api.url, token="t"))
        await client.start()
        registry = CollectorRegistry()
        seen: list[PodEmission] = []
        watcher = PodWatcher(client, PodState("prod"), seen.append, PodsMetrics(registry, "prod"))
        await _run_until(watcher, seen, 8)
        await client.close()
    kinds = [(e.kind, e.info.name.split("-")[0]) for e in seen]
    assert kinds == [
        ("added", "llama"),
        ("added", "eval"),
        ("updated", "eval"),
        ("added", "pending"),
        ("added", "qwen"),
        ("deleted", "llama"),
        ("deleted", "eval"),  # deleted while the watch was expired: found by the relist
        ("added", "mistral"),
    ]
    watch_versions = [
        q["resourceVersion"] for p, q in api.requests if q.get("watch") and p.endswith("pods")
    ]
    assert watch_versions[:2] == ["48250", "48270"]  # from the list, then from the last event
    assert (
        registry.get_sample_value(
            "gpuledger_pods_relists_total",
            {"cluster": "prod", "resource": "pods", "reason": "expired"},
        )
        == 1
    )


async def test_http_410_on_watch_start_also_relists() -> None:
    async with FakeKubeApi() as api:
        api.lists["/api/v1/namespaces"] = [recorded("namespacelist.json")]
        api.lists["/api/v1/pods"] = [recorded("podlist.json"), recorded("podlist-after-410.json")]
        api.watches["/api/v1/pods"] = [410]
        client = KubeClient(KubeSettings(server=api.url, token="t"))
        await client.start()
        seen: list[PodEmission] = []
        watcher = PodWatcher(
            client, PodState("prod"), seen.append, PodsMetrics(CollectorRegistry(), "prod")
        )
        await _run_until(watcher, seen, 6)
        await client.close()
    assert sum(1 for p, q in api.requests if p.endswith("pods") and not q.get("watch")) == 2
    assert {("deleted", "llama"), ("deleted", "eval")} <= {
        (e.kind, e.info.name.split("-")[0]) for e in seen
    }


async def test_namespace_watch_republishes_pods_of_the_namespace() -> None:
    async with FakeKubeApi() as api:
        api.lists["/api/v1/namespaces"] = [recorded("namespacelist.json")]
        api.lists["/api/v1/pods"] = [recorded("podlist.json")]
        api.watches["/api/v1/namespaces"] = [recorded("watch-namespaces-1.jsonl")]
        client = KubeClient(KubeSettings(server=api.url, token="t"))
        await client.start()
        seen: list[PodEmission] = []
        watcher = PodWatcher(
            client, PodState("prod"), seen.append, PodsMetrics(CollectorRegistry(), "prod")
        )
        await _run_until(watcher, seen, 3)
        await client.close()
    assert seen[-1].kind == "updated"
    assert seen[-1].info.namespace_labels["product"] == "llm-eval"


def test_kubeconfig_with_token(tmp_path: Path) -> None:
    api = FakeKubeApi()
    api.server = type("S", (), {"port": 6443})()  # type: ignore[assignment]
    settings = kubeconfig_settings(str(api.kubeconfig(tmp_path)))
    assert settings.server == "http://127.0.0.1:6443"
    assert settings.token == "test-token"
    assert "test-token" not in repr(settings)


async def test_pods_command_end_to_end_dry_run(tmp_path: Path) -> None:
    async with FakeKubeApi() as api:
        api.lists["/api/v1/namespaces"] = [recorded("namespacelist.json")]
        api.lists["/api/v1/pods"] = [recorded("podlist.json")]
        api.watches["/api/v1/pods"] = [recorded("watch-pods-1.jsonl")]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gpuledger.cli",
            "pods",
            "--dry-run",
            "--duration",
            "2",
            "--metrics-port",
            "0",
            "--cluster",
            "prod",
            "--kubeconfig",
            str(api.kubeconfig(tmp_path)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    events = [orjson.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in events] == ["io.gpuledger.pod.v1"] * 6
    assert events[-1]["data"]["deleted"] is True
    assert all(e["data"]["cluster"] == "prod" for e in events)
    assert len({e["id"] for e in events}) == 6

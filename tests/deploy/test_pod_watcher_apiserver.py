"""The pod watcher (`gpuledger pods`) against a real kube-apiserver, authenticated as its own
ServiceAccount with the RBAC exactly as shipped: list then watch, pod label and node changes,
namespace label changes, deletion, bookmarks, watch expiry (410 Gone after the API server
restarted and etcd compacted) and the relist that resumes it, and the published events on a
real Kafka broker."""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from kube_apiserver import KubeApi, KubeApiServer
from kube_manifests import install_cluster_prerequisites, render, unique
from prometheus_client import CollectorRegistry

from agents import pods_cli
from agents.kube_client import KubeClient, kubeconfig_settings
from agents.metrics import PodsMetrics
from agents.pod_state import PodEmission, PodState
from agents.pod_watcher import PodWatcher
from schemas.events import PODS_TOPIC, Ok, decode_event

NODE = "gpu-node-1"


@pytest.fixture(scope="module")
def shipped(kube_apiserver: KubeApiServer) -> list[dict[str, Any]]:
    docs = render("deploy/kubernetes")
    install_cluster_prerequisites(kube_apiserver.api)
    kube_apiserver.api.apply(docs)
    return docs


def _account(docs: list[dict[str, Any]], workload: str) -> tuple[str, str]:
    (deployment,) = (
        d
        for d in docs
        if d["metadata"]["name"] == workload and "spec" in d and "template" in d["spec"]
    )
    return deployment["metadata"]["namespace"], deployment["spec"]["template"]["spec"][
        "serviceAccountName"
    ]


@pytest.fixture(scope="module")
def watcher_kubeconfig(
    kube_apiserver: KubeApiServer,
    shipped: list[dict[str, Any]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A kubeconfig with the pod watcher's own ServiceAccount token, read from a file as the
    kubelet would mount it (TokenRequest, bound to the ServiceAccount)."""
    namespace, account = _account(shipped, "gpuledger-pods")
    folder = tmp_path_factory.mktemp("pods-sa")
    token = folder / "token"
    token.write_text(kube_apiserver.api.service_account_token(namespace, account))
    config = kube_apiserver.write_kubeconfig(folder / "kubeconfig", "unused", f"{account}-sa")
    text = config.read_text().replace("token: unused", f"tokenFile: {token}")
    config.write_text(text)
    return config


def _as_account(server: KubeApiServer, docs: list[dict[str, Any]], workload: str) -> KubeApi:
    namespace, account = _account(docs, workload)
    return server.api.as_token(server.api.service_account_token(namespace, account))


def test_the_watchers_rbac_allows_reading_pods_namespaces_and_nodes_only(
    kube_apiserver: KubeApiServer, shipped: list[dict[str, Any]]
) -> None:
    pods = _as_account(kube_apiserver, shipped, "gpuledger-pods")
    for resource in ("pods", "namespaces", "nodes"):
        for verb in ("get", "list", "watch"):
            assert pods.can_i(verb, resource), (verb, resource)
        for verb in ("create", "update", "patch", "delete"):
            assert not pods.can_i(verb, resource), (verb, resource)
    for resource in ("secrets", "configmaps", "serviceaccounts"):
        assert not pods.can_i("list", resource), resource
    assert pods.request("GET", "/api/v1/pods", params={"limit": "1"}).status == 200
    assert pods.request("GET", "/api/v1/secrets").status == 403

    tokens = _as_account(kube_apiserver, shipped, "gpuledger-tokens")
    assert tokens.can_i("watch", "pods") and not tokens.can_i("list", "namespaces")
    assert not tokens.can_i("list", "secrets")


def test_the_agent_and_worker_get_no_api_token(shipped: list[dict[str, Any]]) -> None:
    accounts = {d["metadata"]["name"]: d for d in shipped if d["kind"] == "ServiceAccount"}
    for workload in ("gpuledger-agent", "gpuledger-worker"):
        (w,) = (
            d
            for d in shipped
            if d["metadata"]["name"] == workload and "template" in d.get("spec", {})
        )
        spec = w["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False
        assert accounts[spec["serviceAccountName"]]["automountServiceAccountToken"] is False


# --- the watcher, in process ----------------------------------------------------------------


class Watching:
    """A PodWatcher as `gpuledger pods` runs it, publishing into a list."""

    def __init__(self, kubeconfig: Path, watch_timeout_s: int = 300) -> None:
        self.client = KubeClient(kubeconfig_settings(str(kubeconfig)))
        self.registry = CollectorRegistry()
        self.seen: list[PodEmission] = []
        self.watcher = PodWatcher(
            self.client,
            PodState("test"),
            self.seen.append,
            PodsMetrics(self.registry, "test"),
            watch_timeout_s=watch_timeout_s,
            retry_max_s=1.0,
        )
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.client.start()
        self.resume()
        await self.until(lambda: self.watcher.synced, "the initial list")

    def resume(self) -> None:
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.watcher.run(self._stop))

    async def pause(self) -> None:
        """Stop watching, keeping the state and the resourceVersions (a lost connection)."""
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)
            self._task = None

    async def close(self) -> None:
        await self.pause()
        await self.client.close()

    async def until(self, condition: Callable[[], Any], what: str, timeout_s: float = 20.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not condition():
            if self._task is not None and self._task.done():
                self._task.result()
                raise AssertionError(f"the watcher stopped before {what}")
            if loop.time() > deadline:
                raise AssertionError(f"not within {timeout_s:.0f} s: {what}; seen {self.seen}")
            await asyncio.sleep(0.05)

    def of(self, namespace: str) -> list[tuple[str, str, dict[str, str], dict[str, str], bool]]:
        return [
            (e.kind, e.info.name, e.info.labels, e.info.namespace_labels, e.info.deleted)
            for e in self.seen
            if e.info.namespace == namespace
        ]

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, {"cluster": "test", **labels}) or 0.0


@pytest.fixture
async def watching(watcher_kubeconfig: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[Watching] = []

    async def start(**kwargs: Any) -> Watching:
        w = Watching(watcher_kubeconfig, **kwargs)
        started.append(w)
        await w.start()
        return w

    yield start
    for w in started:
        await w.close()


def _pod(
    namespace: str,
    name: str,
    labels: dict[str, str],
    node: str | None = NODE,
    *,
    limits: dict[str, str] | None = None,
) -> dict[str, Any]:
    server: dict[str, Any] = {"name": "server", "image": "vllm/vllm-openai:v0.6.0"}
    if limits:
        server["resources"] = {"limits": limits}
    spec: dict[str, Any] = {"containers": [server]}
    if node:
        spec["nodeName"] = node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": spec,
    }


def _create(api: KubeApi, doc: dict[str, Any]) -> dict[str, Any]:
    answer = api.create(doc)
    assert answer.status == 201, answer.body
    body: dict[str, Any] = answer.body
    return body


def _merge(api: KubeApi, doc: dict[str, Any], patch: dict[str, Any]) -> None:
    api.ok("PATCH", api.path_of(doc), patch, content_type="application/merge-patch+json")


def _bind(api: KubeApi, doc: dict[str, Any], node: str) -> None:
    api.ok(
        "POST",
        api.path_of(doc) + "/binding",
        {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": doc["metadata"]["name"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        },
    )


def _delete(api: KubeApi, doc: dict[str, Any]) -> None:
    assert api.delete(doc).status == 200


async def test_list_then_watch_labels_nodes_namespaces_and_deletion(
    kube_apiserver: KubeApiServer, watching: Callable[..., Any]
) -> None:
    api = kube_apiserver.api
    ns = unique("search")
    ns_labels = {"team": "search", "kubernetes.io/metadata.name": ns}
    api.create_namespace(ns, {"team": "search"})
    listed = _create(api, _pod(ns, "listed", {"app": "vllm"}))
    pending = _create(api, _pod(ns, "pending", {"app": "vllm"}, node=None))

    w = await watching()
    # Listed: the scheduled pod, with its namespace's labels; the pending one is not yet news.
    assert w.of(ns) == [("added", "listed", {"app": "vllm"}, ns_labels, False)]
    (first,) = [e for e in w.seen if e.info.namespace == ns]
    assert first.info.uid == listed["metadata"]["uid"] and first.info.node == NODE

    _bind(api, pending, NODE)  # the scheduler's binding: now it can use a GPU
    await w.until(lambda: len(w.of(ns)) == 2, "the bound pod")
    assert w.of(ns)[1] == ("added", "pending", {"app": "vllm"}, ns_labels, False)

    watched = _create(api, _pod(ns, "watched", {"app": "vllm", "product": "assistant"}))
    await w.until(lambda: len(w.of(ns)) == 3, "the new pod")
    assert w.of(ns)[2][:2] == ("added", "watched")
    assert [e.info.uid for e in w.seen if e.info.name == "watched"] == [watched["metadata"]["uid"]]

    _merge(api, listed, {"metadata": {"labels": {"product": "ranker"}}})
    await w.until(lambda: len(w.of(ns)) == 4, "the label change")
    assert w.of(ns)[3] == (
        "updated",
        "listed",
        {"app": "vllm", "product": "ranker"},
        ns_labels,
        False,
    )

    # Status and annotation churn is no news.
    _merge(api, listed, {"metadata": {"annotations": {"note": "churn"}}})

    namespace_doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
    _merge(api, namespace_doc, {"metadata": {"labels": {"team": "ads"}}})
    await w.until(lambda: len(w.of(ns)) == 7, "the namespace label change")
    relabelled = {e[1]: e for e in w.of(ns)[4:]}
    assert set(relabelled) == {"listed", "pending", "watched"}
    assert all(e[0] == "updated" and e[3]["team"] == "ads" for e in relabelled.values())

    _delete(api, watched)
    await w.until(lambda: len(w.of(ns)) == 8, "the deletion")
    assert w.of(ns)[7][:2] == ("deleted", "watched") and w.of(ns)[7][4] is True
    assert w.metric("gpuledger_pods_relists_total", resource="pods", reason="start") == 1
    assert w.metric("gpuledger_pods_relists_total", resource="pods", reason="expired") == 0


async def test_bookmarks_move_the_watch_on_without_events(
    kube_apiserver: KubeApiServer, watching: Callable[..., Any]
) -> None:
    """While no pod changes, the store's revision moves on (here: a namespace is created).
    Once the pods cache has caught up (a consistent list makes it ask etcd), the API server
    sends a BOOKMARK 2 s before the watch's timeout; the watcher keeps its resourceVersion,
    so its next watch starts from there, emitting nothing."""
    api = kube_apiserver.api
    w = await watching(watch_timeout_s=5)
    seen = len(w.seen)
    start_version = int(w.watcher._versions["pods"])
    api.create_namespace(unique("quiet"))
    listed = int(api.get("/api/v1/pods", limit="1")["metadata"]["resourceVersion"])
    assert listed > start_version
    await w.until(
        lambda: (
            w.metric("gpuledger_pods_watch_events_total", resource="pods", type="BOOKMARK") >= 1
        ),
        "a bookmark",
    )
    await w.until(lambda: int(w.watcher._versions["pods"]) >= listed, "the bookmark's version")
    assert len(w.seen) == seen
    assert w.metric("gpuledger_pods_api_errors_total", resource="pods") == 0
    assert w.metric("gpuledger_pods_relists_total", resource="pods", reason="expired") == 0


async def test_an_expired_watch_lists_again_and_loses_nothing(
    kube_apiserver: KubeApiServer, watching: Callable[..., Any]
) -> None:
    """While the watcher is cut off, pods change and go, the API server restarts and etcd is
    compacted: its resourceVersions are gone (410), and the relist emits what it missed."""
    api = kube_apiserver.api
    ns = unique("search")
    api.create_namespace(ns, {"team": "search"})
    kept = _create(api, _pod(ns, "kept", {"app": "vllm"}))
    gone = _create(api, _pod(ns, "gone", {"app": "vllm"}))
    w = await watching()
    assert [e[:2] for e in w.of(ns)] == [("added", "kept"), ("added", "gone")] or [
        e[:2] for e in w.of(ns)
    ] == [("added", "gone"), ("added", "kept")]

    await w.pause()
    old_versions = dict(w.watcher._versions)
    _delete(api, gone)
    _merge(api, kept, {"metadata": {"labels": {"product": "assistant"}}})
    _merge(
        api,
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        {"metadata": {"labels": {"product": "assistant"}}},
    )
    kube_apiserver.compact_etcd()
    kube_apiserver.restart_apiserver()
    stale = kube_apiserver.api.request(
        "GET",
        "/api/v1/pods",
        params={"watch": "1", "resourceVersion": old_versions["pods"], "timeoutSeconds": "1"},
    )
    assert "410" in str(stale.body) or stale.status == 410, stale.body

    w.resume()
    await w.until(
        lambda: (
            w.metric("gpuledger_pods_relists_total", resource="pods", reason="expired") >= 1
            and any(e[0] == "deleted" for e in w.of(ns))
        ),
        "the relist after 410 Gone",
    )
    missed = w.of(ns)[2:]
    assert ("deleted", "gone") in [e[:2] for e in missed]
    assert missed[-1][1] == "kept" and missed[-1][2]["product"] == "assistant"
    assert missed[-1][3]["product"] == "assistant"
    assert w.metric("gpuledger_pods_relists_total", resource="namespaces", reason="expired") >= 1

    # ... and the watch goes on from the relist.
    _create(api, _pod(ns, "after", {"app": "vllm"}))
    await w.until(lambda: w.of(ns)[-1][:2] == ("added", "after"), "a pod after the resume")


# --- `gpuledger pods` end to end: real API server, real Kafka -------------------------------


async def _consume(bootstrap: str, cluster: str, want: int, timeout_s: float = 30.0) -> list[Any]:
    consumer = AIOKafkaConsumer(
        PODS_TOPIC,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=f"test-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
    )
    await consumer.start()
    found: list[Any] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(found) < want and loop.time() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    decoded = decode_event(record.value)
                    assert isinstance(decoded, Ok), decoded
                    if decoded.event.data.cluster == cluster:
                        found.append((record.key, decoded.event))
    finally:
        await consumer.stop()
    return found


async def test_gpuledger_pods_publishes_the_servers_pods_to_kafka(
    kube_apiserver: KubeApiServer, watcher_kubeconfig: Path, kafka_bootstrap: str
) -> None:
    api = kube_apiserver.api
    cluster = f"c-{uuid.uuid4().hex[:8]}"
    ns = unique("search")
    api.create_namespace(ns, {"team": "search"})
    before = _create(
        api, _pod(ns, "before", {"product": "assistant"}, limits={"nvidia.com/gpu": "1"})
    )

    parser = argparse.ArgumentParser()
    pods_cli.register(parser.add_subparsers(), {})
    args = parser.parse_args(
        [
            "pods",
            "--duration",
            "8",
            "--metrics-port",
            "0",
            "--kafka",
            kafka_bootstrap,
            "--cluster",
            cluster,
            "--kubeconfig",
            str(watcher_kubeconfig),
        ]
    )
    registry = CollectorRegistry()
    run = asyncio.create_task(pods_cli.run_pods(pods_cli.pods_config_from(args), registry))

    def listed() -> bool:
        value = registry.get_sample_value(
            "gpuledger_pods_relists_total",
            {"cluster": cluster, "resource": "pods", "reason": "start"},
        )
        return bool(value)

    for _ in range(200):
        if listed() or run.done():
            break
        await asyncio.sleep(0.05)
    assert listed(), "gpuledger pods did not list"
    during = _create(api, _pod(ns, "during", {"product": "ranker"}))
    _merge(api, before, {"metadata": {"labels": {"product": "search-v2"}}})
    _delete(api, during)
    assert await asyncio.wait_for(run, 30) == 0

    records = await _consume(kafka_bootstrap, cluster, 4)
    ours = [(key, event.data) for key, event in records if event.data.namespace == ns]
    assert all(key == data.uid.encode() for key, data in ours)
    by_pod: dict[str, list[Any]] = {}
    for _, data in ours:
        by_pod.setdefault(data.name, []).append(data)
    assert [d.labels["product"] for d in by_pod["before"]] == ["assistant", "search-v2"]
    assert [d.gpu_requests for d in by_pod["before"]] == [{"nvidia.com/gpu": 1}] * 2
    assert by_pod["during"][0].gpu_requests == {}
    assert [d.deleted for d in by_pod["during"]] == [False, True]
    assert by_pod["during"][0].uid == during["metadata"]["uid"]
    assert by_pod["before"][0].uid == before["metadata"]["uid"]
    assert all(d.namespace_labels["team"] == "search" and d.node == NODE for _, d in ours)


# --- GPU requests ---------------------------------------------------------------------------

GPU = "nvidia.com/gpu"
MIG_1G = "nvidia.com/mig-1g.10gb"


def _container(name: str, limits: dict[str, str], requests: dict[str, str] | None = None) -> Any:
    resources: dict[str, Any] = {"limits": limits}
    if requests is not None:
        resources["requests"] = requests
    return {"name": name, "image": "vllm/vllm-openai:v0.6.0", "resources": resources}


def _gpu_pod(
    namespace: str, name: str, containers: list[Any], init: list[Any] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"nodeName": NODE, "containers": containers}
    if init:
        spec["initContainers"] = init
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": "vllm"}},
        "spec": spec,
    }


def _phase(api: KubeApi, doc: dict[str, Any], phase: str) -> None:
    """What the kubelet reports: the pod's phase, on its status subresource."""
    api.ok(
        "PATCH",
        api.path_of(doc) + "/status",
        {"status": {"phase": phase}},
        content_type="application/merge-patch+json",
    )


async def test_gpu_requests_as_the_api_server_stores_them_and_none_once_finished(
    kube_apiserver: KubeApiServer, watching: Callable[..., Any]
) -> None:
    api = kube_apiserver.api
    ns = unique("gpus")
    api.create_namespace(ns, {"team": "search"})
    # Limits only (the API server defaults the requests to them), two app containers and an
    # init container that needs more, a MIG pod with a sidecar-free init container.
    whole = _create(api, _gpu_pod(ns, "whole", [_container("server", {GPU: "1"})]))
    stored = whole["spec"]["containers"][0]["resources"]["requests"]
    assert stored == {GPU: "1"}
    _create(
        api,
        _gpu_pod(
            ns,
            "init-heavy",
            [_container("a", {GPU: "1"}, {GPU: "1"}), _container("b", {GPU: "1", "cpu": "2"})],
            [_container("warm-up", {GPU: "4"})],
        ),
    )
    _create(
        api,
        _gpu_pod(
            ns,
            "mig",
            [_container("a", {MIG_1G: "2"}), _container("b", {"nvidia.com/mig-3g.40gb": "1"})],
            [_container("fetch", {MIG_1G: "1"})],
        ),
    )
    cpu = _create(api, _pod(ns, "cpu", {"app": "web"}))

    w = await watching()
    requests = {e.info.name: e.info.gpu_requests for e in w.seen if e.info.namespace == ns}
    assert requests == {
        "whole": {GPU: 1},
        "init-heavy": {GPU: 4},  # max(1 + 1, 4)
        "mig": {MIG_1G: 2, "nvidia.com/mig-3g.40gb": 1},  # max(2, 1), and the other profile
        "cpu": {},
    }

    _phase(api, whole, "Running")  # status churn: no news
    _phase(api, cpu, "Running")
    _phase(api, cpu, "Succeeded")  # a pod that held no GPU finishing is no news either
    _phase(api, whole, "Succeeded")
    await w.until(lambda: len([e for e in w.seen if e.info.name == "whole"]) == 2, "finished")
    finished = [e for e in w.seen if e.info.name == "whole"][-1]
    assert (finished.kind, finished.info.gpu_requests) == ("updated", {})
    assert [e.kind for e in w.seen if e.info.namespace == ns and e.info.name == "cpu"] == ["added"]

    _delete(api, whole)
    await w.until(lambda: w.seen[-1].kind == "deleted", "the deletion")
    assert w.seen[-1].info.name == "whole"
    assert w.seen[-1].info.deleted and w.seen[-1].info.gpu_requests == {}

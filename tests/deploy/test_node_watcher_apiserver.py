"""The pod watcher's nodes against a real kube-apiserver, as its own ServiceAccount under the
RBAC exactly as shipped: nodes created, patched (labels, status capacity, providerID) and
deleted by the admin give the right node events; the account reads nodes and may change none;
an account whose role lacks nodes gets one error line while its pods keep coming; and
`gpuledger pods` publishes node events to the real Kafka broker (none with `--no-nodes`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from kube_apiserver import KubeApi, KubeApiServer
from kube_manifests import unique
from prometheus_client import CollectorRegistry
from test_pod_watcher_apiserver import (  # noqa: F401 - fixtures
    _account,
    _as_account,
    shipped,
    watcher_kubeconfig,
)

from agents import pods_cli
from agents.kube_client import KubeClient, kubeconfig_settings
from agents.metrics import PodsMetrics
from agents.node_state import NodeEmission, NodeState
from agents.pod_state import PodEmission, PodState
from agents.pod_watcher import PodWatcher
from schemas.events import NODE_TYPE, NODES_TOPIC, Ok, decode_event

GIB = 2**30
MERGE = "application/merge-patch+json"


def node_doc(name: str, provider_id: str, labels: dict[str, str], **capacity: str) -> Any:
    spec = {"providerID": provider_id} if provider_id else {}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
        "status": {"capacity": capacity, "allocatable": capacity},
    }


class Watching:
    """A PodWatcher with nodes, as `gpuledger pods` runs it, publishing into lists."""

    def __init__(self, kubeconfig: Path) -> None:
        self.client = KubeClient(kubeconfig_settings(str(kubeconfig)))
        self.nodes: list[NodeEmission] = []
        self.pods: list[PodEmission] = []
        self.watcher = PodWatcher(
            self.client,
            PodState("test"),
            self.pods.append,
            PodsMetrics(CollectorRegistry(), "test"),
            retry_max_s=1.0,
            nodes=NodeState("test"),
            emit_node=self.nodes.append,
        )
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watching:
        await self.client.start()
        self._task = asyncio.create_task(self.watcher.run(self._stop))
        await self.until(lambda: self.watcher.synced, "the initial list")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)
        await self.client.close()

    async def until(self, condition: Callable[[], Any], what: str, timeout_s: float = 20.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not condition():
            if self._task is not None and self._task.done():
                self._task.result()
                raise AssertionError(f"the watcher stopped before {what}")
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"not within {timeout_s:.0f} s: {what}; seen {self.nodes}")
            await asyncio.sleep(0.05)

    def of(self, name: str) -> list[NodeEmission]:
        return [e for e in self.nodes if e.info.node == name]


def test_the_watchers_account_reads_nodes_and_may_change_none(
    kube_apiserver: KubeApiServer,
    shipped: list[dict[str, Any]],  # noqa: F811
) -> None:
    admin = kube_apiserver.api
    name = unique("gpu-node")
    doc = node_doc(name, "aws:///us-east-1a/i-0123456789abcdef0", {}, cpu="8")
    assert admin.create(doc).status == 201
    pods = _as_account(kube_apiserver, shipped, "gpuledger-pods")
    for verb in ("get", "list", "watch"):
        assert pods.can_i(verb, "nodes"), verb
    for verb in ("create", "update", "patch", "delete", "deletecollection"):
        assert not pods.can_i(verb, "nodes"), verb
    assert not pods.can_i("patch", "nodes/status") and not pods.can_i("update", "nodes/status")
    path = admin.path_of(doc)
    assert pods.request("GET", "/api/v1/nodes", params={"limit": "1"}).status == 200
    assert pods.request("GET", path).status == 200
    watch = pods.request("GET", "/api/v1/nodes", params={"watch": "1", "timeoutSeconds": "1"})
    assert watch.status == 200
    patch = {"metadata": {"labels": {"forged": "yes"}}}
    assert pods.request("PATCH", path, patch, content_type=MERGE).status == 403
    capacity = {"status": {"capacity": {"nvidia.com/gpu": "64"}}}
    assert pods.request("PATCH", path + "/status", capacity, content_type=MERGE).status == 403
    assert pods.request("DELETE", path).status == 403
    other = node_doc(unique("forged-node"), "", {})
    assert pods.create(other).status == 403
    assert admin.get(path)["metadata"].get("labels", {}).get("forged") is None
    assert admin.delete(doc).status == 200


async def test_nodes_created_patched_and_deleted_give_node_events(
    kube_apiserver: KubeApiServer,
    watcher_kubeconfig: Path,  # noqa: F811
) -> None:
    admin = kube_apiserver.api
    listed = unique("gpu-node")
    listed_doc = node_doc(
        listed,
        "aws:///us-east-1a/i-0123456789abcdef0",
        {"node.kubernetes.io/instance-type": "p5.48xlarge"},
        cpu="192",
        memory="2113186088Ki",
        **{"nvidia.com/gpu": "8"},
    )
    assert admin.create(listed_doc).status == 201

    async with Watching(watcher_kubeconfig) as w:
        (first,) = w.of(listed)
        assert first.kind == "added" and first.key == f"test/{listed}"
        info = first.info
        assert info.provider_id == "aws:///us-east-1a/i-0123456789abcdef0"
        assert (info.instance_type, info.gpus, info.cpu_millicores) == ("p5.48xlarge", 8, 192_000)
        assert info.memory_bytes == 2_113_186_088 * 1024 and not info.deleted
        created = admin.get(admin.path_of(listed_doc))["metadata"]
        assert first.event_id == f"{created['uid']}:{created['resourceVersion']}"

        # A node joining later, from a provider that labels with the beta key and sets the
        # providerID after registering (the cloud controller does), with no GPU yet.
        joined = unique("gpu-node")
        joined_doc = node_doc(
            joined, "", {"beta.kubernetes.io/instance-type": "Standard_NC24ads_A100_v4"}, cpu="24"
        )
        assert admin.create(joined_doc).status == 201
        await w.until(lambda: len(w.of(joined)) == 1, "the new node")
        assert (w.of(joined)[0].info.provider_id, w.of(joined)[0].info.gpus) == ("", 0)
        assert w.of(joined)[0].info.instance_type == "Standard_NC24ads_A100_v4"
        vm = (
            "azure:///subscriptions/2f1c0b1e-8f0a-4c53-9a52-3f4f6d0c9a11/resourceGroups/rg/"
            "providers/Microsoft.Compute/virtualMachineScaleSets/gpu/virtualMachines/0"
        )
        admin.ok(
            "PATCH", admin.path_of(joined_doc), {"spec": {"providerID": vm}}, content_type=MERGE
        )
        await w.until(lambda: len(w.of(joined)) == 2, "the providerID")
        assert w.of(joined)[1].kind == "updated" and w.of(joined)[1].info.provider_id == vm

        # Status churn and unrelated labels are no news; capacity and instance type are.
        path = admin.path_of(listed_doc)
        admin.ok("PATCH", path, {"metadata": {"labels": {"team": "x"}}}, content_type=MERGE)
        admin.ok(
            "PATCH",
            path + "/status",
            {"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "ok"}]}},
            content_type=MERGE,
        )
        admin.ok(
            "PATCH",
            path + "/status",
            {"status": {"capacity": {"nvidia.com/gpu": "7", "cpu": "191500m", "memory": "1.5Ti"}}},
            content_type=MERGE,
        )
        await w.until(lambda: len(w.of(listed)) == 2, "the capacity change")
        change = w.of(listed)[1]
        assert change.kind == "updated" and change.info.gpus == 7
        # as the API server writes them back (its canonical forms), read exactly
        assert (change.info.cpu_millicores, change.info.memory_bytes) == (191_500, 1536 * GIB)
        label = {"metadata": {"labels": {"node.kubernetes.io/instance-type": "p5e.48xlarge"}}}
        admin.ok("PATCH", path, label, content_type=MERGE)
        await w.until(lambda: len(w.of(listed)) == 3, "the instance type change")
        assert w.of(listed)[2].info.instance_type == "p5e.48xlarge"

        assert admin.delete(listed_doc).status == 200
        await w.until(lambda: len(w.of(listed)) == 4, "the deletion")
        gone = w.of(listed)[3]
        assert gone.kind == "deleted" and gone.info.deleted
        assert gone.event_id == f"{created['uid']}:deleted"
        assert gone.info.provider_id == "aws:///us-east-1a/i-0123456789abcdef0"
        assert admin.delete(joined_doc).status == 200
        await w.until(lambda: w.of(joined)[-1].kind == "deleted", "the second deletion")


async def test_gpu_capacity_as_time_slicing_and_mig_report_it(
    kube_apiserver: KubeApiServer,
    watcher_kubeconfig: Path,  # noqa: F811
) -> None:
    admin = kube_apiserver.api
    shared = unique("gpu-node")
    # The device plugin with time-slicing (4 replicas, renameByDefault false) on 8 GPUs.
    shared_doc = node_doc(
        shared, "", {"nvidia.com/gpu.replicas": "4"}, cpu="96", **{"nvidia.com/gpu": "32"}
    )
    mig = unique("gpu-node")
    # MIG "mixed": one resource per profile, the whole GPUs left unpartitioned besides.
    mig_doc = node_doc(
        mig,
        "",
        {},
        cpu="96",
        **{"nvidia.com/gpu": "4", "nvidia.com/mig-1g.10gb": "14", "nvidia.com/mig-3g.40gb": "4"},
    )
    assert admin.create(shared_doc).status == 201
    assert admin.create(mig_doc).status == 201

    async with Watching(watcher_kubeconfig) as w:
        (first,) = w.of(shared)
        assert (first.info.gpus, first.info.gpu_capacity) == (32, {"nvidia.com/gpu": 32})
        (listed,) = w.of(mig)
        assert listed.info.gpu_capacity == {
            "nvidia.com/gpu": 4,
            "nvidia.com/mig-1g.10gb": 14,
            "nvidia.com/mig-3g.40gb": 4,
        }
        # Repartitioned: the same GPUs, other profiles; the whole-GPU count does not move.
        repartitioned = {"nvidia.com/mig-1g.10gb": "7", "nvidia.com/mig-3g.40gb": "6"}
        admin.ok(
            "PATCH",
            admin.path_of(mig_doc) + "/status",
            {"status": {"capacity": repartitioned}},
            content_type=MERGE,
        )
        await w.until(lambda: len(w.of(mig)) == 2, "the new MIG layout")
        changed = w.of(mig)[1]
        assert changed.kind == "updated" and changed.info.gpus == 4
        assert changed.info.gpu_capacity == {
            "nvidia.com/gpu": 4,
            "nvidia.com/mig-1g.10gb": 7,
            "nvidia.com/mig-3g.40gb": 6,
        }
    assert admin.delete(shared_doc).status == 200
    assert admin.delete(mig_doc).status == 200


@pytest.fixture
def kubeconfig_without_nodes(
    kube_apiserver: KubeApiServer,
    shipped: list[dict[str, Any]],  # noqa: F811
    tmp_path: Path,
) -> Path:
    """A watcher account whose ClusterRole is the shipped one without its nodes rule."""
    admin = kube_apiserver.api
    namespace, _ = _account(shipped, "gpuledger-pods")
    account = unique("pods-without-nodes")
    (role,) = [
        d
        for d in shipped
        if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "gpuledger-pods"
    ]
    rules = [r for r in role["rules"] if "nodes" not in r["resources"]]
    assert rules and len(rules) < len(role["rules"])
    admin.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": account, "namespace": namespace},
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": account},
                "rules": rules,
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": account},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": account,
                },
                "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
            },
        ]
    )
    token = admin.service_account_token(namespace, account)
    return kube_apiserver.write_kubeconfig(tmp_path / "kubeconfig", token, account)


async def test_an_account_refused_nodes_logs_one_line_and_keeps_watching_pods(
    kube_apiserver: KubeApiServer,
    kubeconfig_without_nodes: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agents.pod_watcher")
    admin: KubeApi = kube_apiserver.api
    ns = unique("search")
    admin.create_namespace(ns, {"team": "search"})
    async with Watching(kubeconfig_without_nodes) as w:
        assert w.watcher.nodes_forbidden and w.nodes == []
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "after", "namespace": ns},
            "spec": {
                "nodeName": "gpu-node-1",
                "containers": [{"name": "server", "image": "vllm/vllm-openai:v0.6.0"}],
            },
        }
        assert admin.create(pod).status == 201
        await w.until(lambda: any(e.info.namespace == ns for e in w.pods), "a pod after the 403")
        await w.watcher.resync()  # a periodic resync asks for nodes again, quietly
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "403" in errors[0] and "--no-nodes" in errors[0], errors
    assert "\n" not in errors[0]


# --- `gpuledger pods` end to end: real API server, real Kafka -------------------------------


async def _node_records(bootstrap: str, cluster: str, want: int) -> list[tuple[bytes, Any]]:
    consumer = AIOKafkaConsumer(
        NODES_TOPIC,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=unique("test"),
        enable_auto_commit=False,
    )
    await consumer.start()
    found: list[tuple[bytes, Any]] = []
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while len(found) < want and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    decoded = decode_event(record.value)
                    assert isinstance(decoded, Ok), decoded
                    if decoded.event.data.cluster == cluster:
                        found.append((record.key, decoded.event))
    finally:
        await consumer.stop()
    return found


async def test_gpuledger_pods_publishes_node_events_to_kafka(
    kube_apiserver: KubeApiServer,
    watcher_kubeconfig: Path,  # noqa: F811
    kafka_bootstrap: str,
) -> None:
    admin = kube_apiserver.api
    cluster = unique("c")
    name = unique("gpu-node")
    doc = node_doc(
        name,
        "gce://gpu-project/us-central1-a/" + name,
        {"node.kubernetes.io/instance-type": "a3-highgpu-8g"},
        cpu="208",
        memory="1872Gi",
        **{"nvidia.com/gpu": "8"},
    )
    assert admin.create(doc).status == 201
    parser = argparse.ArgumentParser()
    pods_cli.register(parser.add_subparsers(), {})
    argv = ["pods", "--duration", "6", "--metrics-port", "0", "--kafka", kafka_bootstrap]
    argv += ["--cluster", cluster, "--kubeconfig", str(watcher_kubeconfig)]
    run = asyncio.create_task(pods_cli.run_pods(pods_cli.pods_config_from(parser.parse_args(argv))))
    await asyncio.sleep(3)
    assert admin.delete(doc).status == 200
    assert await asyncio.wait_for(run, 30) == 0
    records = [
        (k, e) for k, e in await _node_records(kafka_bootstrap, cluster, 2) if e.data.node == name
    ]
    assert [k for k, _ in records] == [f"{cluster}/{name}".encode()] * 2
    assert [(e.data.deleted, e.data.gpus, e.data.memory_bytes) for _, e in records] == [
        (False, 8, 1872 * GIB),
        (True, 8, 1872 * GIB),
    ]
    assert records[0][1].data.provider_id == f"gce://gpu-project/us-central1-a/{name}"
    assert [e.data.gpu_capacity for _, e in records] == [{"nvidia.com/gpu": 8}] * 2
    assert records[0][1].type == NODE_TYPE and records[0][1].source == f"gpuledger/pods/{cluster}"

    # --no-nodes: the same cluster, no node event at all.
    quiet = unique("c")
    argv[argv.index(cluster)] = quiet
    args = parser.parse_args([*argv, "--no-nodes"])
    assert pods_cli.pods_config_from(args).nodes is False
    assert await asyncio.wait_for(pods_cli.run_pods(pods_cli.pods_config_from(args)), 30) == 0
    assert await _node_records(kafka_bootstrap, quiet, 1) == []

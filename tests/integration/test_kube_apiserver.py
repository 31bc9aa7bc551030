"""The test harness's real kube-apiserver (tests/kube_apiserver.py): the pinned version, static
admin token, ServiceAccount tokens from the TokenRequest API under RBAC, and gpuledger's own
Kubernetes client reading its kubeconfig."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from kube_apiserver import KubeApi, KubeApiServer

from agents.kube_client import KubeClient, kubeconfig_settings

PINNED = re.search(
    r"k8s\.io/kubernetes (v\S+)",
    (Path(__file__).resolve().parents[2] / ".ci/kubernetes-modules/apiserver/go.mod").read_text(),
)


def test_the_server_is_the_pinned_version_and_ready(kube_apiserver: KubeApiServer) -> None:
    api = kube_apiserver.api
    assert PINNED is not None
    assert api.get("/version")["gitVersion"] == PINNED.group(1)
    assert api.request("GET", "/readyz").status == 200
    assert kube_apiserver.server.startswith("https://127.0.0.1:")
    assert api.can_i("create", "pods", "default")  # system:masters


def test_unknown_tokens_are_refused(kube_apiserver: KubeApiServer) -> None:
    stranger = kube_apiserver.api.as_token("not-a-token")
    assert stranger.request("GET", "/api/v1/namespaces").status == 401


def test_service_account_tokens_are_real_and_rbac_applies(kube_apiserver: KubeApiServer) -> None:
    api = kube_apiserver.api
    namespace = f"smoke-{uuid.uuid4().hex[:8]}"
    api.create_namespace(namespace)
    api.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": "nobody", "namespace": namespace},
            }
        ]
    )
    token = api.service_account_token(namespace, "nobody")
    nobody: KubeApi = api.as_token(token)
    review = nobody.ok(
        "POST",
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    assert review["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:nobody"
    assert nobody.request("GET", "/api/v1/pods").status == 403
    assert not nobody.can_i("list", "pods")


def test_pods_are_created_and_stay_pending_without_a_scheduler(
    kube_apiserver: KubeApiServer,
) -> None:
    api = kube_apiserver.api
    namespace = f"smoke-{uuid.uuid4().hex[:8]}"
    api.create_namespace(namespace)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": namespace},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }
    created = api.create(pod)
    assert created.status == 201, created.body
    assert api.get(api.path_of(pod))["status"]["phase"] == "Pending"


async def test_gpuledgers_kube_client_reads_the_kubeconfig(kube_apiserver: KubeApiServer) -> None:
    client = KubeClient(kubeconfig_settings(str(kube_apiserver.kubeconfig)))
    await client.start()
    try:
        items, version = await client.list_all("/api/v1/namespaces", page_size=1)
    finally:
        await client.close()
    names = {i["metadata"]["name"] for i in items}
    assert {"default", "kube-system"} <= names and int(version) > 0

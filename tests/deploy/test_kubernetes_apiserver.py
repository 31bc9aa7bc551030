"""The shipped manifests on a real kube-apiserver: every kustomization applies server-side (the
API server validates every object, defaults included), the Pod Security levels admit each part
only where it belongs, and the NetworkPolicies as the server stores them let only the metrics
scraper reach gpuledger's HTTP ports."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kube_apiserver import KubeApi, KubeApiServer
from kube_manifests import install_cluster_prerequisites, render, unique

KUSTOMIZATIONS = [
    "deploy/kubernetes",
    "deploy/kubernetes/base",
    "deploy/kubernetes/tag-enforcement/audit",
    "deploy/kubernetes/tag-enforcement/enforce",
]
WORKLOADS = {"Deployment", "DaemonSet"}
SCRAPER_NAMESPACE = {"kubernetes.io/metadata.name": "monitoring"}
SCRAPER = {"app.kubernetes.io/name": "prometheus"}


@pytest.fixture(scope="module")
def api(kube_apiserver: KubeApiServer) -> KubeApi:
    install_cluster_prerequisites(kube_apiserver.api)
    kube_apiserver.api.apply(render("deploy/kubernetes"))
    return kube_apiserver.api


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_kustomization_applies_server_side(api: KubeApi, path: str) -> None:
    docs = render(path)
    # Enforcing is tried, not left on: the other tests switch it on when they need it.
    applied = api.apply(docs, dry_run=path.endswith("enforce"))
    assert [(a["kind"], a["metadata"]["name"]) for a in applied] == [
        (d["kind"], d["metadata"]["name"])
        for d in sorted(docs, key=lambda d: d["kind"] != "Namespace")
    ]
    for doc in docs:
        stored = api.get(api.path_of(doc))
        assert stored["metadata"]["labels"].get("app.kubernetes.io/part-of") == "gpuledger", (
            doc["kind"],
            doc["metadata"]["name"],
        )


def _workloads(api: KubeApi) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in render("deploy/kubernetes") if d["kind"] in WORKLOADS}


def _as_pod(workload: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
    template = copy.deepcopy(workload["spec"]["template"])
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            **template["metadata"],
            "name": unique(workload["metadata"]["name"]),
            "namespace": namespace or workload["metadata"]["namespace"],
        },
        "spec": template["spec"],
    }


def test_each_part_is_admitted_by_the_pod_security_level_of_its_namespace(api: KubeApi) -> None:
    workloads = _workloads(api)
    assert set(workloads) == {
        "gpuledger-agent",
        "gpuledger-worker",
        "gpuledger-pods",
        "gpuledger-tokens",
    }
    for name, workload in workloads.items():
        answer = api.create(_as_pod(workload), dry_run=True)
        assert answer.status == 201, (name, answer.body)
        assert not [w for w in answer.warnings if "PodSecurity" in w], (name, answer.warnings)
    namespaces = {
        n: api.get(f"/api/v1/namespaces/{n}")["metadata"]["labels"]
        for n in ("gpuledger", "gpuledger-agent")
    }
    assert namespaces["gpuledger"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert namespaces["gpuledger-agent"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert workloads["gpuledger-agent"]["metadata"]["namespace"] == "gpuledger-agent"


def test_only_the_agent_needs_the_privileged_level(api: KubeApi) -> None:
    """The agent's pod is refused by `restricted` (hostPID, the /proc hostPath), so it has a
    namespace of its own; anything privileged is refused next to the other parts."""
    agent = _workloads(api)["gpuledger-agent"]
    moved = _as_pod(agent, "gpuledger")
    moved["spec"]["serviceAccountName"] = "gpuledger-worker"  # one that exists there
    refused = api.create(moved, dry_run=True)
    assert refused.status == 403, refused.body
    assert 'violates PodSecurity "restricted:latest"' in refused.message
    assert "hostPID=true" in refused.message
    assert 'volume "host-proc" uses restricted volume type "hostPath"' in refused.message

    worker = _as_pod(_workloads(api)["gpuledger-worker"])
    worker["spec"]["containers"][0]["securityContext"].update(
        privileged=True, allowPrivilegeEscalation=True
    )
    privileged = api.create(worker, dry_run=True)
    assert privileged.status == 403 and "violates PodSecurity" in privileged.message
    root = _as_pod(_workloads(api)["gpuledger-pods"])
    root["spec"]["securityContext"].update(runAsNonRoot=False, runAsUser=0)
    as_root = api.create(root, dry_run=True)
    assert as_root.status == 403 and "runAsNonRoot" in as_root.message


# --- NetworkPolicy, as the API server stores it ---------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        op = expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr["values"]:
            return False
        if op == "Exists" and value is None:
            return False
        if op == "DoesNotExist" and value is not None:
            return False
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _ports(pod: dict[str, Any]) -> dict[str, int]:
    return {
        p["name"]: p["containerPort"]
        for c in pod["spec"]["containers"]
        for p in c.get("ports", [])
        if "name" in p
    }


def _ingress_allowed(
    policies: list[dict[str, Any]],
    target: dict[str, Any],
    port: int,
    peer_namespace_labels: dict[str, str],
    peer_labels: dict[str, str],
) -> bool:
    """Kubernetes NetworkPolicy semantics for one TCP connection from a pod (in the cluster)
    to `target`: allowed if no Ingress policy selects the target, else if a rule allows it."""
    namespace = target["metadata"]["namespace"]
    labels = target["metadata"].get("labels", {})
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == namespace
        and "Ingress" in p["spec"]["policyTypes"]
        and _selects(p["spec"]["podSelector"], labels)
    ]
    if not selecting:
        return True
    peer_in_namespace = peer_namespace_labels.get("kubernetes.io/metadata.name") == namespace
    named = _ports(target)
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            ports_ok = not rule.get("ports") or any(
                p.get("protocol", "TCP") == "TCP"
                and (
                    p.get("port") is None or p["port"] == port or named.get(str(p["port"])) == port
                )
                for p in rule["ports"]
            )
            peers_ok = not rule.get("from") or any(
                ("namespaceSelector" in peer or peer_in_namespace)
                and _selects(peer.get("namespaceSelector", {}), peer_namespace_labels)
                and _selects(peer.get("podSelector", {}), peer_labels)
                for peer in rule["from"]
                if "ipBlock" not in peer
            )
            if ports_ok and peers_ok:
                return True
    return False


def test_only_the_metrics_scraper_reaches_the_http_ports(api: KubeApi) -> None:
    policies = [
        p
        for ns in ("gpuledger", "gpuledger-agent")
        for p in api.get(f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies")["items"]
    ]
    assert {p["metadata"]["namespace"] for p in policies} == {"gpuledger", "gpuledger-agent"}
    pods = {name: _as_pod(w) for name, w in _workloads(api).items()}
    expected_ports = {
        "gpuledger-agent": 9109,
        "gpuledger-worker": 9108,
        "gpuledger-pods": 9110,
        "gpuledger-tokens": 9111,
    }
    monitoring = {**SCRAPER_NAMESPACE}
    for name, pod in pods.items():
        port = _ports(pod)["metrics"]
        assert port == expected_ports[name]

        def allowed(
            ns: dict[str, str],
            peer: dict[str, str],
            to_port: int = port,
            target: dict[str, Any] = pod,
        ) -> bool:
            return _ingress_allowed(policies, target, to_port, ns, peer)

        assert allowed(monitoring, SCRAPER), name
        assert not allowed(monitoring, SCRAPER, 8080), f"{name}: another port"
        assert not allowed(monitoring, {"app.kubernetes.io/name": "grafana"}), f"{name}: grafana"
        assert not allowed({"kubernetes.io/metadata.name": "search"}, SCRAPER), f"{name}: search"
        for neighbour, other in pods.items():
            other_ns = {"kubernetes.io/metadata.name": other["metadata"]["namespace"]}
            assert not allowed(other_ns, other["metadata"]["labels"]), f"{neighbour} -> {name}"


def test_the_network_policy_check_sees_an_open_policy(api: KubeApi) -> None:
    """The evaluator above is not blind: a policy that admits everyone is seen as such."""
    (worker,) = [_as_pod(w) for n, w in _workloads(api).items() if n == "gpuledger-worker"]
    open_policy = {
        "metadata": {"namespace": "gpuledger"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]},
    }
    assert _ingress_allowed([open_policy], worker, 9108, {"kubernetes.io/metadata.name": "x"}, {})
    assert _ingress_allowed([], worker, 9108, {"kubernetes.io/metadata.name": "x"}, {})

"""Tag enforcement on a real kube-apiserver: the shipped ValidatingAdmissionPolicy compiles and
type-checks against the Pod schema, and with each binding the API server itself rejects,
warns about and audits exactly the GPU pods without team and product labels (their own or
their namespace's), in every way a pod can be bound for a GPU node, and leaves system and
opted-out namespaces alone."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
from kube_apiserver import KubeApi, KubeApiServer, KubeRequestError
from kube_manifests import (
    GPU,
    MISSING_ANNOTATION,
    POLICY_NAME,
    TAGGED,
    eventually,
    install_cluster_prerequisites,
    pod,
    render,
    set_tag_enforcement,
    unique,
)

MESSAGE = (
    "pods on GPU nodes need the label(s) {missing} on the pod or its namespace, "
    "so gpuledger can attribute their GPU cost"
)
POLICY_PATH = f"/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies/{POLICY_NAME}"


@pytest.fixture(scope="module")
def api(kube_apiserver: KubeApiServer) -> Iterator[KubeApi]:
    """The API server with every shipped manifest applied (tag enforcement in audit mode, as
    `kubectl apply -k deploy/kubernetes` installs it); enforce mode is switched on per test."""
    admin = kube_apiserver.api
    install_cluster_prerequisites(admin)
    admin.apply(render("deploy/kubernetes"))
    yield admin
    set_tag_enforcement(admin, "audit", _namespace(admin, "probe"))


def _namespace(api: KubeApi, prefix: str, **labels: str) -> str:
    name = unique(prefix)
    api.create_namespace(name, labels)
    return name


@pytest.fixture
def enforce(api: KubeApi) -> KubeApi:
    set_tag_enforcement(api, "enforce", _namespace(api, "probe"))
    return api


@pytest.fixture
def audit(api: KubeApi) -> KubeApi:
    set_tag_enforcement(api, "audit", _namespace(api, "probe"))
    return api


def test_the_shipped_policy_compiles_on_the_server(api: KubeApi) -> None:
    """The API server compiled every expression when it accepted the policy (it refuses one
    that does not compile, below); the tests after this one run them against real pods."""
    (shipped,) = render("deploy/kubernetes/tag-enforcement/policy")
    stored = api.get(POLICY_PATH)
    assert stored["spec"]["matchConditions"] == shipped["spec"]["matchConditions"]
    assert stored["spec"]["variables"] == shipped["spec"]["variables"]
    assert stored["spec"]["validations"] == shipped["spec"]["validations"]
    assert stored["spec"]["auditAnnotations"] == shipped["spec"]["auditAnnotations"]


def test_the_server_refuses_a_policy_that_does_not_type_check(api: KubeApi) -> None:
    """cel-python accepted this audit annotation; the API server compiles the CEL itself."""
    (policy,) = render("deploy/kubernetes/tag-enforcement/policy")
    broken = copy.deepcopy(policy)
    broken["spec"]["auditAnnotations"][0]["valueExpression"] = (
        "size(variables.missing) == 0 ? null : variables.missing.join(',')"
    )
    with pytest.raises(KubeRequestError) as refused:
        api.apply([broken], dry_run=True)
    assert refused.value.response.status == 422
    assert "found no matching overload for '_?_:_'" in refused.value.response.message


GPU_ROUTES = {
    "gpu-limit": {"limits": GPU},
    "gpu-limit-and-request": {
        "limits": {"nvidia.com/gpu": "2"},
        "requests": {"nvidia.com/gpu": "2"},
    },
    "mig-instance": {"limits": {"nvidia.com/mig-1g.10gb": "1"}},
    "init-container": {"limits": {"cpu": "2"}, "init_limits": GPU},
    "runtime-class": {"runtime_class": "nvidia"},
    "selector-gpu-present": {"node_selector": {"nvidia.com/gpu.present": "true"}},
    "selector-gpu-product": {"node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
    "affinity-in": {
        "node_affinity": [
            {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H200"]}
        ]
    },
    "affinity-exists": {"node_affinity": [{"key": "nvidia.com/gpu.present", "operator": "Exists"}]},
    "affinity-count": {
        "node_affinity": [{"key": "nvidia.com/gpu.count", "operator": "Gt", "values": ["3"]}]
    },
}
OFF_GPU = {
    "no-resources": {},
    "cpu-only": {"limits": {"cpu": "2", "memory": "4Gi"}},
    "other-runtime": {"runtime_class": "gvisor", "node_selector": {"kubernetes.io/arch": "amd64"}},
    "affinity-away-from-gpus": {
        "node_affinity": [{"key": "nvidia.com/gpu.present", "operator": "DoesNotExist"}]
    },
}


@pytest.mark.parametrize("route", GPU_ROUTES.values(), ids=GPU_ROUTES.keys())
def test_enforce_rejects_untagged_pods_on_every_route_to_a_gpu(
    enforce: KubeApi, route: dict[str, Any]
) -> None:
    namespace = _namespace(enforce, "search")
    answer = enforce.create(pod(namespace, {"app": "vllm"}, **route))
    assert answer.status == 403, answer.body
    assert answer.body["reason"] == "Forbidden"
    assert (
        f"ValidatingAdmissionPolicy '{POLICY_NAME}' with binding '{POLICY_NAME}' denied request: "
        + MESSAGE.format(missing="team, product")
    ) in answer.message
    # ... and the same pod with its labels is created.
    tagged = enforce.create(pod(namespace, TAGGED, **route))
    assert tagged.status == 201, tagged.body


@pytest.mark.parametrize("route", OFF_GPU.values(), ids=OFF_GPU.keys())
def test_enforce_leaves_pods_off_gpu_nodes_alone(enforce: KubeApi, route: dict[str, Any]) -> None:
    answer = enforce.create(pod(_namespace(enforce, "batch"), **route))
    assert answer.status == 201, answer.body
    assert answer.warnings == []


@pytest.mark.parametrize(
    ("pod_labels", "namespace_labels", "missing"),
    [
        ({"team": "search"}, {}, "product"),
        ({"product": "assistant"}, {}, "team"),
        ({"team": "search", "product": ""}, {}, "product"),  # an empty value is no label
        ({"team": "search"}, {"product": ""}, "product"),
        ({}, {"team": "ads"}, "product"),
        (None, {}, "team, product"),
    ],
    ids=["no-product", "no-team", "empty-product", "empty-namespace-product", "ns-team", "none"],
)
def test_enforce_names_each_missing_label(
    enforce: KubeApi,
    pod_labels: dict[str, str] | None,
    namespace_labels: dict[str, str],
    missing: str,
) -> None:
    namespace = _namespace(enforce, "search", **namespace_labels)
    answer = enforce.create(pod(namespace, pod_labels, limits=GPU))
    assert answer.status == 403, answer.body
    assert MESSAGE.format(missing=missing) in answer.message


@pytest.mark.parametrize(
    ("pod_labels", "namespace_labels"),
    [
        (TAGGED, {}),
        ({"team": "search"}, {"product": "assistant"}),
        ({}, {"team": "ads", "product": "ranker"}),
    ],
    ids=["pod-labels", "split", "namespace-labels"],
)
def test_enforce_admits_pods_tagged_by_themselves_or_their_namespace(
    enforce: KubeApi, pod_labels: dict[str, str], namespace_labels: dict[str, str]
) -> None:
    namespace = _namespace(enforce, "search", **namespace_labels)
    answer = enforce.create(pod(namespace, pod_labels, limits=GPU))
    assert answer.status == 201, answer.body
    assert answer.warnings == []


@pytest.mark.parametrize(
    "namespace",
    ["kube-system", "gpu-operator", "nvidia-gpu-operator", "opted-out"],
)
def test_system_and_opted_out_namespaces_are_left_alone(enforce: KubeApi, namespace: str) -> None:
    if namespace == "opted-out":
        namespace = _namespace(enforce, "lab", **{"gpuledger.io/tag-enforcement": "disabled"})
    else:
        enforce.create_namespace(namespace)
    answer = enforce.create(pod(namespace, {"app": "driver"}, limits=GPU))
    assert answer.status == 201, answer.body
    assert answer.warnings == []


def test_opting_out_takes_the_namespace_label_only(enforce: KubeApi) -> None:
    """The opt-out is a namespace label: a pod can not opt itself out."""
    namespace = _namespace(enforce, "search")
    answer = enforce.create(
        pod(namespace, {"gpuledger.io/tag-enforcement": "disabled"}, limits=GPU)
    )
    assert answer.status == 403, answer.body


def _audit_annotations(server: KubeApiServer, namespace: str) -> dict[str, str]:
    """The annotations of the one pod creation audited in `namespace` (each test has its own)."""

    def logged() -> dict[str, str] | None:
        for event in server.audit_events():
            ref = event.get("objectRef") or {}
            if (
                ref.get("namespace") == namespace
                and ref.get("resource") == "pods"
                and event.get("verb") == "create"
                and event.get("stage") == "ResponseComplete"
            ):
                return dict(event.get("annotations") or {})
        return None

    return eventually(logged, f"the audit event of a pod created in {namespace}")


def test_audit_admits_untagged_pods_with_a_warning_and_the_audit_annotation(
    audit: KubeApi, kube_apiserver: KubeApiServer
) -> None:
    namespace = _namespace(audit, "search", team="search")
    untagged = pod(namespace, {"app": "vllm"}, runtime_class="nvidia")
    answer = audit.create(untagged)
    assert answer.status == 201, answer.body
    (warning,) = answer.warnings
    assert (
        f"Validation failed for ValidatingAdmissionPolicy '{POLICY_NAME}' with binding "
        f"'{POLICY_NAME}': " + MESSAGE.format(missing="product")
    ) in warning
    annotations = _audit_annotations(kube_apiserver, namespace)
    assert annotations[MISSING_ANNOTATION] == "product"
    assert "validation.policy.admission.k8s.io/validation_failure" in annotations


def test_audit_records_nothing_for_tagged_pods(
    audit: KubeApi, kube_apiserver: KubeApiServer
) -> None:
    namespace = _namespace(audit, "search")
    tagged = pod(namespace, TAGGED, limits=GPU)
    answer = audit.create(tagged)
    assert answer.status == 201 and answer.warnings == []
    annotations = _audit_annotations(kube_apiserver, namespace)
    assert MISSING_ANNOTATION not in annotations


def test_gpuledgers_own_agent_passes_its_own_policy(enforce: KubeApi) -> None:
    """The agent's DaemonSet pod, as the controller would create it, is admitted while
    enforcing (it uses the NVIDIA runtime and selects GPU nodes, so the policy sees it)."""
    (agent,) = (d for d in render("deploy/kubernetes") if d["kind"] == "DaemonSet")
    template = agent["spec"]["template"]
    as_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            **template["metadata"],
            "name": unique("gpuledger-agent"),
            "namespace": agent["metadata"]["namespace"],
        },
        "spec": template["spec"],
    }
    answer = enforce.create(as_pod, dry_run=True)
    assert answer.status == 201, answer.body
    assert not any(POLICY_NAME in w for w in answer.warnings)
    bare = copy.deepcopy(as_pod)
    bare["metadata"]["labels"] = {"app.kubernetes.io/name": "gpuledger-agent"}
    bare["metadata"]["namespace"] = _namespace(enforce, "agent")
    bare["spec"]["serviceAccountName"] = "default"
    refused = enforce.create(bare, dry_run=True)
    assert refused.status == 403, refused.body
    assert MESSAGE.format(missing="team, product") in refused.message

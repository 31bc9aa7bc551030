"""Tag enforcement, the fast check: the ValidatingAdmissionPolicy's CEL (match conditions,
variables, validation, audit annotation) evaluated with cel-python against sample pods, in
milliseconds, and the enforce / audit-only bindings read as YAML.

cel-python is more lenient than the API server (it accepted an audit annotation that
kube-apiserver refuses to compile): the proof is test_tag_enforcement_apiserver.py, where a real
kube-apiserver compiles the policy and admits or rejects the same pods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import celpy
import pytest
import yaml
from celpy import celtypes
from deploy_tools import REPO

ENFORCEMENT = REPO / "deploy" / "kubernetes" / "tag-enforcement"
POLICY = yaml.safe_load((ENFORCEMENT / "policy" / "policy.yaml").read_text())
_ENV = celpy.Environment()


def _join(items: celtypes.ListType, separator: celtypes.StringType) -> celtypes.StringType:
    """Kubernetes' CEL string library: `list.join(separator)`."""
    return celtypes.StringType(str(separator).join(str(i) for i in items))


def evaluate(expression: str, activation: dict[str, Any]) -> Any:
    program = _ENV.program(_ENV.compile(expression), functions={"join": _join})
    return program.evaluate(activation)


@dataclass(frozen=True)
class Admission:
    matched: bool
    allowed: bool
    message: str | None
    audit: str | None


def admit(pod: dict[str, Any], namespace_labels: dict[str, str] | None = None) -> Admission:
    """What the API server does with `pod` under the policy (before the binding's action)."""
    spec = POLICY["spec"]
    namespace = {"metadata": {"name": pod["metadata"].get("namespace", "default")}}
    if namespace_labels is not None:
        namespace["metadata"]["labels"] = namespace_labels
    activation: dict[str, Any] = {
        "object": celpy.json_to_cel(pod),
        "namespaceObject": celpy.json_to_cel(namespace),
    }
    for condition in spec["matchConditions"]:
        if not evaluate(condition["expression"], activation):
            return Admission(False, True, None, None)
    variables: dict[celtypes.StringType, Any] = {}
    for variable in spec["variables"]:
        activation["variables"] = celtypes.MapType(variables)
        variables[celtypes.StringType(variable["name"])] = evaluate(
            variable["expression"], activation
        )
    activation["variables"] = celtypes.MapType(variables)
    allowed, message = True, None
    for validation in spec["validations"]:
        if not evaluate(validation["expression"], activation):
            allowed = False
            message = str(evaluate(validation["messageExpression"], activation))
    (annotation,) = spec["auditAnnotations"]
    audit = evaluate(annotation["valueExpression"], activation)
    # The API server omits an annotation whose value is null or empty.
    return Admission(True, allowed, message, str(audit) if audit else None)


def pod(
    labels: dict[str, str] | None = None,
    *,
    limits: dict[str, str] | None = None,
    requests: dict[str, str] | None = None,
    init_limits: dict[str, str] | None = None,
    runtime_class: str | None = None,
    node_selector: dict[str, str] | None = None,
    node_affinity: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    def container(name: str, lim: dict[str, str] | None, req: dict[str, str] | None) -> Any:
        c: dict[str, Any] = {"name": name, "image": "vllm/vllm-openai:v0.6.0"}
        resources = {k: v for k, v in (("limits", lim), ("requests", req)) if v}
        if resources:
            c["resources"] = resources
        return c

    spec: dict[str, Any] = {"containers": [container("server", limits, requests)]}
    if init_limits:
        spec["initContainers"] = [container("warmup", init_limits, None)]
    if runtime_class:
        spec["runtimeClassName"] = runtime_class
    if node_selector:
        spec["nodeSelector"] = node_selector
    if node_affinity is not None:
        required = {"nodeSelectorTerms": [{"matchExpressions": node_affinity}]}
        spec["affinity"] = {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}
        }
    metadata: dict[str, Any] = {"name": "vllm-0", "namespace": "search"}
    if labels is not None:
        metadata["labels"] = labels
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


GPU = {"nvidia.com/gpu": "1"}
TAGGED = {"team": "search", "product": "assistant"}


def test_a_tagged_gpu_pod_is_admitted() -> None:
    result = admit(pod(TAGGED, limits=GPU))
    assert result == Admission(True, True, None, None)


def test_an_untagged_gpu_pod_is_rejected_with_the_missing_labels() -> None:
    result = admit(pod({"app": "vllm"}, limits=GPU), {})
    assert result.matched and not result.allowed
    assert result.message is not None
    assert result.message.startswith("pods on GPU nodes need the label(s) team, product")
    assert result.audit == "team,product"


def test_pod_without_any_labels_is_rejected() -> None:
    result = admit(pod(None, limits=GPU))
    assert not result.allowed and result.audit == "team,product"


@pytest.mark.parametrize(
    ("labels", "namespace_labels", "missing"),
    [
        ({"team": "search"}, {}, "product"),
        ({"product": "assistant"}, None, "team"),
        ({"team": "search", "product": ""}, {}, "product"),  # an empty value is no label
        ({"team": "search"}, {"product": ""}, "product"),
    ],
)
def test_each_missing_label_is_named(
    labels: dict[str, str], namespace_labels: dict[str, str] | None, missing: str
) -> None:
    result = admit(pod(labels, limits=GPU), namespace_labels)
    assert not result.allowed and result.audit == missing
    assert result.message is not None and f"label(s) {missing} on" in result.message


def test_namespace_labels_count_as_gpuledger_resolves_them() -> None:
    assert admit(pod({"team": "search"}, limits=GPU), {"product": "assistant"}).allowed
    assert admit(pod({}, limits=GPU), {"team": "ads", "product": "ranker"}).allowed


@pytest.mark.parametrize(
    "gpu_pod",
    [
        pod({}, limits={"nvidia.com/mig-1g.10gb": "1"}),
        pod({}, requests={"nvidia.com/gpu": "2"}),
        pod({}, limits={"cpu": "2"}, init_limits=GPU),
        pod({}, runtime_class="nvidia"),
        pod({}, node_selector={"nvidia.com/gpu.present": "true"}),
        pod({}, node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}),
        pod({}, node_affinity=[{"key": "nvidia.com/gpu.present", "operator": "Exists"}]),
        pod({}, node_affinity=[{"key": "nvidia.com/gpu.count", "operator": "Gt", "values": ["3"]}]),
    ],
    ids=[
        "mig-limit",
        "gpu-request",
        "init-container",
        "runtime-class",
        "gpu-present",
        "product",
        "affinity-exists",
        "affinity-count",
    ],
)
def test_every_way_onto_a_gpu_node_is_matched(gpu_pod: dict[str, Any]) -> None:
    result = admit(gpu_pod, {})
    assert result.matched and not result.allowed


@pytest.mark.parametrize(
    "cpu_pod",
    [
        pod({}),
        pod({}, limits={"cpu": "2", "memory": "4Gi"}),
        pod({}, runtime_class="gvisor", node_selector={"kubernetes.io/arch": "amd64"}),
        pod({}, node_affinity=[{"key": "nvidia.com/gpu.present", "operator": "DoesNotExist"}]),
        pod(
            {}, node_affinity=[{"key": "kubernetes.io/arch", "operator": "In", "values": ["arm64"]}]
        ),
    ],
    ids=["no-resources", "cpu-only", "other-runtime", "affinity-away", "affinity-other"],
)
def test_pods_off_gpu_nodes_are_not_matched(cpu_pod: dict[str, Any]) -> None:
    assert admit(cpu_pod, {}) == Admission(False, True, None, None)


def test_gpuledgers_own_agent_passes_its_own_policy() -> None:
    docs = {
        (d["kind"], d["metadata"]["name"]): d
        for p in (REPO / "deploy" / "kubernetes" / "base").glob("*.yaml")
        for d in yaml.safe_load_all(p.read_text())
        if isinstance(d, dict) and "metadata" in d
    }
    daemonset = docs[("DaemonSet", "gpuledger-agent")]
    agent, namespace = daemonset["spec"]["template"], daemonset["metadata"]["namespace"]
    namespace_labels = docs[("Namespace", namespace)]["metadata"]["labels"]
    as_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**agent["metadata"], "namespace": namespace},
        "spec": agent["spec"],
    }
    result = admit(as_pod, namespace_labels)
    assert result.matched, "the agent uses the NVIDIA runtime, so the policy sees it"
    assert result.allowed
    # ... and would be rejected without the labels on its pod template and namespace.
    bare = {**as_pod, "metadata": {"name": "agent", "namespace": namespace}}
    assert not admit(bare, {}).allowed


def _binding(mode: str) -> dict[str, Any]:
    binding: dict[str, Any] = yaml.safe_load((ENFORCEMENT / mode / "binding.yaml").read_text())
    return binding


def test_enforce_denies_and_audit_only_warns_and_audits() -> None:
    enforce, audit = _binding("enforce"), _binding("audit")
    for mode, binding in (("enforce", enforce), ("audit", audit)):
        assert binding["spec"]["policyName"] == POLICY["metadata"]["name"]
        kustomization = yaml.safe_load((ENFORCEMENT / mode / "kustomization.yaml").read_text())
        assert kustomization["resources"] == ["../policy", "binding.yaml"]
    assert enforce["spec"]["validationActions"] == ["Deny"]
    assert sorted(audit["spec"]["validationActions"]) == ["Audit", "Warn"]
    assert "Deny" not in audit["spec"]["validationActions"]
    top = yaml.safe_load((REPO / "deploy" / "kubernetes" / "kustomization.yaml").read_text())
    assert "tag-enforcement/audit" in top["resources"], "install in audit-only mode first"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        if expr["operator"] == "NotIn" and value in expr["values"]:
            return False
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_system_and_opted_out_namespaces_are_left_alone(mode: str) -> None:
    selector = _binding(mode)["spec"]["matchResources"]["namespaceSelector"]

    def ns(name: str, **labels: str) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": name, **labels}

    assert _selects(selector, ns("search"))
    assert _selects(selector, ns("gpuledger", team="platform"))
    assert not _selects(selector, ns("kube-system"))
    assert not _selects(selector, ns("gpu-operator"))
    assert not _selects(selector, ns("lab", **{"gpuledger.io/tag-enforcement": "disabled"}))


def test_the_policy_applies_to_pod_creation_and_fails_closed() -> None:
    spec = POLICY["spec"]
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["pods"] and rule["operations"] == ["CREATE"]
    assert spec["failurePolicy"] == "Fail"
    assert POLICY["apiVersion"] == "admissionregistration.k8s.io/v1"

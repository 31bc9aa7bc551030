"""The shipped Kubernetes manifests on the test harness's real kube-apiserver: rendered with
kustomize, applied server-side, and tag enforcement switched between its two bindings."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import yaml
from deploy_tools import REPO, kustomize_command
from kube_apiserver import KubeApi, Response

POLICY_NAME = "gpuledger-require-cost-labels"
MISSING_ANNOTATION = f"{POLICY_NAME}/missing-cost-labels"
GPU = {"nvidia.com/gpu": "1"}
TAGGED = {"team": "search", "product": "assistant"}
# What the GPU operator installs on a GPU cluster (pods naming an absent RuntimeClass are refused).
RUNTIME_CLASSES = ("nvidia", "gvisor")

T = TypeVar("T")


def render(path: str) -> list[dict[str, Any]]:
    """`kustomize build deploy/kubernetes/...`, as objects."""
    result = subprocess.run(
        [*kustomize_command(), str(REPO / path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"kustomize {path}: {result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def eventually(probe: Callable[[], T | None], what: str, timeout_s: float = 30.0) -> T:
    """`probe()`'s first answer that is not None, within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = probe()
        if answer is not None:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.2)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def pod(
    namespace: str,
    labels: Mapping[str, str] | None = None,
    *,
    name: str | None = None,
    limits: Mapping[str, str] | None = None,
    requests: Mapping[str, str] | None = None,
    init_limits: Mapping[str, str] | None = None,
    runtime_class: str | None = None,
    node_selector: Mapping[str, str] | None = None,
    node_affinity: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """An inference server pod, bound for a GPU node in the ways the policy claims to see."""

    def container(cname: str, lim: Mapping[str, str] | None, req: Mapping[str, str] | None) -> Any:
        c: dict[str, Any] = {"name": cname, "image": "vllm/vllm-openai:v0.6.0"}
        resources = {k: dict(v) for k, v in (("limits", lim), ("requests", req)) if v}
        if resources:
            c["resources"] = resources
        return c

    spec: dict[str, Any] = {"containers": [container("server", limits, requests)]}
    if init_limits:
        spec["initContainers"] = [container("warmup", init_limits, None)]
    if runtime_class:
        spec["runtimeClassName"] = runtime_class
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if node_affinity is not None:
        spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": node_affinity}]
                }
            }
        }
    metadata: dict[str, Any] = {"name": name or unique("vllm"), "namespace": namespace}
    if labels is not None:
        metadata["labels"] = dict(labels)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def install_cluster_prerequisites(api: KubeApi) -> None:
    api.apply(
        [
            {
                "apiVersion": "node.k8s.io/v1",
                "kind": "RuntimeClass",
                "metadata": {"name": name},
                "handler": name,
            }
            for name in RUNTIME_CLASSES
        ]
    )


def set_tag_enforcement(api: KubeApi, mode: str, probe_namespace: str) -> None:
    """Apply tag-enforcement/<mode> (the policy and that binding) and wait until the API
    server acts on it: an untagged GPU pod is denied (enforce) or warned about (audit)."""
    api.apply(render(f"deploy/kubernetes/tag-enforcement/{mode}"))

    def in_effect() -> Response | None:
        answer = api.create(pod(probe_namespace, limits=GPU), dry_run=True)
        if mode == "enforce":
            return answer if answer.status == 403 else None
        warned = any(POLICY_NAME in w for w in answer.warnings)
        return answer if answer.status == 201 and warned else None

    eventually(in_effect, f"tag enforcement in {mode} mode")

"""What the outside world would show of a `Scenario` at time t: `/proc/<pid>/cgroup` text,
Kubernetes Pod and Namespace objects as the API server returns them, `PodInfo` payloads, and the
Prometheus text pages of the inference servers (vLLM, SGLang, TGI, Triton) in each one's real
metric names.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from agents.scenario import InferenceSpec, PodSpec, ProcessSpec, Scenario
from schemas.events import PodInfo

# --- /proc/<pid>/cgroup ------------------------------------------------------------------------


def cgroup_text(process: ProcessSpec) -> str:
    """The cgroup file of a process, in the driver/runtime layout the scenario gives it."""
    if process.pod_uid is None:
        return "0::/system.slice/containerd.service\n"
    uid = process.pod_uid
    cid = process.container_id or "0" * 64
    under = uid.replace("-", "_")
    style = process.cgroup_style
    if style == "systemd-crio":
        return (
            "0::/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{under}.slice/crio-{cid}.scope\n"
        )
    if style == "cgroupfs-v2":
        return f"0::/kubepods/burstable/pod{uid}/{cid}\n"
    if style == "cgroupfs-v1":
        return (
            "".join(
                f"{n}:{c}:/kubepods/besteffort/pod{uid}/{cid}\n"
                for n, c in ((12, "pids"), (5, "memory"), (3, "cpu,cpuacct"))
            )
            + "1:name=systemd:/kubepods/besteffort/pod"
            + f"{uid}/{cid}\n"
        )
    if style == "systemd-guaranteed":
        return f"0::/kubepods.slice/kubepods-pod{under}.slice/cri-containerd-{cid}.scope\n"
    return (
        "0::/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{under}.slice/cri-containerd-{cid}.scope\n"
    )


def cgroup_reader(scenario: Scenario) -> Any:
    """A `CgroupReader` over the scenario's processes (None for unknown pids, like a gone one)."""
    by_pid = {p.pid: p for p in scenario.processes}

    def read(pid: int) -> str | None:
        process = by_pid.get(pid)
        return cgroup_text(process) if process is not None else None

    return read


# --- Kubernetes objects -------------------------------------------------------------------------


def _rfc3339(unix_s: float) -> str:
    return datetime.fromtimestamp(int(unix_s), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def namespace_object(scenario: Scenario, name: str, resource_version: str = "1") -> dict[str, Any]:
    labels = {"kubernetes.io/metadata.name": name, **scenario.namespace_labels(name)}
    return {
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "uid": f"ns-{name}",
            "resourceVersion": resource_version,
            "creationTimestamp": _rfc3339(scenario.start_unix_s),
            "labels": labels,
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def pod_object(scenario: Scenario, pod: PodSpec, resource_version: str = "1") -> dict[str, Any]:
    annotations: dict[str, str] = {}
    containers: list[dict[str, Any]] = [{"name": "main", "image": "registry.example/app:1"}]
    if pod.inference is not None:
        inf = pod.inference
        annotations = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(inf.port),
            "prometheus.io/path": inf.path,
            "gpuledger.io/model": inf.model,  # for servers whose metrics carry no model label
        }
        containers = [
            {
                "name": inf.server,
                "image": f"registry.example/{inf.server}:latest",
                "ports": [{"containerPort": inf.port, "protocol": "TCP"}],
                "resources": {"limits": {"nvidia.com/gpu": "1"}},
            }
        ]
    ids = sorted(
        {p.container_id for p in scenario.processes if p.pod_uid == pod.uid and p.container_id}
    )
    statuses = [
        {
            "name": containers[0]["name"],
            "ready": True,
            "restartCount": 0,
            "containerID": f"containerd://{cid}",
            "state": {"running": {"startedAt": _rfc3339(scenario.start_unix_s + pod.start_s)}},
        }
        for cid in ids[:1]
    ]
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": pod.name,
            "namespace": pod.namespace,
            "uid": pod.uid,
            "resourceVersion": resource_version,
            "creationTimestamp": _rfc3339(scenario.start_unix_s + pod.start_s),
            "labels": dict(pod.labels),
            "annotations": annotations,
        },
        "spec": {"nodeName": pod.node, "containers": containers, "restartPolicy": "Always"},
        "status": {
            "phase": "Running",
            "podIP": pod.ip,
            "podIPs": [{"ip": pod.ip}],
            "containerStatuses": statuses,
        },
    }


def pod_infos(scenario: Scenario, t: float) -> list[PodInfo]:
    """The `io.gpuledger.pod.v1` payloads of every pod alive at scenario time t."""
    return [
        PodInfo(
            cluster=scenario.cluster,
            uid=p.uid,
            namespace=p.namespace,
            name=p.name,
            node=p.node,
            labels=dict(p.labels),
            namespace_labels=dict(scenario.namespace_labels(p.namespace)),
            deleted=False,
        )
        for p in scenario.pods_at(t)
    ]


# --- inference /metrics pages -------------------------------------------------------------------


def _counters(inf: InferenceSpec, pod: PodSpec, t: float) -> tuple[float, float, float, float]:
    """Cumulative (prompt, completion, requests, seconds served) since the server (re)started."""
    since = pod.start_s
    if inf.restart_at_s is not None and t >= inf.restart_at_s:
        since = inf.restart_at_s
    served = max(0.0, t - since)
    # A slow wave keeps deltas uneven, as real traffic is.
    load = served + 3.0 * (1 - math.cos(served / 11.0))
    return (
        math.floor(inf.prompt_tokens_per_s * load),
        math.floor(inf.completion_tokens_per_s * load),
        math.floor(inf.requests_per_s * load),
        served,
    )


def metrics_page(scenario: Scenario, pod: PodSpec, t: float) -> str:
    """The Prometheus text page the pod's inference server would serve at scenario time t."""
    inf = pod.inference
    if inf is None:
        return ""
    prompt, completion, requests, served = _counters(inf, pod, t)
    started = scenario.start_unix_s + (
        inf.restart_at_s if inf.restart_at_s is not None and t >= inf.restart_at_s else pod.start_s
    )
    head = (
        "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n"
        "# TYPE process_start_time_seconds gauge\n"
        f"process_start_time_seconds {started:.2f}\n"
    )
    render = {"vllm": _vllm, "sglang": _sglang, "tgi": _tgi, "triton": _triton}[inf.server]
    return head + render(inf, prompt, completion, requests, served)


def _vllm(inf: InferenceSpec, prompt: float, completion: float, requests: float, _: float) -> str:
    labels = f'engine="0",model_name="{inf.model}"'
    cached = math.floor(prompt * inf.cached_fraction)
    stop = math.floor(requests * 0.9)
    prefill_s = prompt / 9000.0
    decode_s = completion / 45.0 / 8
    return (
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n"
        "# TYPE vllm:prompt_tokens_total counter\n"
        f"vllm:prompt_tokens_total{{{labels}}} {prompt:.1f}\n"
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
        "# TYPE vllm:generation_tokens_total counter\n"
        f"vllm:generation_tokens_total{{{labels}}} {completion:.1f}\n"
        "# HELP vllm:request_success_total Count of successfully processed requests.\n"
        "# TYPE vllm:request_success_total counter\n"
        f'vllm:request_success_total{{{labels},finished_reason="stop"}} {stop:.1f}\n'
        f'vllm:request_success_total{{{labels},finished_reason="length"}} {requests - stop:.1f}\n'
        f'vllm:request_success_total{{{labels},finished_reason="abort"}} 0.0\n'
        "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached "
        "tokens.\n"
        "# TYPE vllm:prefix_cache_hits_total counter\n"
        f"vllm:prefix_cache_hits_total{{{labels}}} {cached:.1f}\n"
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f"vllm:num_requests_running{{{labels}}} 3.0\n"
        + _histogram("vllm:request_prefill_time_seconds", labels, prefill_s, requests)
        + _histogram("vllm:request_decode_time_seconds", labels, decode_s, requests)
    )


def _histogram(name: str, labels: str, total: float, count: float) -> str:
    return (
        f"# HELP {name} Histogram.\n# TYPE {name} histogram\n"
        f'{name}_bucket{{{labels},le="1.0"}} {math.floor(count * 0.7):.1f}\n'
        f'{name}_bucket{{{labels},le="+Inf"}} {count:.1f}\n'
        f"{name}_count{{{labels}}} {count:.1f}\n"
        f"{name}_sum{{{labels}}} {total!r}\n"
    )


def _sglang(inf: InferenceSpec, prompt: float, completion: float, requests: float, _: float) -> str:
    labels = f'model_name="{inf.model}"'
    cached = math.floor(prompt * inf.cached_fraction)
    return (
        "# HELP sglang:prompt_tokens_total Number of prefill tokens processed.\n"
        "# TYPE sglang:prompt_tokens_total counter\n"
        f"sglang:prompt_tokens_total{{{labels}}} {prompt:e}\n"
        "# HELP sglang:generation_tokens_total Number of generation tokens processed.\n"
        "# TYPE sglang:generation_tokens_total counter\n"
        f"sglang:generation_tokens_total{{{labels}}} {completion:e}\n"
        "# HELP sglang:cached_tokens_total Number of cached prompt tokens.\n"
        "# TYPE sglang:cached_tokens_total counter\n"
        f"sglang:cached_tokens_total{{{labels}}} {cached:e}\n"
        "# HELP sglang:num_requests_total Number of requests processed.\n"
        "# TYPE sglang:num_requests_total counter\n"
        f"sglang:num_requests_total{{{labels}}} {requests:e}\n"
        "# HELP sglang:token_usage The token usage\n# TYPE sglang:token_usage gauge\n"
        f"sglang:token_usage{{{labels}}} 0.28\n"
    )


def _tgi(_: InferenceSpec, prompt: float, completion: float, requests: float, __: float) -> str:
    # TGI (Rust metrics-exporter-prometheus) has no model label and no `_total` suffix.
    def hist(name: str, total: float) -> str:
        return (
            f"# TYPE {name} histogram\n"
            f'{name}_bucket{{le="+Inf"}} {requests:.0f}\n'
            f"{name}_sum {total:.0f}\n{name}_count {requests:.0f}\n"
        )

    return (
        f"# TYPE tgi_request_count counter\ntgi_request_count {requests:.0f}\n"
        f"# TYPE tgi_request_success counter\ntgi_request_success {requests:.0f}\n"
        + hist("tgi_request_input_length", prompt)
        + hist("tgi_request_generated_tokens", completion)
        + "# TYPE tgi_queue_size gauge\ntgi_queue_size 0\n"
    )


def _triton(inf: InferenceSpec, _: float, __: float, requests: float, served: float) -> str:
    labels = f'model="{inf.model}",version="1"'
    return (
        "# HELP nv_inference_request_success Number of successful inference requests, all batch "
        "sizes\n# TYPE nv_inference_request_success counter\n"
        f"nv_inference_request_success{{{labels}}} {requests:.0f}\n"
        "# HELP nv_inference_request_failure Number of failed inference requests, all batch "
        "sizes\n# TYPE nv_inference_request_failure counter\n"
        f'nv_inference_request_failure{{{labels},reason="OTHER"}} 0\n'
        "# HELP nv_inference_count Number of inferences performed\n"
        "# TYPE nv_inference_count counter\n"
        f"nv_inference_count{{{labels}}} {requests * 4:.0f}\n"
        "# HELP nv_inference_compute_infer_duration_us Cumulative compute inference duration in "
        "microseconds\n# TYPE nv_inference_compute_infer_duration_us counter\n"
        f"nv_inference_compute_infer_duration_us{{{labels}}} {served * 350_000:.0f}\n"
    )

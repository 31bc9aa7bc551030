"""The GPU requests a pod's events carry: Kubernetes' effective request of each `nvidia.com/`
resource, nothing once the pod finished, and an event only when they change."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from agents.pod_state import PodState, gpu_requests

NOW = 1_795_000_000_000
GPU = "nvidia.com/gpu"
MIG = "nvidia.com/mig-3g.40gb"


def container(
    name: str, requests: dict[str, str] | None = None, limits: dict[str, str] | None = None
) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if requests is not None:
        resources["requests"] = requests
    if limits is not None:
        resources["limits"] = limits
    return {"name": name, "image": "vllm", "resources": resources}


def pod(
    containers: list[dict[str, Any]],
    init: list[dict[str, Any]] | None = None,
    *,
    phase: str = "Running",
    rv: str = "10",
    name: str = "vllm-0",
    node: str = "gpu-node-1",
) -> dict[str, Any]:
    spec: dict[str, Any] = {"nodeName": node, "containers": containers}
    if init is not None:
        spec["initContainers"] = init
    return {
        "metadata": {
            "uid": f"uid-{name}",
            "namespace": "search",
            "name": name,
            "resourceVersion": rv,
            "creationTimestamp": "2026-11-20T09:14:03Z",
            "labels": {"team": "search"},
        },
        "spec": spec,
        "status": {"phase": phase},
    }


def test_a_limit_alone_is_the_request() -> None:
    assert gpu_requests(pod([container("c", limits={GPU: "1"})])) == {GPU: 1}
    assert gpu_requests(pod([container("c", {GPU: "2"})])) == {GPU: 2}


def test_a_request_wins_over_a_limit() -> None:
    assert gpu_requests(pod([container("c", {GPU: "1"}, {GPU: "2"})])) == {GPU: 1}


def test_app_containers_add_up_and_other_resources_are_not_gpus() -> None:
    spec = pod(
        [
            container("a", {GPU: "2", "cpu": "4", "memory": "64Gi"}),
            container("b", {GPU: "1", MIG: "1", "amd.com/gpu": "1"}),
            container("sidecar", {"cpu": "100m"}),
        ]
    )
    assert gpu_requests(spec) == {GPU: 3, MIG: 1}


def test_the_largest_init_container_counts_when_it_is_above_the_app_containers() -> None:
    init = [container("fetch", {GPU: "4"}), container("warm", {GPU: "2", MIG: "2"})]
    spec = pod([container("a", {GPU: "1"}), container("b", {GPU: "1", MIG: "1"})], init)
    assert gpu_requests(spec) == {GPU: 4, MIG: 2}


def test_sidecars_add_to_the_app_containers_and_to_later_init_containers() -> None:
    sidecar = {**container("proxy", {GPU: "1"}), "restartPolicy": "Always"}
    spec = pod([container("a", {GPU: "1"})], [container("first", {GPU: "1"}), sidecar,
                                              container("later", {GPU: "2"})])  # fmt: skip
    assert gpu_requests(spec) == {GPU: 3}  # later + proxy; app phase: a + proxy = 2


def test_a_finished_pod_holds_nothing() -> None:
    for phase in ("Succeeded", "Failed"):
        assert gpu_requests(pod([container("c", {GPU: "1"})], phase=phase)) == {}
    for phase in ("Pending", "Running", "Unknown"):
        assert gpu_requests(pod([container("c", {GPU: "1"})], phase=phase)) == {GPU: 1}


def test_unreadable_zero_and_absurd_counts_are_left_out() -> None:
    spec = pod([container("c", {GPU: "lots", MIG: "0", "nvidia.com/gpu.shared": "99999"})])
    assert gpu_requests(spec) == {}
    assert gpu_requests({"metadata": {}, "spec": {}}) == {}
    assert gpu_requests(pod([container("c", {GPU: "1.5"})])) == {GPU: 2}  # rounded up


names = st.sampled_from([GPU, MIG, "nvidia.com/gpu.shared", "cpu"])
amounts = st.dictionaries(names, st.integers(0, 8), max_size=3)


@st.composite
def containers(draw: st.DrawFn, prefix: str) -> list[tuple[dict[str, Any], dict[str, int]]]:
    """Containers and the count each holds: its request, or without one its limit."""
    out = []
    for i in range(draw(st.integers(0, 4))):
        requests = draw(amounts)
        limits = draw(amounts)
        held = {**limits, **requests}
        resources = {
            "requests": {k: str(v) for k, v in requests.items()},
            "limits": {k: str(v) for k, v in limits.items()},
        }
        out.append(({"name": f"{prefix}{i}", "resources": resources}, held))
    return out


@given(containers("app"), containers("init"))
def test_effective_request_is_the_larger_of_app_sum_and_largest_init(
    app: list[tuple[dict[str, Any], dict[str, int]]],
    init: list[tuple[dict[str, Any], dict[str, int]]],
) -> None:
    got = gpu_requests(pod([c for c, _ in app], [c for c, _ in init]))
    for name in (GPU, MIG, "nvidia.com/gpu.shared"):
        app_sum = sum(held.get(name, 0) for _, held in app)
        init_max = max((held.get(name, 0) for _, held in init), default=0)
        assert got.get(name, 0) == max(app_sum, init_max)
    assert "cpu" not in got and all(count > 0 for count in got.values())


# --- events ------------------------------------------------------------------------------------


def test_a_gpu_pod_publishes_its_requests_and_then_that_it_finished() -> None:
    state = PodState("prod")
    running = pod([container("c", {GPU: "1"}, {GPU: "1"})], phase="Pending")
    (added,) = state.apply_pod("ADDED", running, NOW)
    assert added.info.gpu_requests == {GPU: 1} and added.time_ms == 1_795_166_043_000
    later = copy.deepcopy(running)
    later["status"]["phase"], later["metadata"]["resourceVersion"] = "Running", "11"
    assert state.apply_pod("MODIFIED", later, NOW + 1) == []  # status churn: same requests
    done = copy.deepcopy(later)
    done["status"]["phase"], done["metadata"]["resourceVersion"] = "Succeeded", "12"
    (finished,) = state.apply_pod("MODIFIED", done, NOW + 2)
    assert (finished.kind, finished.time_ms, finished.info.gpu_requests) == ("updated", NOW + 2, {})
    assert finished.event_id == "uid-vllm-0:12:"
    (deleted,) = state.apply_pod("DELETED", done, NOW + 3)
    assert deleted.info.deleted and deleted.info.gpu_requests == {}


def test_a_running_gpu_pod_deleted_says_what_it_held_until_then() -> None:
    state = PodState("prod")
    running = pod([container("c", {MIG: "1"})])
    state.apply_pod("ADDED", running, NOW)
    (deleted,) = state.apply_pod("DELETED", running, NOW + 5)
    assert deleted.info.deleted and deleted.info.gpu_requests == {MIG: 1}


@given(st.lists(st.sampled_from(["Pending", "Running", "Succeeded", "Failed", "Unknown"])))
def test_a_pod_without_gpu_requests_publishes_no_more_than_before(phases: list[str]) -> None:
    state = PodState("prod")
    out = []
    for rv, phase in enumerate(phases):
        out += state.apply_pod("MODIFIED", pod([container("c", {"cpu": "1"})], phase=phase,
                                               rv=str(rv)), NOW + rv)  # fmt: skip
    assert [e.kind for e in out] == (["added"] if phases else [])
    assert all(e.info.gpu_requests == {} for e in out)


def test_recorded_api_pods_publish_the_gpu_they_were_granted() -> None:
    from kube_api import recorded

    state = PodState("prod")
    state.resync_namespaces(recorded("namespacelist.json")["items"], NOW)
    emissions = state.resync_pods(recorded("podlist.json")["items"], NOW)
    assert [e.info.gpu_requests for e in emissions] == [{GPU: 1}, {GPU: 1}]

"""The GPU capacity node events carry: every `nvidia.com/` resource of the node's capacity, as
time-slicing and MIG report them, and an event when it changes."""

from __future__ import annotations

from test_node_state import NOW, node

from agents.node_state import NodeState

TIME_SLICED = {
    "cpu": "96",
    "memory": "1056Gi",
    "nvidia.com/gpu": "32",  # 8 GPUs x 4 replicas
    "nvidia.com/gpu.shared": "0",
    "ephemeral-storage": "7Ti",
    "pods": "110",
}
MIG_MIXED = {
    "cpu": "96",
    "memory": "1056Gi",
    "nvidia.com/gpu": "4",
    "nvidia.com/mig-1g.10gb": "14",
    "nvidia.com/mig-3g.40gb": "4",
    "amd.com/gpu": "2",
}


def test_a_time_sliced_node_reports_gpus_times_replicas() -> None:
    (first,) = NodeState("prod").apply_node("ADDED", node(status__capacity=TIME_SLICED), NOW)
    assert first.info.gpu_capacity == {"nvidia.com/gpu": 32}  # 0 is no capacity
    assert first.info.gpus == 32  # as the API reports it


def test_mig_mixed_lists_each_profile_and_nothing_else() -> None:
    (first,) = NodeState("prod").apply_node("ADDED", node(status__capacity=MIG_MIXED), NOW)
    assert first.info.gpu_capacity == {
        "nvidia.com/gpu": 4,
        "nvidia.com/mig-1g.10gb": 14,
        "nvidia.com/mig-3g.40gb": 4,
    }


def test_a_node_without_gpus_has_no_gpu_capacity_and_unreadable_ones_are_left_out() -> None:
    (cpu_only,) = NodeState("prod").apply_node(
        "ADDED", node(status__capacity={"cpu": "4", "memory": "16Gi"}), NOW
    )
    assert cpu_only.info.gpu_capacity == {}
    capacity = {**MIG_MIXED, "nvidia.com/mig-1g.10gb": "lots", "nvidia.com/gpu": "1e9"}
    (bad,) = NodeState("prod").apply_node("ADDED", node(status__capacity=capacity), NOW)
    assert bad.info.gpu_capacity == {"nvidia.com/mig-3g.40gb": 4}


def test_a_capacity_change_is_news() -> None:
    state = NodeState("prod")
    state.apply_node("ADDED", node(status__capacity=MIG_MIXED), NOW)
    assert state.apply_node("MODIFIED", node(rv="101", status__capacity=MIG_MIXED), NOW + 1) == []
    repartitioned = {**MIG_MIXED, "nvidia.com/mig-1g.10gb": "7", "nvidia.com/mig-3g.40gb": "6"}
    (changed,) = state.apply_node("MODIFIED", node(rv="102", status__capacity=repartitioned), NOW)
    assert changed.kind == "updated"
    assert changed.info.gpu_capacity["nvidia.com/mig-1g.10gb"] == 7
    assert changed.info.gpus == 4  # the whole-GPU count did not move: only the profiles did

"""The pod watcher's node state: what is news (a node appearing, its identity or capacity
changing, its deletion), what is not (heartbeats), and unreadable quantities published as 0 and
logged once per node."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest

from agents.node_state import NodeState

CREATED = "2026-11-01T08:00:00Z"
CREATED_MS = 1_793_520_000_000
NOW = 1_795_000_000_000


def node(name: str = "gpu-node-1", rv: str = "100", **changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "resourceVersion": rv,
            "creationTimestamp": CREATED,
            "labels": {"node.kubernetes.io/instance-type": "p5.48xlarge"},
        },
        "spec": {"providerID": "aws:///us-east-1a/i-0abc1234567890def"},
        "status": {
            "capacity": {"cpu": "192", "memory": "2113186088Ki", "nvidia.com/gpu": "8"},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    for path, value in changes.items():
        *parents, last = path.split("__")
        target = obj
        for part in parents:
            target = target.setdefault(part, {})
        if value is None:
            target.pop(last, None)
        else:
            target[last] = value
    return obj


def test_a_node_appears_with_its_identity_and_capacity_dated_at_its_creation() -> None:
    state = NodeState("prod")
    (first,) = state.apply_node("ADDED", node(), NOW)
    assert first.kind == "added" and first.time_ms == CREATED_MS
    assert first.event_id == "uid-gpu-node-1:100" and first.key == "prod/gpu-node-1"
    info = first.info
    assert (info.cluster, info.node, info.instance_type) == ("prod", "gpu-node-1", "p5.48xlarge")
    assert info.provider_id == "aws:///us-east-1a/i-0abc1234567890def"
    assert (info.gpus, info.cpu_millicores) == (8, 192_000)
    assert info.memory_bytes == 2_113_186_088 * 1024 and info.deleted is False


def test_heartbeats_are_no_news_but_identity_and_capacity_changes_are() -> None:
    state = NodeState("prod")
    state.apply_node("ADDED", node(), NOW)
    beat = node(rv="101")
    beat["status"]["conditions"][0]["lastHeartbeatTime"] = "2026-11-26T10:00:00Z"
    beat["metadata"]["labels"]["team"] = "platform"  # other labels are no news either
    assert state.apply_node("MODIFIED", beat, NOW + 1) == []
    (gpu_gone,) = state.apply_node("MODIFIED", node(rv="102", status__capacity__cpu="191"), NOW + 2)
    assert gpu_gone.kind == "updated" and gpu_gone.time_ms == NOW + 2
    assert gpu_gone.info.cpu_millicores == 191_000 and gpu_gone.event_id == "uid-gpu-node-1:102"
    (moved,) = state.apply_node("MODIFIED", node(rv="103", spec__providerID="aws:///b/i-1"), NOW)
    assert moved.info.provider_id == "aws:///b/i-1"


def test_missing_fields_are_empty_or_zero_and_the_beta_label_is_the_fallback() -> None:
    bare = node(
        spec__providerID=None,
        status__capacity={"cpu": "4", "memory": "16Gi"},
        metadata__labels={"beta.kubernetes.io/instance-type": "m5.xlarge"},
    )
    (emission,) = NodeState("prod").apply_node("ADDED", bare, NOW)
    assert emission.info.provider_id == "" and emission.info.gpus == 0
    assert emission.info.instance_type == "m5.xlarge"
    (unlabelled,) = NodeState("prod").apply_node("ADDED", node(metadata__labels=None), NOW)
    assert unlabelled.info.instance_type == ""


def test_an_unreadable_quantity_is_zero_and_logged_once_per_node(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = NodeState("prod")
    caplog.set_level(logging.WARNING, logger="agents.node_state")
    (bad,) = state.apply_node("ADDED", node(status__capacity__memory="lots"), NOW)
    assert bad.info.memory_bytes == 0 and bad.info.cpu_millicores == 192_000
    state.apply_node("MODIFIED", node(rv="101", status__capacity__memory="lots"), NOW)
    state.apply_node("MODIFIED", node(rv="102", status__capacity__memory="1e99"), NOW)
    state.apply_node("ADDED", node("gpu-node-2", status__capacity__cpu="-4"), NOW)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "gpu-node-1" in lines[0] and "'lots'" in lines[0]
    assert "gpu-node-2" in lines[1] and "cpu" in lines[1]


def test_deletion_and_a_relist_that_finds_what_the_watch_missed() -> None:
    state = NodeState("prod")
    state.resync_nodes([node("a"), node("b"), node("c")], NOW)
    (gone,) = state.apply_node("DELETED", node("a", rv="200"), NOW + 5)
    assert gone.kind == "deleted" and gone.info.deleted and gone.event_id == "uid-a:deleted"
    changed = node("b", rv="300")
    changed["status"]["capacity"].pop("nvidia.com/gpu")  # the device plugin stopped
    out = state.resync_nodes([changed, copy.deepcopy(node("d"))], NOW + 9)
    assert sorted((e.kind, e.info.node) for e in out) == [
        ("added", "d"),
        ("deleted", "c"),
        ("updated", "b"),
    ]
    assert next(e for e in out if e.info.node == "b").info.gpus == 0
    assert state.resync_nodes([changed, node("d")], NOW + 10) == []  # nothing new
    assert sorted(state.published) == ["b", "d"]

"""What the pod watcher publishes for pod and namespace changes (pure state)."""

from __future__ import annotations

import copy
from typing import Any

from kube_api import recorded

from agents.pod_state import PodState

NOW = 1_795_000_000_000


def _state() -> tuple[PodState, list[Any]]:
    state = PodState("prod")
    first = state.resync_namespaces(recorded("namespacelist.json")["items"], NOW)
    first += state.resync_pods(recorded("podlist.json")["items"], NOW)
    return state, first


def test_initial_list_publishes_scheduled_pods_with_namespace_labels_at_creation_time() -> None:
    _, emissions = _state()
    assert [e.kind for e in emissions] == ["added", "added"]  # the pending pod is not scheduled
    a = emissions[0]
    assert a.info.uid == "dde1244b-5bb5-4297-b544-85f3bc0d80bf"
    assert a.info.node == "ip-172-31-7-12.ec2.internal"
    assert a.info.labels["team"] == "search"
    assert a.info.namespace_labels["product"] == "web-search"
    assert a.time_ms == 1_795_166_043_000  # creationTimestamp 2026-11-20T09:14:03Z
    assert a.event_id == "dde1244b-5bb5-4297-b544-85f3bc0d80bf:48213:101"
    assert not a.info.deleted


def test_status_churn_publishes_nothing_but_label_node_and_delete_do() -> None:
    state, _ = _state()
    events = [line for line in recorded("watch-pods-1.jsonl").splitlines() if line.strip()]
    import json

    out = []
    for raw in events:
        event = json.loads(raw)
        if event["type"] != "BOOKMARK":
            out.extend(state.apply_pod(event["type"], event["object"], NOW + 1000))
    kinds = [(e.kind, e.info.name.split("-")[0]) for e in out]
    assert kinds == [
        ("updated", "eval"),  # label product=llm-eval
        ("added", "pending"),  # got a node
        ("added", "qwen"),
        ("deleted", "llama"),
    ]
    assert out[0].info.labels["product"] == "llm-eval"
    assert out[0].time_ms == NOW + 1000
    assert out[3].info.deleted and out[3].event_id.endswith(":deleted")


def test_namespace_label_change_republishes_its_pods_with_a_new_id() -> None:
    state, first = _state()
    ns = copy.deepcopy(recorded("namespacelist.json")["items"][1])
    ns["metadata"]["labels"]["product"] = "llm-eval"
    ns["metadata"]["resourceVersion"] = "140"
    out = state.apply_namespace(ns, NOW + 5)
    assert [e.info.name for e in out] == ["eval-harness-5f7b8c9d7-q9w2e"]
    assert out[0].info.namespace_labels == {
        "kubernetes.io/metadata.name": "research",
        "team": "research",
        "product": "llm-eval",
    }
    old_id = next(e.event_id for e in first if e.info.namespace == "research")
    assert out[0].event_id != old_id


def test_resync_after_a_gap_emits_deletions_it_never_saw() -> None:
    state, _ = _state()
    out = state.resync_pods(recorded("podlist-after-410.json")["items"], NOW + 9)
    by_kind = {(e.kind, e.info.name.split("-")[0]) for e in out}
    assert ("deleted", "llama") in by_kind
    assert ("deleted", "eval") in by_kind
    assert ("added", "qwen") in by_kind and ("added", "mistral") in by_kind
    assert ("added", "pending") in by_kind  # scheduled during the gap


def test_same_list_twice_publishes_nothing_new() -> None:
    state, _ = _state()
    assert state.resync_pods(recorded("podlist.json")["items"], NOW + 1) == []


def test_deleting_a_never_scheduled_pod_publishes_nothing() -> None:
    state, _ = _state()
    pending = recorded("podlist.json")["items"][2]
    assert state.apply_pod("DELETED", pending, NOW) == []

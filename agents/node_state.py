"""The pod watcher's view of nodes: each node's cloud identity and capacity as last published,
and what to publish when it changes. Pure: it takes Kubernetes Node objects (dicts, as the API
returns them) and returns `NodeEmission`s; the watcher does the I/O.

A node is news when it appears, when its providerID, instance type or capacity (GPUs, CPU,
memory, each `nvidia.com/` resource) changes, and when it is deleted; status heartbeats are
not. Event ids are `<node uid>:<resourceVersion>` (or `<node uid>:deleted`). A node's first
event carries its creation time, so its identity covers everything it ran.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from msgspec.structs import replace

from agents.quantities import millis, whole_units
from schemas.events import MAX_GPU_RESOURCES, NodeInfo
from schemas.fields import (
    MAX_BYTES,
    MAX_DNS_SUBDOMAIN,
    MAX_GPUS,
    MAX_LABEL_KEY,
    MAX_LABEL_VALUE,
    MAX_MILLICORES,
    MAX_PROVIDER_ID,
)

log = logging.getLogger(__name__)

INSTANCE_TYPE_LABELS = ("node.kubernetes.io/instance-type", "beta.kubernetes.io/instance-type")
GPU_RESOURCE = "nvidia.com/gpu"
GPU_RESOURCE_PREFIX = "nvidia.com/"


@dataclass(frozen=True, slots=True)
class NodeEmission:
    info: NodeInfo
    event_id: str
    time_ms: int
    kind: str  # added | updated | deleted

    @property
    def key(self) -> str:
        """The Kafka key: `<cluster>/<node>`, so the compacted topic keeps each node's last."""
        return f"{self.info.cluster}/{self.info.node}"


@dataclass(frozen=True, slots=True)
class _Node:
    name: str
    uid: str
    resource_version: str
    created_ms: int | None


def _created_ms(meta: Mapping[str, Any]) -> int | None:
    text = meta.get("creationTimestamp")
    if not isinstance(text, str):
        return None
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


class NodeState:
    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self.nodes: dict[str, _Node] = {}  # by name
        self.published: dict[str, NodeInfo] = {}
        self._warned: set[str] = set()  # nodes whose unreadable fields were logged

    def apply_node(
        self, event_type: str, obj: Mapping[str, Any], now_ms: int
    ) -> list[NodeEmission]:
        """One watch event (ADDED, MODIFIED, DELETED)."""
        found = self._read(obj)
        if found is None:
            return []
        node, info = found
        if event_type == "DELETED":
            return self._delete(node.name, now_ms, info)
        self.nodes[node.name] = node
        emission = self._emission(node, info, now_ms)
        return [emission] if emission is not None else []

    def resync_nodes(self, items: Iterable[Mapping[str, Any]], now_ms: int) -> list[NodeEmission]:
        """After a fresh list (start, periodic resync, or watch expiry with 410 Gone): emit what
        changed while we were not watching, deletions we never saw included."""
        listed: dict[str, tuple[_Node, NodeInfo]] = {}
        for obj in items:
            found = self._read(obj)
            if found is not None:
                listed[found[0].name] = found
        out: list[NodeEmission] = []
        for name in [n for n in self.nodes if n not in listed]:
            out.extend(self._delete(name, now_ms, None))
        for node, info in listed.values():
            self.nodes[node.name] = node
            emission = self._emission(node, info, now_ms)
            if emission is not None:
                out.append(emission)
        return out

    # --- internals -----------------------------------------------------------------------------

    def _read(self, obj: Mapping[str, Any]) -> tuple[_Node, NodeInfo] | None:
        meta = obj.get("metadata") or {}
        name = meta.get("name")
        if not isinstance(name, str) or not name or len(name) > MAX_DNS_SUBDOMAIN:
            return None
        node = _Node(
            name=name,
            uid=str(meta.get("uid") or name),
            resource_version=str(meta.get("resourceVersion", "")),
            created_ms=_created_ms(meta),
        )
        problems: list[str] = []
        provider_id = str((obj.get("spec") or {}).get("providerID") or "")
        if len(provider_id) > MAX_PROVIDER_ID:
            problems.append(f"spec.providerID of {len(provider_id):,} characters")
            provider_id = ""
        labels = meta.get("labels") or {}
        instance_type = next((str(labels[k]) for k in INSTANCE_TYPE_LABELS if labels.get(k)), "")
        if len(instance_type) > MAX_LABEL_VALUE:
            problems.append(f"an instance type of {len(instance_type):,} characters")
            instance_type = ""
        capacity = (obj.get("status") or {}).get("capacity") or {}
        info = NodeInfo(
            cluster=self.cluster,
            node=name,
            provider_id=provider_id,
            instance_type=instance_type,
            gpus=_capacity(capacity, GPU_RESOURCE, whole_units, MAX_GPUS, problems),
            cpu_millicores=_capacity(capacity, "cpu", millis, MAX_MILLICORES, problems),
            memory_bytes=_capacity(capacity, "memory", whole_units, MAX_BYTES, problems),
            deleted=False,
            gpu_capacity=_gpu_capacity(capacity, problems),
        )
        if problems and name not in self._warned:
            self._warned.add(name)
            log.warning("node %s: %s unusable, published as 0 or empty", name, "; ".join(problems))
        return node, info

    def _emission(self, node: _Node, info: NodeInfo, now_ms: int) -> NodeEmission | None:
        before = self.published.get(node.name)
        if before == info:
            return None
        self.published[node.name] = info
        if before is None:
            time_ms = node.created_ms if node.created_ms is not None else now_ms
            kind = "added"
        else:
            time_ms, kind = now_ms, "updated"
        return NodeEmission(info, f"{node.uid}:{node.resource_version}", time_ms, kind)

    def _delete(self, name: str, now_ms: int, final: NodeInfo | None) -> list[NodeEmission]:
        node = self.nodes.pop(name, None)
        before = self.published.pop(name, None)
        self._warned.discard(name)
        if before is None or node is None:
            return []
        info = replace(final if final is not None else before, deleted=True)
        return [NodeEmission(info, f"{node.uid}:deleted", now_ms, "deleted")]


def _gpu_capacity(capacity: Mapping[str, Any], problems: list[str]) -> dict[str, int]:
    """Every `nvidia.com/` resource of the node's capacity (with time-slicing, `nvidia.com/gpu`
    is GPUs x replicas; with MIG "mixed", one per profile), those not 0 and readable; at most
    MAX_GPU_RESOURCES of them, the first in name order."""
    names = sorted(str(name) for name in capacity if str(name).startswith(GPU_RESOURCE_PREFIX))
    out: dict[str, int] = {}
    for name in names:
        count = _capacity(capacity, name, whole_units, MAX_GPUS, problems)
        if count and len(name) <= MAX_LABEL_KEY:
            out[name] = count
    if len(out) > MAX_GPU_RESOURCES:
        problems.append(f"{len(out)} GPU resources, beyond the first {MAX_GPU_RESOURCES}")
        out = dict(list(out.items())[:MAX_GPU_RESOURCES])
    return out


def _capacity(
    capacity: Mapping[str, Any],
    resource: str,
    read: Callable[[str], int],
    maximum: int,
    problems: list[str],
) -> int:
    """One capacity in its unit; 0 where the node has none, and (noted in `problems`) where
    its quantity cannot be read or is beyond what an event may carry."""
    text = capacity.get(resource)
    if text is None:
        return 0
    try:
        value = read(str(text))
    except ValueError:
        problems.append(f"capacity {resource} {str(text)[:32]!r} is not a quantity")
        return 0
    if value > maximum:
        problems.append(f"capacity {resource} {str(text)[:32]!r} is beyond {maximum:,}")
        return 0
    return value

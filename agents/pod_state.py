"""The pod watcher's state: pods and namespaces as last seen, and what to publish when they
change. Pure: it takes Kubernetes objects (dicts, as the API returns them) and returns
`PodEmission`s; the watcher does the I/O.

Only changes that matter downstream (node, labels, namespace labels, GPU requests, deletion) are
emitted, so status churn does not flood the compacted topic: a pod's GPU requests change only
when it reaches a terminal phase (it then holds nothing), and a pod without any never changes
them. Event ids are `<uid>:<pod rv>:<namespace rv>`
(or `<uid>:deleted`): stable when the same observation is re-sent, new for every change.
A pod's first event carries its creation time, so metadata covers everything it ran.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from msgspec.structs import replace

from agents.quantities import whole_units
from schemas.events import MAX_GPU_RESOURCES, PodInfo
from schemas.fields import MAX_GPUS, MAX_LABELS, fit_labels

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PodEmission:
    info: PodInfo
    event_id: str
    time_ms: int
    kind: str  # added | updated | deleted


@dataclass(frozen=True, slots=True)
class _Pod:
    uid: str
    namespace: str
    name: str
    node: str
    labels: Mapping[str, str]
    resource_version: str
    created_ms: int | None
    gpu_requests: Mapping[str, int]


GPU_RESOURCE_PREFIX = "nvidia.com/"
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


def gpu_requests(obj: Mapping[str, Any]) -> dict[str, int]:
    """The GPU extended resources (`nvidia.com/...`) a pod holds, as the scheduler counts them:
    per resource, the larger of the app containers' sum and the largest init container (an
    init container that restarts, a sidecar, adds to the app containers and to the init
    containers after it); a container's request, or without one its limit. Nothing once the
    pod is in a terminal phase. Quantities that cannot be read, or beyond what an event may
    carry, are left out and logged."""
    if (obj.get("status") or {}).get("phase") in TERMINAL_PHASES:
        return {}
    spec = obj.get("spec") or {}
    what = _name_of(obj)
    totals: dict[str, int] = {}
    sidecars: dict[str, int] = {}
    for container in spec.get("initContainers") or ():
        wanted = _container_gpus(container, what)
        if container.get("restartPolicy") == "Always":
            _add(sidecars, wanted)
            wanted = sidecars
        else:
            wanted = _summed(sidecars, wanted)
        for name, count in wanted.items():
            totals[name] = max(totals.get(name, 0), count)
    app: dict[str, int] = dict(sidecars)
    for container in spec.get("containers") or ():
        _add(app, _container_gpus(container, what))
    for name, count in app.items():
        totals[name] = max(totals.get(name, 0), count)
    held = {name: count for name, count in sorted(totals.items()) if 0 < count <= MAX_GPUS}
    if any(count > MAX_GPUS for count in totals.values()):
        log.warning("%s: GPU requests beyond %d left out of its events", what, MAX_GPUS)
    if len(held) > MAX_GPU_RESOURCES:
        log.warning("%s: GPU resources beyond the first %d left out", what, MAX_GPU_RESOURCES)
        held = dict(list(held.items())[:MAX_GPU_RESOURCES])
    return held


def _container_gpus(container: Mapping[str, Any], what: str) -> dict[str, int]:
    resources = container.get("resources") or {}
    limits = resources.get("limits") or {}
    requests = resources.get("requests") or {}
    out: dict[str, int] = {}
    for name in {*limits, *requests}:
        if not str(name).startswith(GPU_RESOURCE_PREFIX):
            continue
        text = requests.get(name, limits.get(name))
        try:
            out[str(name)] = whole_units(str(text))
        except ValueError:
            log.warning("%s: %s %r is not a quantity; left out", what, name, str(text)[:32])
    return out


def _add(totals: dict[str, int], more: Mapping[str, int]) -> None:
    for name, count in more.items():
        totals[name] = totals.get(name, 0) + count


def _summed(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = dict(a)
    _add(out, b)
    return out


def _name_of(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"pod {meta.get('namespace')}/{meta.get('name')}"


def _created_ms(meta: Mapping[str, Any]) -> int | None:
    text = meta.get("creationTimestamp")
    if not isinstance(text, str):
        return None
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


def _labels(meta: Mapping[str, Any], what: str) -> dict[str, str]:
    """The object's labels an event can carry. Kubernetes bounds each key and value but not
    their number: beyond MAX_LABELS, the first in key order are kept."""
    labels, dropped = fit_labels({str(k): str(v) for k, v in (meta.get("labels") or {}).items()})
    if dropped:
        log.warning(
            "%s: %d labels left out of its events (at most %d, keys and values within "
            "Kubernetes' limits)",
            what,
            dropped,
            MAX_LABELS,
        )
    return labels


def _pod(obj: Mapping[str, Any]) -> _Pod | None:
    meta = obj.get("metadata") or {}
    uid = meta.get("uid")
    if not uid or not meta.get("namespace") or not meta.get("name"):
        return None
    return _Pod(
        uid=str(uid),
        namespace=str(meta["namespace"]),
        name=str(meta["name"]),
        node=str((obj.get("spec") or {}).get("nodeName") or ""),
        labels=_labels(meta, f"pod {meta['namespace']}/{meta['name']}"),
        resource_version=str(meta.get("resourceVersion", "")),
        created_ms=_created_ms(meta),
        gpu_requests=gpu_requests(obj),
    )


class PodState:
    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self.pods: dict[str, _Pod] = {}
        self.namespaces: dict[str, tuple[dict[str, str], str]] = {}  # labels, resourceVersion
        self.published: dict[str, PodInfo] = {}

    # --- namespaces ----------------------------------------------------------------------------

    def apply_namespace(self, obj: Mapping[str, Any], now_ms: int) -> list[PodEmission]:
        meta = obj.get("metadata") or {}
        name = meta.get("name")
        if not name:
            return []
        labels = _labels(meta, f"namespace {name}")
        self.namespaces[str(name)] = (labels, str(meta.get("resourceVersion", "")))
        return self._emit_all([p for p in self.pods.values() if p.namespace == name], now_ms)

    def delete_namespace(self, name: str) -> None:
        self.namespaces.pop(name, None)  # its pods get their own DELETED events

    def resync_namespaces(
        self, items: Iterable[Mapping[str, Any]], now_ms: int
    ) -> list[PodEmission]:
        self.namespaces.clear()
        out: list[PodEmission] = []
        for obj in items:
            meta = obj.get("metadata") or {}
            if meta.get("name"):
                labels = _labels(meta, f"namespace {meta['name']}")
                self.namespaces[str(meta["name"])] = (labels, str(meta.get("resourceVersion", "")))
        out.extend(self._emit_all(list(self.pods.values()), now_ms))
        return out

    # --- pods ----------------------------------------------------------------------------------

    def apply_pod(self, event_type: str, obj: Mapping[str, Any], now_ms: int) -> list[PodEmission]:
        pod = _pod(obj)
        if pod is None:
            return []
        if event_type == "DELETED":
            return self._delete(pod.uid, now_ms, pod)
        self.pods[pod.uid] = pod
        emission = self._emission(pod, now_ms)
        return [emission] if emission is not None else []

    def resync_pods(self, items: Iterable[Mapping[str, Any]], now_ms: int) -> list[PodEmission]:
        """After a fresh list (start, or watch expiry with 410 Gone): emit what changed while we
        were not watching, including deletions we never saw."""
        listed: dict[str, _Pod] = {}
        for obj in items:
            pod = _pod(obj)
            if pod is not None:
                listed[pod.uid] = pod
        out: list[PodEmission] = []
        for uid in [u for u in self.pods if u not in listed]:
            out.extend(self._delete(uid, now_ms, None))
        self.pods.update(listed)
        for pod in listed.values():
            emission = self._emission(pod, now_ms)
            if emission is not None:
                out.append(emission)
        return out

    # --- internals -----------------------------------------------------------------------------

    def _info(self, pod: _Pod) -> PodInfo:
        ns_labels = self.namespaces.get(pod.namespace, ({}, ""))[0]
        return PodInfo(
            cluster=self.cluster,
            uid=pod.uid,
            namespace=pod.namespace,
            name=pod.name,
            node=pod.node,
            labels=dict(pod.labels),
            namespace_labels=dict(ns_labels),
            deleted=False,
            gpu_requests=dict(pod.gpu_requests),
        )

    def _emission(self, pod: _Pod, now_ms: int) -> PodEmission | None:
        if not pod.node:
            return None  # not scheduled yet: it cannot use a GPU
        info = self._info(pod)
        before = self.published.get(pod.uid)
        if before == info:
            return None
        self.published[pod.uid] = info
        ns_rv = self.namespaces.get(pod.namespace, ({}, ""))[1]
        if before is None:
            time_ms = pod.created_ms if pod.created_ms is not None else now_ms
            kind = "added"
        else:
            time_ms, kind = now_ms, "updated"
        return PodEmission(info, f"{pod.uid}:{pod.resource_version}:{ns_rv}", time_ms, kind)

    def _delete(self, uid: str, now_ms: int, final: _Pod | None) -> list[PodEmission]:
        self.pods.pop(uid, None)
        before = self.published.pop(uid, None)
        if before is None:
            return []  # never published (never scheduled): nothing to retract
        info = before
        if final is not None and final.node:
            info = self._info(final)
        return [PodEmission(replace(info, deleted=True), f"{uid}:deleted", now_ms, "deleted")]

    def _emit_all(self, pods: list[_Pod], now_ms: int) -> list[PodEmission]:
        out = []
        for pod in pods:
            emission = self._emission(pod, now_ms)
            if emission is not None:
                out.append(emission)
        return out

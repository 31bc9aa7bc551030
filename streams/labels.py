"""Who owns a cost row: team, product and cost centre from pod labels, else namespace labels.

design §3 step 6: a process outside any pod is `__host__`; a pod with no metadata yet, or
without the label, is `__untagged__`. Label keys are configurable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from schemas.events import PodInfo
from streams.rows import HOST, IDLE, UNKNOWN, UNTAGGED


@dataclass(frozen=True, slots=True)
class LabelSettings:
    team_key: str = "team"
    product_key: str = "product"
    cost_center_key: str = "cost-center"
    platform_team: str = "platform"  # owner of idle cost under the `platform` idle policy


def label_value(key: str, pod_labels: Mapping[str, str], ns_labels: Mapping[str, str]) -> str:
    value = pod_labels.get(key) or ns_labels.get(key)
    return value if value else UNTAGGED


def resolve_owner(
    owner: str, pod_lookup: Callable[[str], PodInfo | None], settings: LabelSettings
) -> tuple[str, str, str, str, str]:
    """(namespace, pod name, team, product, cost_center) of a pod uid, `__host__` or `__idle__`."""
    if owner == HOST:
        return (HOST, "", HOST, HOST, HOST)
    if owner == IDLE:
        return (IDLE, "", settings.platform_team, IDLE, IDLE)
    pod = pod_lookup(owner)
    if pod is None:
        return (UNKNOWN, "", UNTAGGED, UNTAGGED, UNTAGGED)
    return (
        pod.namespace,
        pod.name,
        label_value(settings.team_key, pod.labels, pod.namespace_labels),
        label_value(settings.product_key, pod.labels, pod.namespace_labels),
        label_value(settings.cost_center_key, pod.labels, pod.namespace_labels),
    )


class PodHistory:
    """Every pod event seen, per uid, so a window reads the metadata as of its end."""

    __slots__ = ("_events", "_ids")

    def __init__(self) -> None:
        self._events: dict[str, list[tuple[int, str, PodInfo]]] = {}
        self._ids: set[str] = set()

    def add(self, event_id: str, time_ms: int, pod: PodInfo) -> bool:
        """Record one pod event; False for a duplicate id."""
        if event_id in self._ids:
            return False
        self._ids.add(event_id)
        series = self._events.setdefault(pod.uid, [])
        series.append((time_ms, event_id, pod))
        series.sort(key=lambda e: (e[0], e[1]))
        return True

    def as_of(self, uid: str, time_ms: int) -> PodInfo | None:
        """The latest event of `uid` with time <= `time_ms` (ties broken by event id)."""
        best = None
        for t, _, pod in self._events.get(uid, ()):
            if t > time_ms:
                break
            best = pod
        return best

    def count_as_of(self, uids: Iterable[str], time_ms: int) -> int:
        """How many events of these pods a window ending at `time_ms` can see: a version input
        that only grows as metadata arrives."""
        return sum(1 for uid in set(uids) for t, _, _ in self._events.get(uid, ()) if t <= time_ms)

    def forget_before(self, time_ms: int) -> None:
        """Drop events superseded before `time_ms`, keeping the latest one per pod."""
        for uid, series in self._events.items():
            keep_from = 0
            for i, (t, _, _) in enumerate(series):
                if t <= time_ms:
                    keep_from = i
            if keep_from:
                for _, event_id, _ in series[:keep_from]:
                    self._ids.discard(event_id)
                self._events[uid] = series[keep_from:]

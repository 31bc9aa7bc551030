"""Who owns a cost row: team, product and cost centre from pod labels, else namespace labels.

design §3 step 6: a process outside any pod is `__host__`; a pod with no metadata yet, or
without the label, is `__untagged__`. Label keys are configurable.
"""

from __future__ import annotations

from bisect import bisect_right, insort
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
    """Every pod event seen, per uid, so a window reads the metadata as of its end.

    First-known metadata (design §3 step 6): a window reads the latest event dated at or before
    its end + grace; where the pod has none that early, its earliest known event applies (its
    labels are known from the first event on, whatever the watcher's clock said). The answer
    depends only on the set of events seen, never on the order they came in.
    """

    __slots__ = ("_events", "_ids")

    def __init__(self) -> None:
        # uid -> events sorted by (time, event id)
        self._events: dict[str, list[tuple[int, str, PodInfo]]] = {}
        self._ids: set[str] = set()

    def add(self, event_id: str, time_ms: int, pod: PodInfo) -> bool:
        """Record one pod event; False for a duplicate id."""
        if event_id in self._ids:
            return False
        self._ids.add(event_id)
        series = self._events.setdefault(pod.uid, [])
        entry = (time_ms, event_id, pod)
        if not series or series[-1][:2] < entry[:2]:
            series.append(entry)  # the usual case: events come in time order
        else:
            insort(series, entry, key=_order)
        return True

    def as_of(self, uid: str, time_ms: int) -> PodInfo | None:
        """The latest event of `uid` with time <= `time_ms` (ties broken by event id); where
        there is none that early, its earliest known event; None for a pod never seen."""
        series = self._events.get(uid)
        if not series:
            return None
        if series[-1][0] <= time_ms:
            return series[-1][2]
        index = bisect_right(series, time_ms, key=_time)
        return series[index - 1][2] if index else series[0][2]

    def first_ms(self, uid: str) -> int | None:
        """Time of the earliest known event of `uid`."""
        series = self._events.get(uid)
        return series[0][0] if series else None

    def can_change(self, uid: str, time_ms: int, as_of_ms: int) -> bool:
        """Whether an event of `uid` dated `time_ms`, just added, can change what a window
        reading metadata as of `as_of_ms` resolves to: it is dated within the window's view, or
        it is the pod's earliest event (which applies where none is that early)."""
        first = self.first_ms(uid)
        return time_ms <= as_of_ms or (first is not None and time_ms <= first)

    def count_as_of(self, uids: Iterable[str], time_ms: int) -> int:
        """A version input of a window ending at `time_ms`: how many events of these pods are
        known. Every event counts, those dated after `time_ms` too, since a later-dated one
        applies where a pod has none that early (and an even earlier one can arrive later):
        the count grows with every event that can change the window's rows, and depends only
        on the events seen, so a replay over the same pods topic gives the same versions."""
        del time_ms  # every event counts, whatever its date (above)
        events = self._events
        return sum(len(events.get(uid, ())) for uid in set(uids))

    def forget_before(self, time_ms: int) -> None:
        """Drop events superseded before `time_ms`, keeping the latest one per pod (version
        counts then drop too: only for state that no retained window reads)."""
        for uid, series in self._events.items():
            keep_from = 0
            for i, (t, _, _) in enumerate(series):
                if t <= time_ms:
                    keep_from = i
            if keep_from:
                for _, event_id, _ in series[:keep_from]:
                    self._ids.discard(event_id)
                self._events[uid] = series[keep_from:]


def _order(entry: tuple[int, str, PodInfo]) -> tuple[int, str]:
    return entry[0], entry[1]


def _time(entry: tuple[int, str, PodInfo]) -> int:
    return entry[0]

"""Who owns a cost row: team, product and cost centre from pod labels, else namespace labels.

design §3 step 6: a process outside any pod is `__host__`; a pod with no metadata yet, or
without the label, is `__untagged__`. Label keys are configurable.
"""

from __future__ import annotations

from bisect import bisect_right, insort
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from heapq import heapify, heappop, heappush, nsmallest

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


DEFAULT_MAX_PODS = 200_000


class PodHistory:
    """Pod events per uid, so a window reads the metadata as of its end.

    First-known metadata (design §3 step 6): a window reads the latest event dated at or before
    its end + grace; where the pod has none that early, its earliest known event applies (its
    labels are known from the first event on, whatever the watcher's clock said). The answer
    depends only on the set of events seen, never on the order they came in.

    Bounded: `forget_before(cutoff)` drops what no window reading as of `cutoff` or later can
    see (events superseded before it, and pods deleted before it), at a cost proportional to
    what it drops. Beyond `max_pods` pods, those whose latest event is oldest (deleted ones
    first) are forgotten whole and counted in `evicted`: their windows then read them as never
    seen (`__untagged__`), so a cap that is reached is too small for the cluster.
    """

    __slots__ = ("_cutoff_ms", "_due", "_evicted_events", "_ids", "_pods", "evicted", "max_pods")

    def __init__(self, max_pods: int = DEFAULT_MAX_PODS) -> None:
        if max_pods < 1:
            raise ValueError(f"max_pods must be at least 1, not {max_pods}")
        self._pods: dict[str, _Pod] = {}
        self._ids: set[str] = set()  # ids of the events held, to drop duplicates
        # (time from which forget_before has something of the pod to drop, uid), a heap; an
        # entry whose time is not its pod's `due_ms` any more is stale and skipped
        self._due: list[tuple[int, str]] = []
        self._cutoff_ms: int | None = None
        self._evicted_events = 0  # events ever added to pods the cap forgot
        self.max_pods = max_pods
        self.evicted = 0  # pods forgotten because of `max_pods`

    def __len__(self) -> int:
        """Pods known."""
        return len(self._pods)

    def knows(self, uid: str) -> bool:
        return uid in self._pods

    @property
    def held_events(self) -> int:
        """Events held (with their ids) over every pod."""
        return len(self._ids)

    def add(self, event_id: str, time_ms: int, pod: PodInfo) -> bool:
        """Record one pod event; False for a duplicate id, or for an event already superseded
        before the latest `forget_before` cutoff (it changes nothing a window can still read)."""
        if event_id in self._ids:
            return False
        entry = (time_ms, event_id, pod)
        known = self._pods.get(pod.uid)
        if known is None:
            known = self._pods[pod.uid] = _Pod()
        series = known.events
        cutoff = self._cutoff_ms
        if cutoff is not None and series and series[0][0] <= cutoff and entry[:2] < series[0][:2]:
            return False
        self._ids.add(event_id)
        known.added += 1
        if not series or series[-1][:2] < entry[:2]:
            series.append(entry)  # the usual case: events come in time order
        else:
            insort(series, entry, key=_order)
        self._schedule(pod.uid, known)
        if len(self._pods) > self.max_pods:
            self._evict()
        return True

    def as_of(self, uid: str, time_ms: int) -> PodInfo | None:
        """The latest event of `uid` with time <= `time_ms` (ties broken by event id); where
        there is none that early, its earliest known event; None for a pod never seen."""
        known = self._pods.get(uid)
        if known is None:
            return None
        series = known.events
        if series[-1][0] <= time_ms:
            return series[-1][2]
        index = bisect_right(series, time_ms, key=_time)
        return series[index - 1][2] if index else series[0][2]

    def first_ms(self, uid: str) -> int | None:
        """Time of the earliest known event of `uid`."""
        known = self._pods.get(uid)
        return known.events[0][0] if known is not None else None

    def can_change(self, uid: str, time_ms: int, as_of_ms: int) -> bool:
        """Whether an event of `uid` dated `time_ms`, just added, can change what a window
        reading metadata as of `as_of_ms` resolves to: it is dated within the window's view, or
        it is the pod's earliest event (which applies where none is that early)."""
        first = self.first_ms(uid)
        return time_ms <= as_of_ms or (first is not None and time_ms <= first)

    def count_as_of(self, uids: Iterable[str], time_ms: int) -> int:
        """A version input of a window ending at `time_ms`: how many events of these pods were
        ever added. Every event counts, those dated after `time_ms` too, since a later-dated
        one applies where a pod has none that early (and an even earlier one can arrive later):
        the count grows with every event that can change the window's rows, and depends only
        on the events seen, so a replay over the same pods topic gives the same versions.

        Forgetting superseded events leaves the count as it was, so it never goes down while a
        pod is known (a lower version would lose a correction to ReplacingMergeTree). The
        events of pods the cap forgot count for every window: a window that read such a pod
        keeps its count, and the others only move up. A pod dropped because it was deleted
        before the cutoff counts nothing: no retained window reads it."""
        del time_ms  # every event counts, whatever its date (above)
        pods = self._pods
        total = self._evicted_events
        for uid in set(uids):
            known = pods.get(uid)
            if known is not None:
                total += known.added
        return total

    def forget_before(self, time_ms: int) -> None:
        """Forget what no window reading metadata as of `time_ms` or later can see: per pod,
        the events before its latest one dated <= `time_ms`, and whole pods whose latest event
        is a deletion dated before `time_ms`. Versions (`count_as_of`) stay as they were,
        except for the dropped pods. The cost is proportional to what is dropped."""
        if self._cutoff_ms is None or time_ms > self._cutoff_ms:
            self._cutoff_ms = time_ms
        due, pods = self._due, self._pods
        while due and due[0][0] <= time_ms:
            due_ms, uid = heappop(due)
            known = pods.get(uid)
            if known is None or known.due_ms != due_ms:
                continue  # stale: the pod is gone, or its due time moved
            known.due_ms = None
            series = known.events
            latest = series[-1]
            if latest[2].deleted and latest[0] < time_ms:
                self._drop(uid)
                continue
            keep_from = bisect_right(series, time_ms, key=_time) - 1
            if keep_from > 0:
                for _, event_id, _ in series[:keep_from]:
                    self._ids.discard(event_id)
                del series[:keep_from]
            self._schedule(uid, known)

    def _schedule(self, uid: str, known: _Pod) -> None:
        """Keep the pod's entry in the due heap at the earliest cutoff that drops something."""
        series = known.events
        due_ms: int | None = series[1][0] if len(series) > 1 else None
        if series[-1][2].deleted:
            gone_ms = series[-1][0] + 1  # dropped once the cutoff is past the deletion
            due_ms = gone_ms if due_ms is None else min(due_ms, gone_ms)
        if due_ms == known.due_ms:
            return
        known.due_ms = due_ms
        if due_ms is None:
            return
        heappush(self._due, (due_ms, uid))
        if len(self._due) > 2 * len(self._pods) + 1024:  # mostly stale entries: rebuild
            self._due = [(p.due_ms, u) for u, p in self._pods.items() if p.due_ms is not None]
            heapify(self._due)

    def _evict(self) -> None:
        """Forget the pods over the cap, deleted ones first, then by oldest latest event; a
        hundredth of the cap more at once, so the scan that picks them is paid rarely."""
        excess = len(self._pods) - self.max_pods + self.max_pods // 100
        for uid, known in nsmallest(excess, self._pods.items(), key=_eviction_order):
            self._evicted_events += known.added
            self.evicted += 1
            self._drop(uid)

    def _drop(self, uid: str) -> None:
        known = self._pods.pop(uid)
        for _, event_id, _ in known.events:
            self._ids.discard(event_id)


class _Pod:
    """One pod's events, sorted by (time, event id), and how many were ever added."""

    __slots__ = ("added", "due_ms", "events")

    def __init__(self) -> None:
        self.events: list[tuple[int, str, PodInfo]] = []
        self.added = 0
        self.due_ms: int | None = None


def _order(entry: tuple[int, str, PodInfo]) -> tuple[int, str]:
    return entry[0], entry[1]


def _time(entry: tuple[int, str, PodInfo]) -> int:
    return entry[0]


def _eviction_order(item: tuple[str, _Pod]) -> tuple[bool, int, str]:
    latest = item[1].events[-1]
    return (not latest[2].deleted, latest[0], latest[1])

"""The pod history stays bounded: forgetting changes no answer a window at or after the cutoff
can read, versions never go down, and long churn leaves only the pods within the horizon."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.horizon import LATE_HORIZON_S
from schemas.events import PodInfo
from streams.labels import PodHistory

UIDS = ("uid-a", "uid-b", "uid-c")


def info(uid: str, team: str = "t", *, deleted: bool = False) -> PodInfo:
    return PodInfo("c1", uid, "ns", uid, "node-1", {"team": team}, {}, deleted)


@dataclass
class Model:
    """An unforgetting history, except that a pod deleted before the cutoff is dropped."""

    events: dict[str, list[tuple[int, str, PodInfo]]] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)

    def add(self, event_id: str, time_ms: int, pod: PodInfo, taken: bool) -> None:
        self.events.setdefault(pod.uid, []).append((time_ms, event_id, pod))
        if taken:
            self.accepted[pod.uid] = self.accepted.get(pod.uid, 0) + 1

    def forget_before(self, time_ms: int) -> None:
        for uid, series in list(self.events.items()):
            latest = max(series, key=lambda e: e[:2])
            if latest[2].deleted and latest[0] < time_ms:
                del self.events[uid]
                self.accepted.pop(uid, None)

    def as_of(self, uid: str, time_ms: int) -> PodInfo | None:
        series = self.events.get(uid)
        if not series:
            return None
        early = [e for e in series if e[0] <= time_ms]
        chosen = max(early, key=lambda e: e[:2]) if early else min(series, key=lambda e: e[:2])
        return chosen[2]

    def first_ms(self, uid: str) -> int | None:
        series = self.events.get(uid)
        return min(e[0] for e in series) if series else None


add_op = st.tuples(
    st.just("add"),
    st.integers(0, 40),
    st.sampled_from(UIDS),
    st.booleans(),
    st.sampled_from(["x", "y"]),
)
forget_op = st.tuples(st.just("forget"), st.integers(0, 8))


@settings(max_examples=300)
@given(st.lists(st.one_of(add_op, add_op, forget_op), max_size=40))
def test_forgetting_changes_no_answer_at_or_after_the_cutoff(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    history, model = PodHistory(), Model()
    cutoff = -1
    last_count: dict[str, int] = {}
    for n, op in enumerate(ops):
        if op[0] == "add":
            _, t, uid, deleted, team = op
            pod = info(uid, team, deleted=deleted)
            model.add(f"e{n}", t, pod, history.add(f"e{n}", t, pod))
        else:
            cutoff += op[1]
            history.forget_before(cutoff)
            model.forget_before(cutoff)
        for uid in UIDS:
            for t in range(max(cutoff, 0), 45):
                assert history.as_of(uid, t) == model.as_of(uid, t), (uid, t)
                first = model.first_ms(uid)
                for event_ms in {0, cutoff, t + 1, first or 0, (first or 0) + 1, 44}:
                    assert history.can_change(uid, event_ms, t) == (
                        event_ms <= t or (first is not None and event_ms <= first)
                    )
            want_first = model.first_ms(uid)
            got_first = history.first_ms(uid)
            if want_first is None or want_first > cutoff:
                assert got_first == want_first
            else:
                assert got_first is not None and want_first <= got_first <= cutoff
            count = history.count_as_of([uid, uid], cutoff)
            assert count == model.accepted.get(uid, 0)
            if uid in model.events:
                assert count >= last_count.get(uid, 0), "a version went down"
                last_count[uid] = count
            else:
                last_count.pop(uid, None)
    assert history.held_events <= sum(len(s) for s in model.events.values())


def test_an_event_superseded_before_the_cutoff_is_not_taken_again() -> None:
    history = PodHistory()
    assert history.add("e1", 1_000, info("uid-a", "old"))
    assert history.add("e2", 2_000, info("uid-a", "new"))
    assert history.add("e3", 9_000, info("uid-a", "later"))
    history.forget_before(5_000)
    assert history.held_events == 2 and history.first_ms("uid-a") == 2_000
    assert history.count_as_of(["uid-a"], 5_000) == 3, "forgetting leaves the version as it was"
    assert not history.add("e1", 1_000, info("uid-a", "old")), "superseded before the cutoff"
    assert history.as_of("uid-a", 5_000) == info("uid-a", "new")
    assert history.add("e4", 3_000, info("uid-a", "fix"))  # after the kept one: it counts
    assert history.as_of("uid-a", 5_000) == info("uid-a", "fix")
    assert history.count_as_of(["uid-a"], 5_000) == 4


def test_a_pod_deleted_before_the_cutoff_is_forgotten_whole() -> None:
    history = PodHistory()
    history.add("a1", 1_000, info("uid-a"))
    history.add("a2", 4_000, info("uid-a", deleted=True))
    history.add("b1", 1_000, info("uid-b"))
    history.add("b2", 6_000, info("uid-b", deleted=True))
    history.forget_before(4_000)  # uid-a's deletion is not before 4000 yet
    assert len(history) == 2 and history.held_events == 3
    history.forget_before(4_001)
    assert history.as_of("uid-a", 5_000) is None and history.count_as_of(["uid-a"], 0) == 0
    assert history.as_of("uid-b", 5_000) == info("uid-b")
    assert len(history) == 1 and history.held_events == 2
    assert history.evicted == 0, "a deleted pod forgotten at the cutoff is no eviction"


def test_the_cap_forgets_deleted_pods_first_then_the_oldest() -> None:
    history = PodHistory(max_pods=100)  # evicts the excess plus one at a time
    for i in range(100):
        history.add(f"live-{i}", 10_000 + i, info(f"uid-live-{i}"))
    history.add("gone", 50_000, info("uid-gone", deleted=True))  # newest, but deleted
    assert len(history) == 99 and history.evicted == 2
    assert history.as_of("uid-gone", 60_000) is None
    assert history.as_of("uid-live-0", 60_000) is None  # the oldest live one went with it
    assert history.as_of("uid-live-1", 60_000) == info("uid-live-1")
    assert history.held_events == 99


def test_versions_never_go_down_when_the_cap_forgets() -> None:
    history = PodHistory(max_pods=50)
    rng = random.Random(7)
    uids = [f"uid-{i}" for i in range(200)]
    windows = [rng.sample(uids, 5) for _ in range(30)]
    last = [0] * len(windows)
    for n in range(2_000):
        uid = rng.choice(uids)
        history.add(f"e{n}", n * 10, info(uid, str(n % 3)))
        assert len(history) <= 50
        for w, owners in enumerate(windows):
            count = history.count_as_of(owners, 0)
            assert count >= last[w], "a version went down"
            last[w] = count
    assert history.evicted > 0
    assert history.held_events <= 2_000


def test_long_churn_keeps_only_the_pods_within_the_horizon() -> None:
    """500,000 pods created and deleted over about five days, a tenth relabelled while they
    run, and a few that run for ever; the worker forgets per 60 s window with its cutoff."""
    window_ms, grace_ms = 60_000, 10_000
    horizon_ms = LATE_HORIZON_S * 1000 + window_ms + grace_ms
    rng = random.Random(11)
    history = PodHistory()
    per_window, total = 70, 500_000
    for r in range(20):  # long-running, relabelled a few times early on
        for k in range(4):
            history.add(f"r{r}:{k}", k * window_ms, info(f"uid-r{r}", str(k)))
    deletions: list[int] = []  # deletion times of the churning pods still expected
    created = 0
    window = 0
    most = 0
    while created < total:
        start_ms = window * window_ms
        for _ in range(per_window):
            uid = f"uid-{created}"
            born = start_ms + rng.randrange(window_ms)
            dies = born + rng.randrange(10 * 60_000, 2 * 3600_000)
            history.add(f"{uid}:0", born, info(uid))
            if created % 10 == 0:
                history.add(f"{uid}:1", (born + dies) // 2, info(uid, "relabelled"))
            history.add(f"{uid}:2", dies, info(uid, deleted=True))
            heapq.heappush(deletions, dies)
            created += 1
        cutoff = start_ms + window_ms - horizon_ms
        history.forget_before(cutoff)
        while deletions and deletions[0] < cutoff:
            heapq.heappop(deletions)
        assert len(history) == len(deletions) + 20
        most = max(most, len(history))
        window += 1
    # pods deleted within the horizon (4 h 70 s) or not yet: about 70 a minute over 5 h
    assert most < 70 * 60 * 6
    assert history.held_events <= 3 * len(deletions) + 20
    assert history.count_as_of(["uid-r0"], 0) == 4 and history.first_ms("uid-r0") == 3 * window_ms
    assert len(history._due) <= 2 * len(history) + 1024  # the due heap shrinks with the pods
    assert history.evicted == 0

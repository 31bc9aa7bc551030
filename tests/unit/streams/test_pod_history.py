"""First-known pod metadata (design §3 step 6): the history's lookup, and both stages
re-emitting the retained windows a pod event changes, whatever order the inputs came in."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from msgspec.structs import replace
from worker_scenario import (
    PODS,
    T0,
    comparable,
    expected_rows,
    gpu_samples,
    token_events,
)

from schemas.events import CloudEvent, GpuSample, PodInfo, ProcessSample, make_event
from streams.labels import PodHistory
from streams.pricing import EXAMPLE_PRICE_BOOK, load_price_book
from streams.rows import TokenCostRow
from streams.worker.device_stage import DeviceStage, StreamSettings
from streams.worker.pod_stage import Marker, PodStage, decode_internal

BOOK = load_price_book(EXAMPLE_PRICE_BOOK)
NOW = 1_000.0
LATER = NOW + 100  # every input idle by then: every open window closes
SAMPLES = ("gpuledger.gpu-samples", 0)
TOKENS = ("gpuledger.tokens", 0)
INTERNAL = ("internal", 0)


def pod(uid: str, **changes: Any) -> PodInfo:
    return replace(PODS[uid], **changes)


def pod_event(uid: str, n: int, time_ms: int, **changes: Any) -> CloudEvent[PodInfo]:
    return make_event(
        pod(uid, **changes), event_id=f"pod:{uid}:{n}", source="pods", time_ms=time_ms
    )


# The three windows' views end at T0 + 70 s, 130 s and 190 s (end + 10 s grace).
CLOCK_AHEAD = [
    pod_event("uid-search", 1, T0 + 75_000),  # after the first window's view: it applies there
    pod_event("uid-search", 2, T0 + 400_000, deleted=True),  # same labels, later
    pod_event("uid-ads", 1, T0 + 200_000),  # after every window: it applies to all
    pod_event("uid-sandbox", 1, T0 - 60_000),
    pod_event("uid-late", 1, T0 + 600_000),
    pod_event("uid-late", 2, T0 + 900_000, deleted=True),
]


def latest_per_pod(events: Iterable[CloudEvent[PodInfo]]) -> list[CloudEvent[PodInfo]]:
    """What a compacted pods topic keeps: the last record per key (pod uid)."""
    last = {ev.data.uid: ev for ev in events}
    return list(last.values())


# ------------------------------------------------------------------ the history


def test_latest_at_or_before_else_the_earliest_known() -> None:
    history = PodHistory()
    a, b = pod("uid-search"), pod("uid-search", labels={"team": "b"})
    assert history.as_of("uid-search", T0) is None
    assert history.add("e2", 5000, b)
    assert history.as_of("uid-search", 999) == b  # only a later-dated event: it applies
    assert history.add("e1", 1000, a)  # an earlier-dated one arrives: it is the earliest now
    assert not history.add("e1", 1000, a)
    assert history.as_of("uid-search", 999) == a
    assert history.as_of("uid-search", 4999) == a
    assert history.as_of("uid-search", 5000) == b
    assert history.first_ms("uid-search") == 1000
    assert history.count_as_of(["uid-search", "uid-search", "uid-none"], 0) == 2


def test_what_an_event_can_change() -> None:
    history = PodHistory()
    history.add("e1", 1000, pod("uid-late"))
    assert history.can_change("uid-late", 1000, 500)  # the earliest: applies before it too
    history.add("e2", 5000, pod("uid-late"))
    assert history.can_change("uid-late", 5000, 5000)  # within the window's view
    assert not history.can_change("uid-late", 5000, 4999)  # later, and not the earliest


events_st = st.lists(
    st.tuples(st.integers(0, 20), st.sampled_from("abcde"), st.sampled_from(["x", "y", "z"])),
    min_size=1,
    max_size=8,
    unique_by=lambda e: e[1],
)


@given(events_st, st.randoms(use_true_random=False))
def test_the_answer_depends_on_the_events_not_their_order(
    events: list[tuple[int, str, str]], rnd: Any
) -> None:
    def history_of(order: Sequence[tuple[int, str, str]]) -> PodHistory:
        history = PodHistory()
        for t, event_id, team in order:
            history.add(event_id, t, pod("uid-search", labels={"team": team}))
        return history

    shuffled = list(events)
    rnd.shuffle(shuffled)
    one, other = history_of(events), history_of(shuffled)
    for t in range(-1, 22):
        early = [e for e in events if e[0] <= t]
        want = max(early) if early else min(events)  # by (time, id)
        got = one.as_of("uid-search", t)
        assert got is not None and got.labels == {"team": want[2]}
        assert other.as_of("uid-search", t) == got
        assert one.count_as_of(["uid-search"], t) == other.count_as_of(["uid-search"], t)


# ------------------------------------------------------------------ both stages


class Pipeline:
    """Both stages wired as the worker wires them, keeping the latest row per key."""

    def __init__(self) -> None:
        self.pods = PodHistory()
        settings = StreamSettings()
        self.devices = DeviceStage(BOOK, settings, self.pods)
        self.stage_two = PodStage(settings, self.pods)
        self.offset = 0
        self.rows: tuple[dict[str, Any], dict[str, Any], dict[str, Any]] = ({}, {}, {})
        self.emitted: list[Any] = []  # rows of the last poll

    def _next(self) -> int:
        self.offset += 1
        return self.offset

    def pod_events(self, events: Iterable[CloudEvent[PodInfo]]) -> None:
        for ev in events:
            if self.pods.add(ev.id, ev.time_ms, ev.data):
                self.devices.on_pod_event(ev.data.uid, ev.time_ms)
                self.stage_two.on_pod_event(ev.data.uid, ev.time_ms)

    def samples(self, events: Iterable[CloudEvent[GpuSample]]) -> None:
        for ev in events:
            self.devices.add_sample(SAMPLES, self._next(), ev, NOW)

    def tokens(self) -> None:
        for ev in token_events():
            self.stage_two.add_tokens(TOKENS, self._next(), ev, NOW)

    def poll(self) -> list[Any]:
        out = self.devices.poll(LATER)
        for partial in out.partials:
            message = decode_internal(partial.encode())
            self.stage_two.add_internal(INTERNAL, self._next(), message, NOW)
        closed = self.devices.closed_until_ms()
        if closed is not None:
            self.stage_two.add_internal(INTERNAL, self._next(), Marker(0, 1, closed), NOW)
        two = self.stage_two.poll(LATER)
        self.emitted = [*out.rows, *two.token_rows, *two.cost_rows]
        polled: tuple[list[Any], ...] = (out.rows, two.token_rows, two.cost_rows)
        for table, rows in zip(self.rows, polled, strict=True):
            for row in rows:
                before = table.get(row.key)
                assert before is None or row.version > before.version, row.key
                table[row.key] = row
        return self.emitted

    def final(self) -> list[list[tuple[Any, ...]]]:
        return [comparable(table.values()) for table in self.rows]


def oracle(pods: Sequence[CloudEvent[PodInfo]], samples: Any = None) -> list[list[Any]]:
    rows = expected_rows(gpu_samples() if samples is None else samples, pods, token_events())
    return [comparable(table) for table in rows]


def owners(rows: Iterable[Any], uid: str) -> set[tuple[str, str]]:
    return {(r.namespace, r.team) for r in rows if r.pod_uid == uid}


def cost_per_token_teams(rows: Iterable[Any], uid: str) -> set[str]:
    return {r.team for r in rows if isinstance(r, TokenCostRow) and r.pod_uid == uid}


def test_first_metadata_dated_after_the_window_re_emits_both_stages() -> None:
    run = Pipeline()
    run.tokens()
    run.samples(gpu_samples())
    first = run.poll()
    assert owners(first, "uid-late") == {("__unknown__", "__untagged__")}
    assert cost_per_token_teams(first, "uid-ads") == {"__untagged__"}
    versions = {r.key: r.version for r in first}
    run.pod_events(CLOCK_AHEAD)
    again = run.poll()
    assert owners(again, "uid-late") == {("research", "research")}
    assert cost_per_token_teams(again, "uid-ads") == {"ads"}
    assert all(r.version > versions[r.key] for r in again)
    assert run.final() == oracle(CLOCK_AHEAD)


def _schedules() -> dict[str, list[str]]:
    return {
        "pods first": ["pods", "tokens", "samples", "poll"],
        "pods last": ["tokens", "samples", "poll", "pods", "poll"],
        "pods between": ["tokens", "samples", "pods", "poll"],
        "pods reversed after close": ["tokens", "samples", "poll", "reversed", "poll"],
        "half before, half after": ["half", "tokens", "samples", "poll", "rest", "poll"],
    }


def test_final_rows_do_not_depend_on_when_pod_events_arrive() -> None:
    want = oracle(CLOCK_AHEAD)
    for name, steps in _schedules().items():
        run = Pipeline()
        for step in steps:
            if step == "pods":
                run.pod_events(CLOCK_AHEAD)
            elif step == "reversed":
                run.pod_events(reversed(CLOCK_AHEAD))
            elif step == "half":
                run.pod_events(CLOCK_AHEAD[1::2])
            elif step == "rest":
                run.pod_events(CLOCK_AHEAD[::2])
            elif step == "tokens":
                run.tokens()
            elif step == "samples":
                run.samples(gpu_samples())
            else:
                run.poll()
        assert run.final() == want, name


def test_an_earlier_dated_event_arriving_later_takes_over() -> None:
    """A watcher that restarts stamps a pod's first event with its creation time again, so an
    earlier-dated event can come after a later-dated one."""
    later = pod_event("uid-late", 1, T0 + 900_000, labels={"team": "old"})
    earlier = pod_event("uid-late", 2, T0 + 600_000)
    run = Pipeline()
    run.samples(gpu_samples())
    run.pod_events([later])
    assert owners(run.poll(), "uid-late") == {("research", "old")}
    run.pod_events([earlier])
    assert owners(run.poll(), "uid-late") == {("research", "research")}
    assert run.final()[0] == oracle([earlier, later])[0]


def test_a_pod_a_correction_brings_to_a_closed_window_gets_its_metadata() -> None:
    run = Pipeline()
    run.samples(gpu_samples())
    run.pod_events(CLOCK_AHEAD)
    run.poll()
    base = gpu_samples()[0]  # GPU-h100-a, first window, now closed
    proc = ProcessSample(4242, "uid-new", "containerd://new", 10**9, 5.0)
    data = replace(base.data, processes=(*base.data.processes, proc))
    late = make_event(data, event_id="late-new", source="agent/n1", time_ms=base.time_ms + 7)
    run.samples([late])
    assert owners(run.poll(), "uid-new") == {("__unknown__", "__untagged__")}
    new_pod = replace(PODS["uid-search"], uid="uid-new", name="new-0")
    meta = make_event(new_pod, event_id="pod:uid-new:1", source="pods", time_ms=T0 + 300_000)
    run.pod_events([meta])
    assert owners(run.poll(), "uid-new") == {("search", "search")}
    assert run.final()[0] == oracle([*CLOCK_AHEAD, meta], [*gpu_samples(), late])[0]


def test_an_event_that_changes_no_window_re_emits_nothing() -> None:
    run = Pipeline()
    run.tokens()
    run.samples(gpu_samples())
    run.pod_events(CLOCK_AHEAD)
    run.poll()
    # Dated after every window's view and not the pod's earliest: no window reads it.
    run.pod_events([pod_event("uid-search", 3, T0 + 500_000, labels={"team": "moved"})])
    assert run.poll() == []


# ------------------------------------------------------------------ after compaction


def test_only_the_latest_event_per_pod_gives_the_rows_of_the_whole_history() -> None:
    """Compaction keeps the latest event per pod; where a pod's labels did not change, a
    replay over what is left gives the rows that live processing gave over every event."""
    live = Pipeline()
    live.tokens()
    live.samples(gpu_samples())
    for ev in CLOCK_AHEAD:  # one at a time, a poll after each: as they came in live
        live.pod_events([ev])
        live.poll()
    compacted = latest_per_pod(CLOCK_AHEAD)
    assert len(compacted) < len(CLOCK_AHEAD)
    replay = Pipeline()
    replay.pod_events(compacted)  # the worker reads the pods topic whole first
    replay.tokens()
    replay.samples(gpu_samples())
    replay.poll()
    assert replay.final() == live.final() == oracle(CLOCK_AHEAD) == oracle(compacted)


def test_after_compaction_a_pod_whose_labels_changed_takes_its_latest_labels() -> None:
    """What is not guaranteed: once compaction removed a pod's earlier event, the windows that
    read it resolve to the surviving (latest) event."""
    history = [
        pod_event("uid-search", 1, T0 - 60_000),
        pod_event("uid-search", 2, T0 + 100_000, labels={"team": "search-v2"}),
    ]
    live, replay = oracle(history), oracle(latest_per_pod(history))
    assert live != replay
    changed = {row for row in replay[0] if row not in live[0]}
    assert changed and all(T0 in row for row in changed)  # only the first window differs
    assert all("search-v2" in row for row in changed)


def test_pairs_of_orders_agree() -> None:
    """Any two arrival orders of the pod events, all after the windows closed, agree."""
    want = oracle(CLOCK_AHEAD)
    for order in itertools.islice(itertools.permutations(CLOCK_AHEAD), 0, 720, 97):
        run = Pipeline()
        run.tokens()
        run.samples(gpu_samples())
        run.poll()
        for ev in order:
            run.pod_events([ev])
            run.poll()
        assert run.final() == want

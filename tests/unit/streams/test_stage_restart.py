"""A restart loses nothing and replays about one window (design §5, §8).

The stages are driven the way their handlers drive them (tests/checkpoint_store.py): restore
what a batch needs from the checkpoints (the outbox's pending ones first), fold it in, poll,
and write rows and checkpoints only at durable points, where the commit positions are taken. A
crash loses everything since the last durable point; a new stage, its lookup floor raised from
the latest checkpoint, replays the input from the committed positions. Its final rows (highest
version per key) must be those of the run that never crashed, and those the allocation core
computes from every distinct sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from checkpoint_store import (
    CheckpointTable,
    DeviceRun,
    PodInput,
    PodRun,
    Table,
    gpu_sample,
    token_delta,
)
from folding import fold
from hypothesis import event, given, settings
from hypothesis import strategies as st

from schemas.events import CloudEvent, GpuSample, PodInfo
from streams.allocation import DeviceWindow, Pricer, finalize_device_window
from streams.labels import PodHistory
from streams.pricing import EXAMPLE_PRICE_BOOK, load_price_book
from streams.rows import CostRow
from streams.worker.device_stage import (
    META_BITS,
    OK,
    DeviceStage,
    PodCostPartial,
    StreamSettings,
)
from streams.worker.pod_stage import Marker, PodStage
from streams.worker.watermark import Partition

BOOK = load_price_book(EXAMPLE_PRICE_BOOK)
T0 = 1_795_000_020_000  # a window start
WINDOW_MS = 60_000
SETTINGS = StreamSettings(grace_s=10, idle_flush_s=30, retention_s=120, late_horizon_s=600)
TOPIC = "gpuledger.gpu-samples"
DEVICES = ("GPU-0", "GPU-1", "GPU-2", "GPU-3")
QUIET = "GPU-9"  # sends only late samples: windows with no checkpoint at all
PARTITION = {d: (TOPIC, i % 2) for i, d in enumerate((*DEVICES, QUIET))}
FIRST_OFFSET = 100


def pod_history() -> PodHistory:
    pods = PodHistory()
    a = PodInfo("c1", "pod-a", "search", "a-0", "n", {"team": "search"}, {})
    pods.add("pod-a:1", T0 - 30_000, a)
    relabelled = PodInfo("c1", "pod-a", "search", "a-0", "n", {"team": "ranking"}, {})
    pods.add("pod-a:2", T0 + 150_000, relabelled)
    pods.add("pod-b:1", T0 + 200_000, PodInfo("c1", "pod-b", "ads", "b-0", "n", {}, {"team": "x"}))
    return pods  # pod-c has no event: untagged


process = st.tuples(
    st.sampled_from(["pod-a", "pod-b", "pod-c", None]),
    st.integers(min_value=0, max_value=60),
    st.none() | st.integers(min_value=0, max_value=100),
)
phases = st.lists(st.lists(process, max_size=3), min_size=1, max_size=3)
# ("dup", at, distance) | ("swap", at) | ("late", at, seconds, device) | ("ancient", at, s)
op = st.one_of(
    st.tuples(st.just("dup"), st.integers(0, 10**6), st.integers(1, 30)),
    st.tuples(st.just("swap"), st.integers(0, 10**6)),
    st.tuples(
        st.just("late"),
        st.integers(0, 10**6),
        # mostly older than the retention (120 s), all within the horizon (600 s)
        st.integers(170, 450) | st.integers(0, 170),
        st.sampled_from((*DEVICES, QUIET)),
    ),
    st.tuples(st.just("ancient"), st.integers(0, 10**6), st.integers(1_000, 3_000)),
)


@dataclass
class Stream:
    """The records of each sample partition, in offset order, and what must become of them."""

    records: dict[Partition, list[CloudEvent[GpuSample]]]
    ancient: set[str]  # ids of samples past the late horizon: too late in any run
    step_s: int = 10  # between two samples of a device
    added: int = 0  # records beyond the regular samples (repeated, late, ancient)

    def __repr__(self) -> str:
        sizes = {p: len(r) for p, r in self.records.items()}
        return f"Stream(records={sizes}, step_s={self.step_s}, added={self.added})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # Hypothesis prints a failing example with this

    def distinct(self) -> list[CloudEvent[GpuSample]]:
        seen: dict[str, CloudEvent[GpuSample]] = {}
        for events in self.records.values():
            for ev in events:
                if ev.id not in self.ancient:
                    seen.setdefault(ev.id, ev)
        return list(seen.values())


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    windows = draw(st.integers(min_value=5, max_value=12), label="windows")
    step_s = draw(st.sampled_from([5, 10, 15, 20]), label="step_s")
    workload = {d: draw(phases, label=f"phases {d}") for d in DEVICES}
    by_partition: dict[Partition, list[CloudEvent[GpuSample]]] = {}
    for d in DEVICES:
        for i in range(windows * 60 // step_s):
            procs = workload[d][(i * step_s // 60) % len(workload[d])]
            time_ms = T0 + i * step_s * 1000 + 250
            ev = gpu_sample(d, time_ms, f"{d}@{time_ms}", procs, interval_s=float(step_s))
            by_partition.setdefault(PARTITION[d], []).append(ev)
    for records in by_partition.values():
        records.sort(key=lambda ev: (ev.time_ms, ev.id))
    ancient: set[str] = set()
    added = 0
    changes: list[tuple[Any, ...]] = draw(st.lists(op, min_size=2, max_size=25), label="changes")
    for n, change in enumerate(changes):
        partition = draw(st.sampled_from(sorted(by_partition)), label="partition")
        records = by_partition[partition]
        at = change[1] % len(records)
        if change[0] == "dup":
            records.insert(min(at + change[2], len(records)), records[at])
            added += 1
        elif change[0] == "swap" and at + 1 < len(records):
            records[at], records[at + 1] = records[at + 1], records[at]
        elif change[0] == "late":
            device = (
                change[3] if PARTITION[change[3]] == partition else records[at].data.device_uuid
            )
            time_ms = regular_time(records, at) - change[2] * 1000
            ev = gpu_sample(device, time_ms, f"late-{n}", [("pod-c", 8, 30)], interval_s=7.0)
            records.insert(at + 1, ev)
            added += 1
        elif change[0] == "ancient" and at >= 8:  # behind enough input to date it by
            device = records[at].data.device_uuid
            time_ms = regular_time(records, at) - change[2] * 1000
            ev = gpu_sample(device, time_ms, f"ancient-{n}", [("pod-a", 8, 30)], interval_s=7.0)
            records.insert(at + 1, ev)
            ancient.add(ev.id)
            added += 1
    return Stream(by_partition, ancient, step_s, added)


def regular_time(records: list[CloudEvent[GpuSample]], at: int) -> int:
    """The latest time of the regular samples up to `at` (added ones are dated by them)."""
    return max(ev.time_ms for ev in records[: at + 1] if "@" in ev.id)


Batch = tuple[Partition, list[int], list[CloudEvent[GpuSample]]]


def batches(stream: Stream, start: dict[Partition, int], size: int) -> Iterator[Batch]:
    """Round robin over the partitions from offsets `start`, `size` records at a time."""
    cursors = {p: start.get(p, FIRST_OFFSET) for p in sorted(stream.records)}
    while True:
        progressed = False
        for partition, cursor in cursors.items():
            events = stream.records[partition][cursor - FIRST_OFFSET : cursor - FIRST_OFFSET + size]
            if events:
                progressed = True
                cursors[partition] = cursor + len(events)
                yield partition, list(range(cursor, cursor + len(events))), events
        if not progressed:
            return


class Driver:
    """One worker's life: a `DeviceRun` fed batches, checked after each against the offsets it
    read: the commit position of a partition is the first offset of an open window there."""

    def __init__(
        self, table: Table, checkpoints: CheckpointTable, pods: PodHistory, open_at_most: int = 3
    ) -> None:
        self.run = DeviceRun(DeviceStage(BOOK, SETTINGS, pods), table, checkpoints)
        self.open_at_most = open_at_most
        self.read: dict[Partition, list[tuple[int, int, str]]] = {}  # (offset, start, device)
        self.too_late: set[str] = set()

    def feed(self, batch: Batch, now_s: float) -> None:
        partition, offsets, events = batch
        counts = self.run.batch(partition, offsets, events, now_s)
        self.too_late |= {events[i].id for i in counts.too_late}
        self.read.setdefault(partition, []).extend(
            (o, ev.time_ms - ev.time_ms % WINDOW_MS, ev.data.device_uuid)
            for o, ev in zip(offsets, events, strict=True)
        )
        self.check_positions()

    def check_positions(self) -> None:
        stage = self.run.stage
        open_keys = {(start, d) for start, slots in stage._open.items() for d in slots}
        expected = {}
        for partition, read in self.read.items():
            held = [o for o, start, d in read if (start, d) in open_keys]
            expected[partition] = min([read[-1][0] + 1, *held])
        assert stage.held.positions() == expected
        # Only the windows the watermark has not passed are open: in time order three, and
        # those one partition's batch reaches ahead of the other's.
        assert len(stage._open) <= self.open_at_most

    def drain(self, now_s: float) -> None:
        self.run.poll(now_s + SETTINGS.idle_flush_s + 1)
        self.run.write()


def oracle(stream: Stream, pods: PodHistory) -> dict[str, CostRow]:
    """Rows of every distinct sample folded into its window, with the version a worker gives."""
    windows: dict[tuple[int, str], DeviceWindow] = {}
    pricer = Pricer(BOOK)
    cfg = SETTINGS.allocation
    for ev in stream.distinct():
        start = ev.time_ms - ev.time_ms % WINDOW_MS
        fold(windows.setdefault((start, ev.data.device_uuid), DeviceWindow(start)), ev, pricer, cfg)
    rows = {}
    for (start, _), window in windows.items():
        as_of = start + WINDOW_MS + SETTINGS.grace_ms
        version = (window.sample_count << META_BITS) | pods.count_as_of(window.owners, as_of)
        lookup = partial(pods.as_of, time_ms=as_of)
        for row in finalize_device_window(window, lookup, cfg, version):
            rows[row.key] = row
    return rows


def open_at_most(stream: Stream, size: int) -> int:
    """Windows open at once: three in time order, and the windows a batch of one partition
    (two devices) spans ahead of the other partition."""
    return 4 + (size + 1) // 2 * stream.step_s // 60


def undisturbed(stream: Stream, size: int, pods: PodHistory) -> tuple[Table, Driver]:
    table = Table()
    driver = Driver(table, CheckpointTable(), pods, open_at_most(stream, size))
    for n, batch in enumerate(batches(stream, {}, size)):
        driver.feed(batch, 1_000.0 + n)
        if n % 3 == 2:
            driver.run.write()
    driver.drain(1_000.0 + n)
    return table, driver


@settings(max_examples=200, deadline=None)
@given(
    streams(),
    st.integers(min_value=1, max_value=9),
    st.data(),
)
def test_a_restart_from_the_committed_positions_gives_the_rows_of_a_run_without_one(
    stream: Stream, size: int, data: st.DataObject
) -> None:
    pods = pod_history()
    expected = oracle(stream, pods)
    live_table, live = undisturbed(stream, size, pods)
    assert live.too_late == stream.ancient
    assert live_table.rows == expected
    assert live_table.ties == []

    schedule = list(batches(stream, {}, size))
    crash_after = data.draw(st.integers(min_value=1, max_value=len(schedule)), label="crash")
    every = data.draw(st.integers(min_value=1, max_value=8), label="durable every")
    durable = {n for n in range(crash_after) if n % every == every - 1}
    # Writes whose commit did not happen (the crash came between the two): the tables hold
    # checkpoints of windows whose input will be replayed.
    uncommitted = data.draw(
        st.sets(st.sampled_from(sorted(durable))) if durable else st.just(set())
    )
    table, checkpoints = Table(), CheckpointTable()
    first = Driver(table, checkpoints, pods, open_at_most(stream, size))
    committed: dict[Partition, int] = {}
    read_at_commit: dict[Partition, int] = {}
    for n, batch in enumerate(schedule[:crash_after]):
        first.feed(batch, 1_000.0 + n)  # checks the positions against the open windows
        if n in durable:
            positions = first.run.write(committed=n not in uncommitted)
            if n not in uncommitted:
                committed = positions
                read_at_commit = {p: read[-1][0] + 1 for p, read in first.read.items()}
    # The crash: the first worker and its outbox are gone; the tables and commits stay.
    event(f"checkpoints written before the crash: {min(len(checkpoints.states) // 10 * 10, 30)}+")
    second = Driver(table, checkpoints, pods, open_at_most(stream, size))
    n = crash_after
    for n, batch in enumerate(batches(stream, committed, size), start=crash_after):
        second.feed(batch, 1_000.0 + n)
    second.drain(1_000.0 + n)
    event(f"restored after the crash: {min(second.run.restored, 5)}")
    event(f"restored in the undisturbed run: {min(live.run.restored, 5)}")

    assert second.too_late <= stream.ancient
    assert table.rows == live_table.rows
    assert table.ties == []
    # The replay of what was read before the commit is about one window: the open windows'
    # samples (window + grace, and the current one) of the two devices of a partition, plus
    # any repeated or late record among them; never the retention.
    per_window = 2 * (60 // stream.step_s)
    bound = per_window * 2 + 2 * (10 // stream.step_s + 1) + 2 * size + stream.added
    for partition, read in read_at_commit.items():
        assert read - committed[partition] <= bound


def test_a_restart_restores_closed_windows_for_late_samples_and_refuses_replayed_ones() -> None:
    """By hand: two devices, eight windows; a late sample for a window long out of memory
    arrives after the crash, and the replay re-reads samples the checkpoints already hold."""
    pods = pod_history()
    records: dict[Partition, list[CloudEvent[GpuSample]]] = {(TOPIC, 0): [], (TOPIC, 1): []}
    for i in range(48):
        for d in ("GPU-0", "GPU-1"):
            time_ms = T0 + i * 10_000 + 250
            ev = gpu_sample(d, time_ms, f"{d}@{time_ms}", [("pod-a", 20, 50)])
            records[PARTITION[d]].append(ev)
    late = gpu_sample("GPU-0", T0 + 5_000, "late", [("pod-b", 10, 10)], interval_s=5.0)
    records[(TOPIC, 0)].insert(44, late)  # T0 + 440 s: window T0 left memory at T0 + 250 s
    stream = Stream(records, set())
    expected = oracle(stream, pods)
    live_table, _ = undisturbed(stream, 4, pods)
    assert live_table.rows == expected

    table, checkpoints = Table(), CheckpointTable()
    first = Driver(table, checkpoints, pods)
    schedule = list(batches(stream, {}, 4))
    for n, batch in enumerate(schedule[:16]):  # 32 samples a partition: up to T0 + 320 s
        first.feed(batch, 1_000.0 + n)
    committed = first.run.write()
    assert committed[(TOPIC, 0)] > FIRST_OFFSET + 24  # about one window back, not 32 records
    second = Driver(table, checkpoints, pods)
    assert second.run.stage._lookup_below == max(s for _, s, _ in checkpoints.states) + WINDOW_MS
    for n, batch in enumerate(batches(stream, committed, 4)):
        second.feed(batch, 2_000.0 + n)
    second.drain(3_000.0)
    assert second.run.restored >= 1  # the late sample's window came back from its checkpoint
    assert table.rows == live_table.rows == expected
    t0_rows = [
        r for r in table.rows.values() if r.window_start_ms == T0 and r.device_uuid == "GPU-0"
    ]
    assert {r.pod_uid for r in t0_rows} == {"pod-a", "pod-b", "__idle__"}


# ------------------------------------------------------------------ stage two

INTERNAL = ("gpuledger.internal", 0)
TOKENS = ("gpuledger.tokens", 0)
PodItem = PodInput


def pod_stage_inputs(stream: Stream, pods: PodHistory) -> dict[Partition, list[PodItem]]:
    """Stage one's output for `stream` (partials, a marker after each poll) on the internal
    topic, and token deltas for the pods that have cost, some late and some repeated."""
    run = DeviceRun(DeviceStage(BOOK, SETTINGS, pods), Table(), CheckpointTable())
    internal: list[PodItem] = []
    for n, (partition, offsets, events) in enumerate(batches(stream, {}, 5)):
        seen = len(run.partials)
        run.batch(partition, offsets, events, 1_000.0 + n)
        internal += run.partials[seen:]
        closed = run.stage.closed_until_ms()
        if closed is not None:
            internal.append(Marker(0, 1, closed))
    seen = len(run.partials)
    run.poll(10_000.0)
    internal += run.partials[seen:]
    internal.append(Marker(0, 1, run.stage.closed_until_ms() or 0))
    tokens: list[PodItem] = []
    last = max(ev.time_ms for events in stream.records.values() for ev in events)
    for k, time_ms in enumerate(range(T0 + 1_000, last, 7_000)):
        for uid in ("pod-a", "pod-b", "pod-c"):
            tokens.append(token_delta(uid, f"m{k % 2}", time_ms, f"tok-{uid}-{k}", 10 + k, 4))
        if k % 5 == 4:  # a late delta (redelivered too), within the horizon
            tokens.append(token_delta("pod-a", "m0", time_ms - 300_000, f"late-{k}", 7, 7))
            tokens.append(tokens[-1])
    return {INTERNAL: internal, TOKENS: tokens}


def arrival_ms(item: PodItem) -> int:
    """When the item reaches stage two in event time: a partial or marker once its window has
    closed in stage one, a token delta at its own time."""
    if isinstance(item, Marker):
        return item.end_ms + SETTINGS.grace_ms
    if isinstance(item, PodCostPartial):
        return item.window_start_ms + WINDOW_MS + SETTINGS.grace_ms
    return item.time_ms


def pod_batches(
    inputs: dict[Partition, list[PodItem]], start: dict[Partition, int], size: int
) -> Iterator[tuple[Partition, list[int], list[PodItem]]]:
    """Up to `size` records at a time of the partition whose next record is the earliest to
    arrive: the two topics move on together in event time, replayed or not (what is too late
    depends on how far the other topic has come)."""
    cursors = {p: start.get(p, FIRST_OFFSET) for p in sorted(inputs)}
    while True:
        ready = [
            (arrival_ms(inputs[p][c - FIRST_OFFSET]), p)
            for p, c in cursors.items()
            if c - FIRST_OFFSET < len(inputs[p])
        ]
        if not ready:
            return
        _, partition = min(ready)
        cursor = cursors[partition]
        items = inputs[partition][cursor - FIRST_OFFSET : cursor - FIRST_OFFSET + size]
        cursors[partition] = cursor + len(items)
        yield partition, list(range(cursor, cursor + len(items))), items


class PodDriver:
    """A `PodRun` checked after each batch: the commit position of a partition is the first
    offset of an input taken into a (window, pod) that is still open."""

    def __init__(self, tables: tuple[Table, Table], checkpoints: CheckpointTable) -> None:
        self.run = PodRun(PodStage(SETTINGS, pods_for_stage_two()), *tables, checkpoints)
        self.read: dict[Partition, int] = {}
        self.taken: dict[Partition, list[tuple[int, tuple[int, str]]]] = {}

    def feed(self, partition: Partition, offsets: list[int], items: list[PodItem], n: int) -> None:
        statuses = self.run.batch(partition, offsets, items, 1_000.0 + n)
        self.read[partition] = offsets[-1] + 1
        for offset, item, status in zip(offsets, items, statuses, strict=True):
            if status != OK or isinstance(item, Marker):
                continue
            if isinstance(item, PodCostPartial):
                key = (item.window_start_ms, item.pod_uid)
            else:
                key = (item.time_ms - item.time_ms % WINDOW_MS, item.data.pod_uid)
            self.taken.setdefault(partition, []).append((offset, key))
        stage = self.run.stage
        open_keys = {(start, uid) for start, uids in stage._open.items() for uid in uids}
        expected = {
            p: min([next_, *(o for o, key in self.taken.get(p, []) if key in open_keys)])
            for p, next_ in self.read.items()
        }
        assert stage.held.positions() == expected
        if stage._markers:  # before stage one has reported, nothing can close
            assert len(stage._open) <= 4


def pods_for_stage_two() -> PodHistory:
    return pod_history()


def run_pod_stage(
    inputs: dict[Partition, list[PodItem]],
    size: int,
    crash_after: int | None = None,
    durable: frozenset[int] = frozenset(),
    uncommitted: frozenset[int] = frozenset(),
) -> tuple[Table, Table, dict[Partition, int]]:
    """The rows stage two leaves in its tables, crashing (if asked) after batch `crash_after`
    and replaying from what the last durable point committed; and how many records of each
    partition it read again."""
    tables = Table(), Table()
    checkpoints = CheckpointTable()
    driver = PodDriver(tables, checkpoints)
    committed: dict[Partition, int] = {}
    n = 0
    for n, (partition, offsets, items) in enumerate(pod_batches(inputs, {}, size)):
        driver.feed(partition, offsets, items, n)
        if n in durable:
            positions = driver.run.write(committed=n not in uncommitted)
            if n not in uncommitted:  # else the crash came between the write and the commit
                committed = positions
        if n == crash_after:
            break
    else:
        driver.run.poll(100_000.0)
        driver.run.write()
        return *tables, {}
    read_at_crash = driver.read
    driver = PodDriver(tables, checkpoints)
    replayed: dict[Partition, int] = {}
    for m, (partition, offsets, items) in enumerate(pod_batches(inputs, committed, size)):
        again = sum(o < read_at_crash.get(partition, 0) for o in offsets)
        replayed[partition] = replayed.get(partition, 0) + again
        driver.feed(partition, offsets, items, n + 1 + m)
    driver.run.poll(100_000.0)
    driver.run.write()
    return *tables, replayed


@settings(max_examples=40, deadline=None)
@given(streams(), st.integers(min_value=1, max_value=8), st.data())
def test_stage_two_restarted_from_its_commits_gives_the_rows_of_a_run_without_one(
    stream: Stream, size: int, data: st.DataObject
) -> None:
    inputs = pod_stage_inputs(stream, pod_history())
    live_tokens, live_costs, _ = run_pod_stage(inputs, size)
    assert live_tokens.rows
    assert live_tokens.ties == live_costs.ties == []
    count = len(list(pod_batches(inputs, {}, size)))
    crash_after = data.draw(st.integers(min_value=0, max_value=count - 1), label="crash")
    every = data.draw(st.integers(min_value=1, max_value=8), label="durable every")
    durable = frozenset(n for n in range(crash_after + 1) if n % every == every - 1)
    uncommitted = data.draw(
        st.frozensets(st.sampled_from(sorted(durable))) if durable else st.just(frozenset())
    )
    tokens, costs, replayed = run_pod_stage(inputs, size, crash_after, durable, uncommitted)
    event(f"cost-per-token rows: {bool(live_costs.rows)}")
    event(f"replayed records: {min(sum(replayed.values()) // 10 * 10, 50)}+")
    assert tokens.rows == live_tokens.rows
    assert costs.rows == live_costs.rows
    assert tokens.ties == costs.ties == []


def test_a_sample_past_the_late_horizon_is_too_late_after_a_restart_too() -> None:
    """A quiet cluster closes every window (nothing held: the commit is at the end), the worker
    restarts, and an agent back from an outage re-sends a sample from before the late horizon.
    The worker that did not restart dead-letters it; the restarted one must too, not bill it as
    a new window because it has seen no sample yet to date it by."""
    pods = pod_history()
    regular = [
        gpu_sample("GPU-0", T0 + i * 10_000 + 250, f"GPU-0@{i}", [("pod-a", 20, 50)])
        for i in range(120)  # 20 minutes
    ]
    old = gpu_sample("GPU-0", T0 + 100_250, "resent", [("pod-b", 20, 50)])  # 1,100 s before
    partition = PARTITION["GPU-0"]
    offsets = list(range(FIRST_OFFSET, FIRST_OFFSET + len(regular)))

    live_table, checkpoints = Table(), CheckpointTable()
    live = DeviceRun(DeviceStage(BOOK, SETTINGS, pods), live_table, checkpoints)
    live.batch(partition, offsets, regular, 1_000.0)
    live.poll(1_000.0 + SETTINGS.idle_flush_s + 1)  # every input idle: every window closes
    committed = live.write()
    assert committed == {partition: FIRST_OFFSET + len(regular)}  # nothing left to replay
    # The next flush (a second later) writes the replay floor of that commit.
    live.poll(1_000.0 + SETTINGS.idle_flush_s + 2)
    live.write()
    restarted = DeviceRun(DeviceStage(BOOK, SETTINGS, pods), Table(), checkpoints)
    restarted.table.write(live_table.rows.values())
    before = dict(live_table.rows)

    resent_at = [FIRST_OFFSET + len(regular)]
    assert live.batch(partition, resent_at, [old], 1_100.0).too_late == [0]
    live.write()
    assert live_table.rows == before  # dead-lettered, billed nowhere

    counts = restarted.batch(partition, resent_at, [old], 1_100.0)
    restarted.write()
    billed = {k: r for k, r in restarted.table.rows.items() if before.get(k) != r}
    assert billed == {}
    assert counts.too_late == [0]


def test_pod_metadata_that_arrives_while_the_worker_is_down_still_corrects_closed_windows() -> None:
    """A relabel dated inside a closed, checkpointed window arrives while the worker is down.
    The worker that stayed up re-emits that window (design §3 step 6); the restarted one reads
    the pods topic whole before its stages begin, but the window is only a checkpoint then and
    its samples are before the committed position: it must still be re-emitted."""
    a = PodInfo("c1", "pod-a", "search", "a-0", "n", {"team": "search"}, {})
    relabel = PodInfo("c1", "pod-a", "search", "a-0", "n", {"team": "ranking"}, {})
    partition = PARTITION["GPU-0"]
    samples = [
        gpu_sample("GPU-0", T0 + i * 10_000 + 250, f"GPU-0@{i}", [("pod-a", 20, 50)])
        for i in range(12)  # windows T0 and T0 + 60 s
    ]
    later = [
        gpu_sample("GPU-0", T0 + i * 10_000 + 250, f"GPU-0@{i}", [("pod-a", 20, 50)])
        for i in range(12, 18)
    ]
    first_batch = list(range(FIRST_OFFSET, FIRST_OFFSET + 12))
    second_batch = list(range(FIRST_OFFSET + 12, FIRST_OFFSET + 18))

    def first_worker(pods: PodHistory, table: Table, checkpoints: CheckpointTable) -> DeviceRun:
        pods.add("pod-a:1", T0 - 30_000, a)
        run = DeviceRun(DeviceStage(BOOK, SETTINGS, pods), table, checkpoints)
        run.batch(partition, first_batch, samples, 1_000.0)  # window T0 closes
        return run

    live_pods, live_table = PodHistory(), Table()
    live = first_worker(live_pods, live_table, CheckpointTable())
    live.write()
    live_pods.add("pod-a:2", T0 + 50_000, relabel)  # within window T0's end + grace
    live.stage.on_pod_event("pod-a", T0 + 50_000)
    live.batch(partition, second_batch, later, 1_001.0)
    live.poll(2_000.0)
    live.write()
    t0 = [r for r in live_table.rows.values() if r.window_start_ms == T0 and r.pod_uid == "pod-a"]
    assert [r.team for r in t0] == ["ranking"]

    pods, table, checkpoints = PodHistory(), Table(), CheckpointTable()
    committed = first_worker(pods, table, checkpoints).write()  # then the worker stops
    pods = PodHistory()  # the new worker reads the pods topic whole, the relabel included
    pods.add("pod-a:1", T0 - 30_000, a)
    pods.add("pod-a:2", T0 + 50_000, relabel)
    restarted = DeviceRun(DeviceStage(BOOK, SETTINGS, pods), table, checkpoints)
    restarted.stage.on_pod_event("pod-a", T0 - 30_000)
    restarted.stage.on_pod_event("pod-a", T0 + 50_000)
    # pod-a had an event after the pods position written with the last checkpoints: the
    # handler restores the retained windows that name it, and re-emits those it changes.
    restarted.recheck(partition, {"pod-a"})
    replay = [
        (o, ev)
        for o, ev in zip(first_batch + second_batch, samples + later, strict=True)
        if o >= committed[partition]
    ]
    restarted.batch(partition, [o for o, _ in replay], [ev for _, ev in replay], 1_100.0)
    restarted.poll(2_000.0)
    restarted.write()
    after = [r for r in table.rows.values() if r.window_start_ms == T0 and r.pod_uid == "pod-a"]
    assert [r.team for r in after] == ["ranking"]
    assert table.rows == live_table.rows

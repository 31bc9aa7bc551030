"""The worker's writes and restores as unit tests model them, without ClickHouse or Kafka.

`Table` keeps the highest version per row key, as a ReplacingMergeTree read with FINAL does
(the later insert on a tie); `CheckpointTable` is the `window_state` table read the way
`streams.worker.checkpoints.Checkpoints.load` reads it, the outbox's pending checkpoints first.
`DeviceRun` and `PodRun` drive a stage the way its handler does: look up what is missing,
restore it, fold the batch in, poll, and keep the output pending until a durable write.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from schemas.events import CloudEvent, GpuSample, ProcessSample, TokenDelta, make_event
from streams.rows import WindowStateRow
from streams.worker.device_stage import DeviceStage, PodCostPartial, SampleCounts
from streams.worker.pod_stage import Marker, PodStage
from streams.worker.watermark import Partition

GB = 10**9
StateKey = tuple[str, int, str]  # (stage, window start ms, unit)


def gpu_sample(
    device: str,
    time_ms: int,
    event_id: str,
    processes: Iterable[tuple[str | None, float, float | None]] = (),
    *,
    interval_s: float = 10.0,
    mig: tuple[str, int] | None = None,
    gpu_model: str = "NVIDIA H100 80GB HBM3",
    mem_total_bytes: int = 80 * GB,
) -> CloudEvent[GpuSample]:
    """A sample of `device`; processes are (pod uid or None for a host process, GB, SM %)."""
    procs = tuple(
        ProcessSample(100 + i, uid, None, int(mem_gb * GB), sm)
        for i, (uid, mem_gb, sm) in enumerate(processes)
    )
    data = GpuSample(
        cluster="c1",
        node=f"node-{device}",
        device_uuid=device,
        gpu_uuid=f"GPU-{device}",
        gpu_model=gpu_model,
        mig_profile=mig[0] if mig else None,
        mig_slices=mig[1] if mig else None,
        gpu_slices=7,
        interval_s=interval_s,
        mem_total_bytes=mem_total_bytes,
        mem_used_bytes=min(sum(p.mem_used_bytes for p in procs), mem_total_bytes),
        sm_util_pct=None if mig else 40.0,
        node_labels={},
        processes=procs,
    )
    return make_event(data, event_id=event_id, source=f"agent/{device}", time_ms=time_ms)


def token_delta(
    pod_uid: str, model: str, time_ms: int, event_id: str, prompt: int = 100, completion: int = 40
) -> CloudEvent[TokenDelta]:
    delta = TokenDelta(
        "c1",
        "ns",
        f"pod-{pod_uid}",
        pod_uid,
        model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        requests=1,
        interval_s=15.0,
        cached_tokens=3,
        prefill_s=0.25,
        decode_s=1.5,
    )
    return make_event(delta, event_id=event_id, source="tokens", time_ms=time_ms)


@dataclass
class Table:
    """Rows by key, the highest version kept (the later write on a tie); `ties` lists the
    writes of an existing version with other values, which a merge could resolve either way."""

    rows: dict[str, Any] = field(default_factory=dict)
    ties: list[tuple[Any, Any]] = field(default_factory=list)

    def write(self, rows: Iterable[Any]) -> None:
        for row in rows:
            current = self.rows.get(row.key)
            if current is not None and row.version == current.version and row != current:
                self.ties.append((current, row))
            if current is None or row.version >= current.version:
                self.rows[row.key] = row


@dataclass
class CheckpointTable:
    states: dict[StateKey, WindowStateRow] = field(default_factory=dict)
    # The replay floor each stage wrote with its latest durable write (its "floor@" marks).
    floors: dict[str, int] = field(default_factory=dict)

    def write(self, states: Iterable[WindowStateRow]) -> None:
        for state in states:
            key = (state.stage, state.window_start_ms, state.unit)
            current = self.states.get(key)
            if current is None or state.version >= current.version:
                self.states[key] = state

    def load(
        self, stage: str, keys: set[tuple[int, str]], pending: dict[StateKey, bytes]
    ) -> dict[tuple[int, str], bytes]:
        """As `Checkpoints.load`: the outbox's pending checkpoint, else the table's latest."""
        found = {}
        for start, unit in keys:
            blob = pending.get((stage, start, unit))
            if blob is None and (row := self.states.get((stage, start, unit))) is not None:
                blob = row.state
            if blob is not None:
                found[(start, unit)] = blob
        return found

    def frontier_ms(self, stage: str) -> int | None:
        starts = [start for s, start, _ in self.states if s == stage]
        return max(starts) if starts else None


@dataclass
class _Outbox:
    """What was emitted and not yet written: a crash loses it."""

    rows: list[Any] = field(default_factory=list)
    cost_rows: list[Any] = field(default_factory=list)  # stage two's cost-per-token rows
    states: list[WindowStateRow] = field(default_factory=list)
    pending: dict[StateKey, bytes] = field(default_factory=dict)
    floor: int | None = None  # the stage's replay floor at the last poll

    def add_states(self, states: list[WindowStateRow]) -> None:
        self.states += states
        for s in states:
            self.pending[(s.stage, s.window_start_ms, s.unit)] = s.state


class DeviceRun:
    """Stage one between its input batches and its two tables, as `DeviceHandler` runs it."""

    def __init__(self, stage: DeviceStage, table: Table, checkpoints: CheckpointTable) -> None:
        self.stage = stage
        self.table = table
        self.checkpoints = checkpoints
        self.outbox = _Outbox()
        self.partials: list[PodCostPartial] = []  # every partial emitted, for stage two
        self.restored = 0
        frontier = checkpoints.frontier_ms("device")
        if frontier is not None:  # what the handler does at start and on assignment
            stage.raise_lookup_floor(frontier + stage.settings.window_ms)
        self.floor = checkpoints.floors.get("device")
        self.committed_floor: int | None = None

    def batch(
        self,
        partition: Partition,
        offsets: list[int],
        events: list[CloudEvent[GpuSample]],
        now_s: float,
    ) -> SampleCounts:
        if self.floor is not None:
            self.stage.set_replay_floor(partition, self.floor)
        keys = self.stage.missing(partition, events, now_s)
        if keys:
            found = self.checkpoints.load("device", keys, self.outbox.pending)
            self.restored += len(found)
            assert self.stage.restore(partition, keys, found) == []
        counts = self.stage.add_samples(partition, offsets, events, now_s)
        self.poll(now_s)
        return counts

    def recheck(self, partition: Partition, changed: set[str]) -> None:
        """As `DeviceHandler._recheck` at start: restore the retained windows of `partition`
        naming a pod in `changed` and re-emit those whose metadata changed."""
        frontier = self.checkpoints.frontier_ms("device")
        if frontier is None:
            return
        settings = self.stage.settings
        since = frontier - settings.retention_ms - settings.window_ms
        found = {
            (start, unit): row.state
            for (stage, start, unit), row in self.checkpoints.states.items()
            if stage == "device"
            and start >= since
            and row.source == partition[1]
            and changed & set(row.owners)
        }
        self.stage.restore(partition, set(found), found)
        self.stage.recheck(found)

    def poll(self, now_s: float) -> None:
        out = self.stage.poll(now_s)
        assert out.unemittable == []
        self.outbox.rows += out.rows
        self.outbox.add_states(out.states)
        self.partials += out.partials
        floor = self.stage.replay_floor(now_s)
        if floor is not None:
            self.outbox.floor = floor

    def write(self, *, committed: bool = True) -> dict[Partition, int]:
        """The durable write, then the positions a commit would take (`committed`: the
        commit happened too). The replay floor goes out one commit late, as the handler's."""
        self.table.write(self.outbox.rows)
        self.checkpoints.write(self.outbox.states)
        _write_floor(self.checkpoints, "device", self.committed_floor)
        if committed and self.outbox.floor is not None:
            self.committed_floor = self.outbox.floor
        self.outbox = _Outbox()
        return self.stage.held.positions()


PodInput: TypeAlias = CloudEvent[TokenDelta] | PodCostPartial | Marker


class PodRun:
    """Stage two as `TokenCostHandler` runs it: restore per batch, then record by record."""

    def __init__(
        self,
        stage: PodStage,
        token_table: Table,
        cost_table: Table,
        checkpoints: CheckpointTable,
    ) -> None:
        self.stage = stage
        self.token_table = token_table
        self.cost_table = cost_table
        self.checkpoints = checkpoints
        self.outbox = _Outbox()
        frontier = checkpoints.frontier_ms("pod")
        if frontier is not None:
            stage.raise_lookup_floor(frontier + stage.settings.window_ms)
        self.floor = checkpoints.floors.get("pod")
        self.committed_floor: int | None = None

    def batch(
        self, partition: Partition, offsets: list[int], items: Sequence[PodInput], now_s: float
    ) -> list[str]:
        window_ms = self.stage.settings.window_ms
        keys = set()
        for item in items:
            if isinstance(item, PodCostPartial):
                keys.add((item.window_start_ms, item.pod_uid))
            elif not isinstance(item, Marker):
                keys.add((item.time_ms - item.time_ms % window_ms, item.data.pod_uid))
        if self.floor is not None:
            self.stage.set_replay_floor(partition, self.floor)
        missing = self.stage.missing(partition, keys)
        if missing:
            found = self.checkpoints.load("pod", missing, self.outbox.pending)
            assert self.stage.restore(partition, missing, found) == []
        statuses = []
        for offset, item in zip(offsets, items, strict=True):
            if isinstance(item, PodCostPartial | Marker):
                statuses.append(self.stage.add_internal(partition, offset, item, now_s))
            else:
                statuses.append(self.stage.add_tokens(partition, offset, item, now_s))
        self.poll(now_s)
        return statuses

    def poll(self, now_s: float) -> None:
        out = self.stage.poll(now_s)
        assert out.unemittable == []
        self.outbox.rows += out.token_rows
        self.outbox.cost_rows += out.cost_rows
        self.outbox.add_states(out.states)
        floor = self.stage.replay_floor()
        if floor is not None:
            self.outbox.floor = floor

    def write(self, *, committed: bool = True) -> dict[Partition, int]:
        self.token_table.write(self.outbox.rows)
        self.cost_table.write(self.outbox.cost_rows)
        self.checkpoints.write(self.outbox.states)
        _write_floor(self.checkpoints, "pod", self.committed_floor)
        if committed and self.outbox.floor is not None:
            self.committed_floor = self.outbox.floor
        self.outbox = _Outbox()
        return self.stage.held.positions()


def _write_floor(checkpoints: CheckpointTable, stage: str, floor: int | None) -> None:
    if floor is not None:
        checkpoints.floors[stage] = max(checkpoints.floors.get(stage, floor), floor)

"""Stage one of the worker: GPU samples -> cost rows per (window, device).

Pure state machine, no I/O: its handler feeds it decoded samples with their offsets and pod
events, and polls it for rows to write. Windows close on the event-time watermark (or when
every input is idle). Each emission carries a version that only grows with the inputs it saw,
so re-emissions replace earlier rows and replays write the same rows again.

A closed window is packed (streams.worker.packing) and its packed form is emitted with its rows
as a checkpoint (`WindowStateRow`): from then on it holds no input offsets, so commits follow
the open windows, and a restart replays about one window, not the retention. Packed windows
stay in memory for `retention_s` (corrections, late pod metadata); a sample for a window that
is not in memory but may have a checkpoint (older than the retention, or closed before a
restart or rebalance) is held up until the handler restores it (`missing`, `restore`). Samples
are too late only past `late_horizon_s`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from sys import intern
from typing import Any

import orjson

from runtime.horizon import LATE_HORIZON_S
from schemas.events import CloudEvent, GpuSample
from streams.allocation import AllocationSettings, DeviceWindow, Pricer, sample_folder
from streams.allocation import finalize_device_window as finalize
from streams.labels import PodHistory
from streams.pricing import PriceBook
from streams.rows import KIND_USAGE, CostRow, WindowStateRow, check_window_times
from streams.windows import window_of
from streams.worker.packing import StateError, pack_device, unpack_device
from streams.worker.watermark import HeldOffsets, Partition, Watermark

META_BITS = 32
STAGE = "device"  # the checkpoints' `stage`

OK = "ok"
DUPLICATE = "duplicate"
LATE = "late"  # for a closed window still within the late horizon: a correction
TOO_LATE = "too_late"
NO_TIME = -(2**63)  # below any event time: "no accepted sample yet"


@dataclass(frozen=True, slots=True)
class StreamSettings:
    allocation: AllocationSettings = field(default_factory=AllocationSettings)
    grace_s: float = 10.0
    idle_flush_s: float = 30.0
    retention_s: float = 3600.0  # closed windows kept in memory (corrections, late metadata)
    # How long after its end a window still takes samples, as corrections restored from its
    # checkpoint where it left memory; older samples are `too_late` (design §5).
    late_horizon_s: float = float(LATE_HORIZON_S)
    # An event stamped further ahead of the worker's clock than this (and of its record
    # timestamp, where that is the broker's) is dead-lettered as `clock_skew` (design §5).
    max_clock_skew_s: float = 300.0

    @property
    def window_ms(self) -> int:
        return self.allocation.window_s * 1000

    @property
    def grace_ms(self) -> int:
        return int(self.grace_s * 1000)

    @property
    def retention_ms(self) -> int:
        return int(self.retention_s * 1000)

    @property
    def late_horizon_ms(self) -> int:
        """Never shorter than the retention: what memory holds is always accepted."""
        return int(max(self.late_horizon_s, self.retention_s) * 1000)


@dataclass(frozen=True, slots=True)
class PodCostPartial:
    """A pod's cost on one device in one window, re-keyed by pod uid for stage two."""

    window_start_ms: int
    device_uuid: str
    pod_uid: str
    cost_usd: Decimal
    samples: int  # samples of that (window, device): a version input
    version: int

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "kind": "partial",
                "window_start_ms": self.window_start_ms,
                "device_uuid": self.device_uuid,
                "pod_uid": self.pod_uid,
                "cost_usd": format(self.cost_usd, "f"),
                "samples": self.samples,
                "version": self.version,
            }
        )


Key = tuple[int, str]  # (window start, device uuid)
_NOTHING_HELD: dict[Partition, int] = {}  # shared by every checkpointed slot: never written


class _Slot:
    """One (window, device) while open or being corrected. Once emitted, a closed one is kept
    as its packed bytes alone (`DeviceStage._closed`), and revived when input comes for it."""

    __slots__ = (
        "closed",
        "device_uuid",
        "dirty",
        "emitted_version",
        "held",
        "sources",
        "window",
    )

    def __init__(self, window_start_ms: int, device_uuid: str, source: Partition) -> None:
        self.window = DeviceWindow(window_start_ms)
        self.device_uuid = device_uuid
        self.held = _NOTHING_HELD  # input offsets since the last checkpoint
        self.sources: tuple[Partition, ...] = (source,)  # the partitions that fed it
        self.closed = False
        self.dirty = False
        self.emitted_version = -1

    def fed_by(self, partition: Partition) -> None:
        if partition not in self.sources:
            self.sources = (*self.sources, partition)


@dataclass
class SampleCounts:
    """What became of a batch of samples (indices of too-late ones, to dead-letter them)."""

    ok: int = 0
    late: int = 0
    duplicates: int = 0
    too_late: list[int] = field(default_factory=list)
    unknown_models: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Unemittable:
    """A (window, unit) whose rows could not be formed or written: it is dropped, its inputs
    dead-lettered. `held` is the earliest offset per partition its inputs came from."""

    window_start_ms: int
    unit: str  # the device uuid (stage one) or pod uid (stage two)
    held: dict[Partition, int]
    error: str


@dataclass
class StageOutput:
    rows: list[CostRow] = field(default_factory=list)
    partials: list[PodCostPartial] = field(default_factory=list)
    states: list[WindowStateRow] = field(default_factory=list)
    unemittable: list[Unemittable] = field(default_factory=list)


class DeviceStage:
    def __init__(self, book: PriceBook, settings: StreamSettings, pods: PodHistory) -> None:
        self.book = book
        self.pricer = Pricer(book)
        self.fold = sample_folder(settings.allocation)
        self.settings = settings
        self.pods = pods
        self.watermark = Watermark(settings.idle_flush_s)
        self.held = HeldOffsets()  # what a restart must replay: the commit positions
        self._open: dict[int, dict[str, _Slot]] = {}
        # Closed windows: packed bytes, or a revived `_Slot` until it is emitted again.
        self._closed: dict[int, dict[str, _Slot | bytes]] = {}
        # pod uid -> device -> the latest retained window of that device naming the pod
        self._by_pod: dict[str, dict[str, int]] = {}
        # device -> (the partition its samples came from, its latest retained window)
        self._devices: dict[str, tuple[Partition, int]] = {}
        self._dirty: set[Key] = set()
        self._closed_until_ms: int | None = None
        # Windows below this may have a checkpoint that memory does not hold: the last window
        # of a previous run or owner (`raise_lookup_floor`), or one this stage let go of.
        self._lookup_below: int | None = None
        self._absent: set[Key] = set()  # looked up, no checkpoint: new (until the next poll)
        self._opened_at: dict[int, int | None] = {}  # open window -> watermark when it opened
        self._replay_floors: dict[Partition, int] = {}
        # What the slots emitted by the last poll held, should the handler drop one (discard).
        self._emitted_held: dict[Key, dict[Partition, int]] = {}

    # ------------------------------------------------------------------ input

    def skip(self, partition: Partition, offset: int) -> None:
        """A record that is not a sample (rejected, dead-lettered) still moves the position."""
        self.held.consumed(partition, offset)

    def add_sample(
        self, partition: Partition, offset: int, event: CloudEvent[GpuSample], now_s: float
    ) -> str:
        """Fold one sample in (see `add_samples`); returns its status."""
        counts = self.add_samples(partition, [offset], [event], now_s)
        if counts.too_late:
            return TOO_LATE
        return DUPLICATE if counts.duplicates else LATE if counts.late else OK

    def add_samples(
        self,
        partition: Partition,
        offsets: list[int],
        events: list[CloudEvent[GpuSample]],
        now_s: float,
    ) -> SampleCounts:
        """Fold in a batch of samples read from one partition, in offset order.

        A sample that opens a (window, device) is too late when that window's late horizon had
        passed by the watermark just before it (the batch's earlier samples included, and no
        less than the partition's replay floor), as if the samples came one at a time."""
        counts = SampleCounts()
        if not events:
            return counts
        self.held.consumed(partition, offsets[-1])
        size = self.settings.window_ms
        fold = self.fold
        price_of = self.pricer.price
        hold = self.held.hold
        open_, closed_ = self._open, self._closed
        # The latest time of the samples before the current one, too-late ones left out: an
        # event that is refused never moves its partition's clock.
        max_time_ms = NO_TIME
        ok = late = 0
        horizon = self.settings.late_horizon_ms
        below = self._lookup_below
        for index, event in enumerate(events):
            time_ms = event.time_ms
            start = time_ms - time_ms % size
            sample = event.data
            device = sample.device_uuid
            slots = open_.get(start)
            slot = slots.get(device) if slots is not None else None
            if slot is None:
                closed = closed_.get(start)
                entry = closed.get(device) if closed is not None else None
                if entry is None:
                    # Only a new (window, device) can be too late (rare: once per window).
                    if max_time_ms != NO_TIME:
                        self.watermark.observe(partition, max_time_ms, now_s)
                    watermark = self._watermark_at_least(partition, now_s)
                    if watermark is not None and start + size + horizon <= watermark:
                        counts.too_late.append(index)
                        continue
                    if below is not None and start < below and (start, device) not in self._absent:
                        raise RuntimeError(
                            f"window {start} of {device} may have a checkpoint: "
                            "restore it (missing, restore) before adding its samples"
                        )
                    # One string per device for all its windows (the decoded one is per sample).
                    slot = _Slot(start, intern(device), partition)
                    if slots is None:
                        slots = open_[start] = {}
                        self._opened_at[start] = watermark
                    slots[slot.device_uuid] = slot
                elif isinstance(entry, bytes):
                    slot = self._revive(start, device, entry, partition)
                else:
                    slot = entry
                    if slot.sources[0] != partition:
                        slot.fed_by(partition)
            if time_ms > max_time_ms:
                max_time_ms = time_ms
            window = slot.window
            price, cost = price_of(sample, time_ms)
            if not fold(window, event.id, time_ms, sample, price, cost):
                counts.duplicates += 1
                continue
            if not price.known_model:
                counts.unknown_models.append(sample.gpu_model)
            # What a restart must replay: the earliest offset of each slot and window.
            if slot.held is _NOTHING_HELD:
                slot.held = {}
            hold(start, slot.held, partition, offsets[index])
            if slot.closed:
                self._mark_dirty(start, slot)
                late += 1
            else:
                ok += 1
        counts.ok, counts.late = ok, late
        if max_time_ms != NO_TIME:
            self.watermark.observe(partition, max_time_ms, now_s)
        return counts

    # ------------------------------------------------------------------ checkpoints

    def raise_lookup_floor(self, end_ms: int | None) -> None:
        """Windows starting before `end_ms` may have checkpoints written by an earlier run or
        another owner (the end of the latest checkpointed window): `missing` reports theirs."""
        if end_ms is not None and (self._lookup_below is None or end_ms > self._lookup_below):
            self._lookup_below = end_ms

    def _watermark_at_least(self, partition: Partition, now_s: float) -> int | None:
        """The watermark, or, where higher, the partition's replay floor: after a restart a
        record is judged too late against no less than the watermark it first met."""
        watermark = self.watermark.value(now_s)
        floor = self._replay_floors.get(partition)
        if floor is None:
            return watermark
        return floor if watermark is None or watermark < floor else watermark

    def set_replay_floor(self, partition: Partition, floor_ms: int) -> None:
        """What `replay_floor` was when the committed position of `partition` was written."""
        self._replay_floors[partition] = floor_ms

    def replay_floor(self, now_s: float) -> int | None:
        """A watermark no record after the commit positions met less of: the watermark when
        the oldest open window opened (its first record is the earliest a restart replays),
        or the watermark itself with nothing open."""
        opened = [self._opened_at.get(start) for start in self._open]
        if self._open:
            known = [value for value in opened if value is not None]
            return min(known) if len(known) == len(opened) else None
        return self.watermark.value(now_s)

    def missing(
        self, partition: Partition, events: list[CloudEvent[GpuSample]], now_s: float
    ) -> set[Key]:
        """The (window, device) keys of these samples whose checkpoint must be looked up
        before `add_samples`: not in memory, not too late, and below the lookup floor."""
        below = self._lookup_below
        if below is None:
            return set()
        size = self.settings.window_ms
        watermark = self._watermark_at_least(partition, now_s)
        too_late = (
            NO_TIME if watermark is None else watermark - size - self.settings.late_horizon_ms
        )
        keys: set[Key] = set()
        for event in events:
            time_ms = event.time_ms
            start = time_ms - time_ms % size
            if start >= below or start <= too_late:
                continue
            key = (start, event.data.device_uuid)
            if key in keys or key in self._absent:
                continue
            if key[1] in self._open.get(start, ()) or key[1] in self._closed.get(start, ()):
                continue
            keys.add(key)
        return keys

    def restore(self, partition: Partition, keys: set[Key], found: dict[Key, bytes]) -> list[Key]:
        """Install the checkpoints `found` for `keys` (fed by `partition`); the keys without
        one are new windows. Returns the keys whose checkpoint did not decode: they are taken
        as new, and the caller reports them."""
        damaged = []
        for key in keys:
            start, device = key
            if device in self._open.get(start, ()) or device in self._closed.get(start, ()):
                continue  # memory is newer than any checkpoint
            blob = found.get(key)
            if blob is None:
                self._absent.add(key)
                continue
            try:
                window, _ = unpack_device(blob)
            except StateError:
                damaged.append(key)
                self._absent.add(key)
                continue
            device = intern(device)
            self._closed.setdefault(start, {})[device] = blob
            self._index(start, device, window.owners, partition)
        return damaged

    def _revive(self, start: int, device: str, packed: bytes, partition: Partition) -> _Slot:
        """The closed window `packed` as a live slot, in its place, to take a correction."""
        slot = _Slot(start, device, partition)
        slot.window, slot.emitted_version = unpack_device(packed)
        slot.closed = True
        self._closed[start][device] = slot
        return slot

    def _index(
        self, start: int, device: str, owners: Iterable[str], partition: Partition | None
    ) -> None:
        """Note that window `start` of `device` names `owners` (for `on_pod_event`)."""
        for owner in owners:
            devices = self._by_pod.get(owner)
            if devices is None:
                devices = self._by_pod[owner] = {}
            if devices.get(device, start - 1) < start:
                devices[device] = start
        known = self._devices.get(device)
        if known is None or known[1] < start or partition is not None:
            source = partition if partition is not None else known[0] if known else ("", -1)
            self._devices[device] = (source, max(start, known[1]) if known else start)

    def recheck(self, keys: Iterable[Key]) -> None:
        """Re-emit these closed windows (restored from their checkpoints) if the pod metadata
        they read changed since: pod events that came while no worker held them."""
        for start, device in keys:
            entry = self._closed.get(start, {}).get(device)
            if entry is not None:
                self._mark_dirty(start, self._live(start, device, entry))

    def _live(self, start: int, device: str, entry: _Slot | bytes) -> _Slot:
        if isinstance(entry, _Slot):
            return entry
        known = self._devices.get(device)
        return self._revive(start, device, entry, known[0] if known else ("", -1))

    def on_pod_event(self, uid: str, time_ms: int) -> None:
        """Metadata arrived (already in the pod history): the retained closed windows of this
        pod whose owner it can change are re-emitted, those that can see it (time <= end +
        grace) and, where it is the pod's earliest event, those before it (first-known
        metadata, design §3 step 6)."""
        devices = self._by_pod.get(uid)
        if not devices:
            return
        reach = self.settings.window_ms + self.settings.grace_ms
        can_change = self.pods.can_change
        for start, slots in self._closed.items():
            if not can_change(uid, time_ms, start + reach):
                continue
            for device in devices:
                entry = slots.get(device)
                if entry is None:
                    continue
                owners = (
                    entry.window.owners
                    if isinstance(entry, _Slot)
                    else unpack_device(entry)[0].owners
                )
                if uid in owners:
                    self._mark_dirty(start, self._live(start, device, entry))

    def _mark_dirty(self, start: int, slot: _Slot) -> None:
        slot.dirty = True
        key = (start, slot.device_uuid)
        self._dirty.add(key)
        # A correction can bring a pod the window did not have when it closed: that pod's
        # metadata must find the window too (on_pod_event).
        self._index(start, slot.device_uuid, slot.window.owners, None)

    # ------------------------------------------------------------------ output

    def poll(self, now_s: float) -> StageOutput:
        out = StageOutput()
        self._absent.clear()
        self._emitted_held = {}
        watermark = self.watermark.value(now_s)
        if watermark is None:
            # No input yet: nothing closes, but windows restored for pod changes re-emit.
            self._emit_dirty(out)
            for failed in out.unemittable:
                self.discard(failed.window_start_ms, failed.unit)
            return out
        flush_all = self.watermark.all_idle(now_s)
        size, grace = self.settings.window_ms, self.settings.grace_ms
        for start in sorted(self._open):
            if not flush_all and start + size + grace > watermark:
                break
            slots = self._open.pop(start)
            closed = self._closed.setdefault(start, {})
            for device, slot in slots.items():
                slot.closed = True
                closed[device] = slot
                self._index(start, device, slot.window.owners, slot.sources[0])
                self._emit(start, slot, out)
            self._closed_until_ms = max(self._closed_until_ms or 0, start + size)
        if not flush_all:
            # Every window ending at or before this point is closed, even the empty ones.
            boundary = window_of(watermark - grace, self.settings.allocation.window_s)
            if self._open.keys() and min(self._open) < boundary:
                boundary = min(self._open)
            self._closed_until_ms = max(self._closed_until_ms or 0, boundary)
        self._emit_dirty(out)
        for failed in out.unemittable:
            self.discard(failed.window_start_ms, failed.unit)
        # Every closed window was just checkpointed (or dropped): replaying its input would
        # rebuild nothing the checkpoint does not hold, so only open windows hold offsets.
        for start in self.held.windows():
            if start not in self._open:
                self.held.release(start)
        for start in [s for s in self._opened_at if s not in self._open]:
            del self._opened_at[start]
        self._expire(watermark)
        return out

    def _emit_dirty(self, out: StageOutput) -> None:
        for start, device in sorted(self._dirty):
            dirty = self._closed.get(start, {}).get(device)
            if isinstance(dirty, _Slot) and dirty.dirty:
                self._emit(start, dirty, out)
        self._dirty.clear()

    def _emit(self, start: int, slot: _Slot, out: StageOutput) -> None:
        """Add the slot's rows, pod-cost partials and checkpoint to `out`, and pack it; a slot
        whose rows cannot be formed goes to `out.unemittable` instead (`poll` drops it), and
        the stage goes on."""
        slot.dirty = False
        window = slot.window
        try:
            end = start + self.settings.window_ms
            check_window_times(start, end)
            as_of = end + self.settings.grace_ms
            meta = self.pods.count_as_of(window.owners, as_of)
            version = (window.sample_count << META_BITS) | meta
            if version == slot.emitted_version:
                self._pack(slot, None)
                return
            rows = finalize(
                window,
                lambda uid: self.pods.as_of(uid, as_of),
                self.settings.allocation,
                version,
            )
            partials = [
                PodCostPartial(
                    start,
                    slot.device_uuid,
                    row.pod_uid,
                    row.cost_usd,
                    window.sample_count,
                    version,
                )
                for row in rows
                if row.kind == KIND_USAGE
            ]
            packed = pack_device(window, version)
        except Exception as exc:  # one window's data, whatever it is, must not stop the stage
            out.unemittable.append(Unemittable(start, slot.device_uuid, dict(slot.held), repr(exc)))
            return
        slot.emitted_version = version
        out.rows += rows
        out.partials += partials
        out.states.append(
            WindowStateRow(
                STAGE,
                start,
                slot.device_uuid,
                version,
                packed,
                slot.sources[0][1],
                tuple(window.owners),
            )
        )
        if slot.held:
            self._emitted_held[(start, slot.device_uuid)] = slot.held
        self._pack(slot, packed)

    def _pack(self, slot: _Slot, packed: bytes | None) -> None:
        """Keep the emitted slot as its packed bytes: `packed`, or its last checkpoint's."""
        if packed is None:
            packed = pack_device(slot.window, slot.emitted_version)
        self._closed[slot.window.window_start_ms][slot.device_uuid] = packed

    def discard(self, start: int, device: str) -> dict[Partition, int]:
        """Drop the (window, device) `start`, `device` (its rows cannot be emitted): it holds
        no offsets any more, so commits move past its inputs. Returns what it held."""
        entry: _Slot | bytes | None = None
        for group in (self._open, self._closed):
            slots: dict[str, Any] | None = group.get(start)
            if slots is not None and device in slots:
                entry = slots.pop(device)
                if not slots:
                    del group[start]
                break
        if entry is None:
            return {}
        self._dirty.discard((start, device))
        units = [
            s.held
            for g in (self._open, self._closed)
            for s in g.get(start, {}).values()
            if isinstance(s, _Slot)
        ]
        self.held.rebuild(start, units)
        held = entry.held if isinstance(entry, _Slot) else {}
        return self._emitted_held.pop((start, device), held)

    def _expire(self, watermark: int) -> None:
        """Let go of the closed windows past the retention: their checkpoints stand for them
        (a later sample restores one), so windows before them are looked up from now on."""
        horizon = watermark - self.settings.retention_ms - self.settings.window_ms
        expired = [s for s in self._closed if s <= horizon]
        for start in expired:
            del self._closed[start]
        if expired:
            self.raise_lookup_floor(max(expired) + self.settings.window_ms)
            # The pod and device indexes forget what only expired windows named.
            for uid in list(self._by_pod):
                devices = self._by_pod[uid]
                for device in [d for d, latest in devices.items() if latest <= horizon]:
                    del devices[device]
                if not devices:
                    del self._by_pod[uid]
            for device in [d for d, (_, latest) in self._devices.items() if latest <= horizon]:
                del self._devices[device]

    # ------------------------------------------------------------------ partitions

    def revoke(self, partitions: Iterable[Partition]) -> set[str]:
        """Drop the state fed by partitions this worker no longer owns; returns the devices
        whose windows were dropped. Their checkpoints stay, for the next owner."""
        lost = set(partitions)
        dropped: set[str] = set()

        def fed_by_lost(device: str, entry: _Slot | bytes) -> bool:
            if isinstance(entry, _Slot):
                return not lost.isdisjoint(entry.sources)
            known = self._devices.get(device)
            return known is not None and known[0] in lost

        for group in (self._open, self._closed):
            for start in list(group):
                slots: dict[str, Any] = group[start]
                for device in [d for d, e in slots.items() if fed_by_lost(d, e)]:
                    del slots[device]
                    dropped.add(device)
                if not slots:
                    del group[start]
        for uid in list(self._by_pod):
            devices = self._by_pod[uid]
            for device in dropped & devices.keys():
                del devices[device]
            if not devices:
                del self._by_pod[uid]
        for device in dropped:
            self._devices.pop(device, None)
        self._dirty = {k for k in self._dirty if k[1] in self._closed.get(k[0], {})}
        kept = [
            (start, slot.held)
            for group in (self._open, self._closed)
            for start, slots in group.items()
            for slot in slots.values()
            if isinstance(slot, _Slot)
        ]
        self.held.revoke(lost, kept)
        self.watermark.forget(lost)
        return dropped

    def closed_until_ms(self) -> int | None:
        """Every window of this stage ending at or before this time has been emitted."""
        return self._closed_until_ms

    @property
    def open_windows(self) -> int:
        return sum(len(s) for s in self._open.values())

    @property
    def closed_windows(self) -> int:
        """Closed (window, device) slots in memory (packed, or live while corrected)."""
        return sum(len(s) for s in self._closed.values())

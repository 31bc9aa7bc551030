"""Stage two of the worker: token deltas and re-keyed pod costs -> token and cost-per-token rows.

Its inputs are the tokens topic and the internal pod-costs topic, both keyed by pod uid and
co-partitioned. Stage one broadcasts a marker per sample partition to every internal partition
once its windows up to some end are emitted; a (window, pod) closes when every sample partition
has passed its end and the token watermark has passed its end plus grace.

As in stage one, a closed (window, pod) is packed and checkpointed with its rows
(`WindowStateRow`, stage "pod"), holds no offsets from then on, stays in memory for the
retention, and is restored from its checkpoint for input up to the late horizon.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Annotated

import msgspec
import orjson
from msgspec import Meta, Struct

from schemas.events import CloudEvent, TokenDelta
from streams.labels import PodHistory, resolve_owner
from streams.rows import (
    ROW_TIME_MAX_MS,
    ROW_TIME_MIN_MS,
    TokenCostRow,
    TokenRow,
    WindowStateRow,
    check_window_times,
)
from streams.tokens import PodOwner, TokenWindow, token_cost_rows
from streams.windows import window_of
from streams.worker.device_stage import (
    DUPLICATE,
    LATE,
    OK,
    TOO_LATE,
    PodCostPartial,
    StreamSettings,
    Unemittable,
)
from streams.worker.packing import StateError, pack_pod, unpack_pod
from streams.worker.watermark import HeldOffsets, Partition, Watermark

STAGE = "pod"  # the checkpoints' `stage`
Key = tuple[int, str]  # (window start, pod uid)
_NOTHING_HELD: dict[Partition, int] = {}  # shared by every checkpointed slot: never written

# The end of a marker from a sample partition that has no data at all ("do not wait for me").
# Stage two does not take it for a time: it only stops that partition holding the others back.
MARKER_ALL_IDLE_MS = 2**62


def encode_marker(source_partition: int, source_partitions: int, end_ms: int) -> bytes:
    """Stage one's "my windows up to `end_ms` are emitted" (or MARKER_ALL_IDLE_MS)."""
    return orjson.dumps(
        {
            "kind": "marker",
            "source_partition": source_partition,
            "source_partitions": source_partitions,
            "end_ms": end_ms,
        }
    )


_Count = Annotated[int, Meta(ge=0, le=2**63 - 1)]
_PartitionNo = Annotated[int, Meta(ge=0, le=99_999)]
_Text = Annotated[str, Meta(min_length=1)]
_Money = Annotated[str, Meta(pattern=r"^-?[0-9]+(\.[0-9]+)?$")]  # format(Decimal, "f")


class Marker(Struct, frozen=True, tag_field="kind", tag="marker"):
    """A sample partition's windows up to `end_ms` are emitted; `idle`: it has no data."""

    source_partition: _PartitionNo
    source_partitions: Annotated[int, Meta(ge=1, le=100_000)]
    end_ms: Annotated[int, Meta(ge=0)]

    @property
    def idle(self) -> bool:
        return self.end_ms >= MARKER_ALL_IDLE_MS


class _PartialWire(Struct, frozen=True, tag_field="kind", tag="partial"):
    """`PodCostPartial.encode`'s form, with its types: a value of another type is refused."""

    window_start_ms: Annotated[int, Meta(ge=ROW_TIME_MIN_MS, le=ROW_TIME_MAX_MS)]
    device_uuid: _Text
    pod_uid: _Text
    cost_usd: _Money
    samples: _Count
    version: _Count


_INTERNAL = msgspec.json.Decoder(_PartialWire | Marker)


class InvalidInternal(ValueError):
    """A record on the internal topic that is not what stage one writes."""


def decode_internal(raw: bytes | None) -> PodCostPartial | Marker:
    """A pod-cost partial or a marker, with strict types; raises InvalidInternal on anything
    else (the handler dead-letters it, like any unusable input)."""
    if raw is None:
        raise InvalidInternal("record has no value")
    try:
        message = _INTERNAL.decode(raw)
    except msgspec.MsgspecError as exc:
        raise InvalidInternal(str(exc)) from None
    if isinstance(message, Marker):
        if message.source_partition >= message.source_partitions:
            raise InvalidInternal(
                f"source_partition {message.source_partition} of "
                f"{message.source_partitions} partitions"
            )
        if not message.idle and message.end_ms > ROW_TIME_MAX_MS:
            raise InvalidInternal(f"end_ms {message.end_ms} is not a window end")
        return message
    return PodCostPartial(
        message.window_start_ms,
        message.device_uuid,
        message.pod_uid,
        Decimal(message.cost_usd),
        message.samples,
        message.version,
    )


class _PodSlot:
    """One (window, pod) while open or being corrected. Once emitted, a closed one is kept as
    its packed bytes alone (`PodStage._slots`), and revived when input comes for it."""

    __slots__ = (
        "closed",
        "dirty",
        "emitted",
        "held",
        "partials",
        "sources",
        "tokens",
        "version",
    )

    def __init__(self, source: Partition) -> None:
        self.tokens: dict[str, TokenWindow] = {}
        self.partials: dict[str, PodCostPartial] = {}
        self.held = _NOTHING_HELD  # input offsets since the last checkpoint
        self.sources: tuple[Partition, ...] = (source,)
        self.closed = False
        self.dirty = False
        self.emitted: dict[str, int] = {}  # row key -> version emitted
        self.version = -1  # of the last checkpoint

    @classmethod
    def revived(cls, key: Key, packed: bytes, source: Partition) -> _PodSlot:
        """A closed slot from its packed bytes, to take a correction."""
        start, pod_uid = key
        slot = cls(source)
        slot.version, partials, slot.tokens, slot.emitted = unpack_pod(packed)
        slot.partials = {
            device: PodCostPartial(start, device, pod_uid, Decimal(cost), samples, version)
            for device, cost, samples, version in partials
        }
        slot.closed = True
        return slot

    def pack(self, version: int) -> bytes:
        return pack_pod(
            version,
            [
                (p.device_uuid, format(p.cost_usd, "f"), p.samples, p.version)
                for p in self.partials.values()
            ],
            self.tokens,
            self.emitted,
        )

    def fed_by(self, partition: Partition) -> None:
        if partition not in self.sources:
            self.sources = (*self.sources, partition)


@dataclass
class PodOutput:
    token_rows: list[TokenRow] = field(default_factory=list)
    cost_rows: list[TokenCostRow] = field(default_factory=list)
    states: list[WindowStateRow] = field(default_factory=list)
    unemittable: list[Unemittable] = field(default_factory=list)


class PodStage:
    def __init__(self, settings: StreamSettings, pods: PodHistory) -> None:
        self.settings = settings
        self.pods = pods
        self.token_watermark = Watermark(settings.idle_flush_s)
        self.held = HeldOffsets()  # what a restart must replay: the commit positions
        self._markers: dict[int, int] = {}  # sample partition -> highest window end reported
        self._idle_sources: set[int] = set()  # sample partitions whose last marker said "idle"
        self._source_partitions = 0
        self._end_floor: int | None = None  # the reported end never goes back
        # Slots by (window, pod): closed ones as their packed bytes once emitted, revived
        # into a `_PodSlot` when input comes for them.
        self._slots: dict[tuple[int, str], _PodSlot | bytes] = {}
        self._sources: dict[str, tuple[Partition, int]] = {}  # pod -> (partition, latest)
        # Indexes by window start, so that a poll or commit costs windows, not slots (a pod
        # slot lives for the retention: thousands of pods x dozens of windows).
        self._pods_by_start: dict[int, set[str]] = {}
        self._open: dict[int, set[str]] = {}  # slots not closed yet
        self._dirty: set[tuple[int, str]] = set()
        self._last_input_s = 0.0
        self._lookup_below: int | None = None  # as in stage one (DeviceStage)
        self._absent: set[Key] = set()
        self._emitted_held: dict[Key, dict[Partition, int]] = {}  # as in DeviceStage
        self._opened_at: dict[int, int | None] = {}  # open window -> reported end at opening
        self._replay_floors: dict[Partition, int] = {}

    # ------------------------------------------------------------------ input

    def skip(self, partition: Partition, offset: int) -> None:
        self.held.consumed(partition, offset)

    def _slot_for(self, start: int, pod_uid: str, partition: Partition) -> _PodSlot | None:
        key = (start, pod_uid)
        entry = self._slots.get(key)
        slot: _PodSlot | None
        if isinstance(entry, bytes):
            slot = self._slots[key] = _PodSlot.revived(key, entry, partition)
        else:
            slot = entry
        if slot is None:
            horizon = self._too_late_until(partition)
            if horizon is not None and start <= horizon:
                return None
            below = self._lookup_below
            if below is not None and start < below and key not in self._absent:
                raise RuntimeError(
                    f"window {start} of pod {pod_uid} may have a checkpoint: "
                    "restore it (missing, restore) before adding its input"
                )
            slot = self._slots[key] = _PodSlot(partition)
            self._pods_by_start.setdefault(start, set()).add(pod_uid)
            if start not in self._open:
                self._open[start] = set()
                self._opened_at[start] = self._reported_end()
            self._open[start].add(pod_uid)
        elif slot.sources[0] != partition:
            slot.fed_by(partition)
        return slot

    def _hold(self, start: int, slot: _PodSlot, partition: Partition, offset: int) -> None:
        if slot.held is _NOTHING_HELD:
            slot.held = {}
        self.held.hold(start, slot.held, partition, offset)

    def add_tokens(
        self, partition: Partition, offset: int, event: CloudEvent[TokenDelta], now_s: float
    ) -> str:
        self.held.consumed(partition, offset)
        self._last_input_s = now_s
        start = window_of(event.time_ms, self.settings.allocation.window_s)
        slot = self._slot_for(start, event.data.pod_uid, partition)
        if slot is None:
            return TOO_LATE  # refused: it does not move its partition's clock
        self.token_watermark.observe(partition, event.time_ms, now_s)
        window = slot.tokens.setdefault(event.data.model, TokenWindow())
        if not window.add(event):
            return DUPLICATE
        self._hold(start, slot, partition, offset)
        return self._touched(start, event.data.pod_uid, slot)

    def add_internal(
        self, partition: Partition, offset: int, message: PodCostPartial | Marker, now_s: float
    ) -> str:
        self.held.consumed(partition, offset)
        self._last_input_s = now_s
        if isinstance(message, Marker):
            source = message.source_partition
            if message.idle:
                self._idle_sources.add(source)  # stops holding back, moves no clock
            else:
                self._idle_sources.discard(source)
                self._markers[source] = max(self._markers.get(source, 0), message.end_ms)
            self._source_partitions = max(self._source_partitions, message.source_partitions)
            return OK
        slot = self._slot_for(message.window_start_ms, message.pod_uid, partition)
        if slot is None:
            return TOO_LATE
        current = slot.partials.get(message.device_uuid)
        if current is not None and current.version >= message.version:
            return DUPLICATE
        slot.partials[message.device_uuid] = message
        self._hold(message.window_start_ms, slot, partition, offset)
        return self._touched(message.window_start_ms, message.pod_uid, slot)

    def _touched(self, start: int, pod_uid: str, slot: _PodSlot) -> str:
        if slot.closed:
            slot.dirty = True
            self._dirty.add((start, pod_uid))
            return LATE
        return OK

    # ------------------------------------------------------------------ checkpoints

    def raise_lookup_floor(self, end_ms: int | None) -> None:
        """As `DeviceStage.raise_lookup_floor`."""
        if end_ms is not None and (self._lookup_below is None or end_ms > self._lookup_below):
            self._lookup_below = end_ms

    def set_replay_floor(self, partition: Partition, floor_ms: int) -> None:
        """As `DeviceStage.set_replay_floor` (a reported end here)."""
        self._replay_floors[partition] = floor_ms

    def replay_floor(self) -> int | None:
        """As `DeviceStage.replay_floor`: the reported end when the oldest open window
        opened, or the reported end itself with nothing open."""
        if self._open:
            opened = [self._opened_at.get(start) for start in self._open]
            known = [value for value in opened if value is not None]
            return min(known) if len(known) == len(opened) else None
        return self._reported_end()

    def missing(self, partition: Partition, keys: Iterable[Key]) -> set[Key]:
        """Of the (window, pod) keys some input is for, those whose checkpoint must be looked
        up first: not in memory, not too late, below the lookup floor."""
        below = self._lookup_below
        if below is None:
            return set()
        too_late = self._too_late_until(partition)
        return {
            key
            for key in keys
            if key[0] < below
            and (too_late is None or key[0] > too_late)
            and key not in self._slots
            and key not in self._absent
        }

    def restore(self, partition: Partition, keys: set[Key], found: dict[Key, bytes]) -> list[Key]:
        """As `DeviceStage.restore`: install the checkpoints found; returns the damaged."""
        damaged = []
        for key in keys:
            if key in self._slots:
                continue  # memory is newer than any checkpoint
            blob = found.get(key)
            if blob is not None:
                try:
                    unpack_pod(blob)
                except StateError:
                    damaged.append(key)
                    blob = None
            if blob is None:
                self._absent.add(key)
                continue
            self._slots[key] = blob
            self._note_source(key, partition)
            self._pods_by_start.setdefault(key[0], set()).add(key[1])
        return damaged

    def recheck(self, keys: Iterable[Key]) -> None:
        """As `DeviceStage.recheck`."""
        for key in keys:
            if key in self._slots:
                self._mark_dirty(key)

    def _mark_dirty(self, key: Key) -> None:
        entry = self._slots[key]
        if isinstance(entry, bytes):
            known = self._sources.get(key[1])
            entry = _PodSlot.revived(key, entry, known[0] if known else ("", -1))
            self._slots[key] = entry
        if entry.closed:
            entry.dirty = True
            self._dirty.add(key)

    def _note_source(self, key: Key, partition: Partition) -> None:
        known = self._sources.get(key[1])
        if known is None or known[1] <= key[0]:
            self._sources[key[1]] = (partition, key[0])

    def on_pod_event(self, uid: str, time_ms: int) -> None:
        """Metadata arrived (already in the pod history): the retained closed (window, pod)
        slots whose owner it can change are re-emitted, as in stage one (design §3 step 6)."""
        reach = self.settings.window_ms + self.settings.grace_ms
        can_change = self.pods.can_change
        for start, uids in self._pods_by_start.items():
            if uid in uids and can_change(uid, time_ms, start + reach):
                self._mark_dirty((start, uid))

    # ------------------------------------------------------------------ output

    def _active_ends(self) -> list[int] | None:
        """The ends reported by the sample partitions that have data; None until every sample
        partition has sent a marker."""
        reported = len(self._markers.keys() | self._idle_sources)
        if not self._source_partitions or reported < self._source_partitions:
            return None
        return [end for p, end in self._markers.items() if p not in self._idle_sources]

    def _cost_watermark(self) -> int | None:
        """The window end up to which every sample partition's pod costs are in (with no
        sample partition holding data: every end)."""
        ends = self._active_ends()
        if ends is None:
            return None
        return min(ends) if ends else MARKER_ALL_IDLE_MS

    def _reported_end(self) -> int | None:
        """How far every sample partition with data has emitted, as a watermark: from the
        reported ends only (an idle marker is no time), and never going back."""
        ends = self._active_ends()
        if ends is None:
            return self._end_floor
        if not ends:
            if not self._markers:
                return self._end_floor
            ends = [max(self._markers.values())]  # all idle: as a watermark, the latest
        if self._end_floor is None or min(ends) > self._end_floor:
            self._end_floor = min(ends)
        return self._end_floor

    def _too_late_until(self, partition: Partition | None = None) -> int | None:
        """Windows starting at or before this are past the late horizon: input is too late.
        After a restart, no earlier than for the partition's replay floor (as in stage one)."""
        end = self._reported_end()
        floor = self._replay_floors.get(partition) if partition is not None else None
        if floor is not None:
            end = floor if end is None or end < floor else end
        if end is None:
            return None
        return end - self.settings.late_horizon_ms - self.settings.window_ms

    def poll(self, now_s: float) -> PodOutput:
        out = PodOutput()
        self._emitted_held = {}
        cost_mark = self._cost_watermark()
        token_mark = self.token_watermark.value(now_s)
        idle = self._last_input_s > 0 and now_s - self._last_input_s >= self.settings.idle_flush_s
        size, grace = self.settings.window_ms, self.settings.grace_ms
        for start in sorted(self._open):
            end = start + size
            costs_in = cost_mark is not None and cost_mark >= end
            tokens_in = token_mark is None or token_mark >= end + grace
            if not (idle or (costs_in and tokens_in)):
                break  # a later window ends later still
            for pod_uid in sorted(self._open.pop(start)):
                key = (start, pod_uid)
                slot = self._slots[key]
                assert isinstance(slot, _PodSlot)  # open slots are live
                slot.closed = True
                self._note_source(key, slot.sources[0])
                self._emit(key, slot, out)
        for key in sorted(self._dirty):
            dirty = self._slots.get(key)
            if isinstance(dirty, _PodSlot) and dirty.dirty:
                self._emit(key, dirty, out)
        self._dirty.clear()
        for failed in out.unemittable:
            self.discard(failed.window_start_ms, failed.unit)
        self._absent.clear()
        # Every closed slot was just checkpointed (or dropped): only open windows hold offsets.
        for start in self.held.windows():
            if start not in self._open:
                self.held.release(start)
        for start in [s for s in self._opened_at if s not in self._open]:
            del self._opened_at[start]
        self._expire()
        return out

    def _expire(self) -> None:
        """Let go of the closed slots past the retention (their checkpoints stand for them)."""
        end = self._reported_end()
        if end is None:
            return
        until = end - self.settings.retention_ms - self.settings.window_ms
        expired = [start for start in self._pods_by_start if start <= until]
        for start in expired:
            uids = self._pods_by_start.pop(start)
            still_open = self._open.get(start, set())
            for pod_uid in uids - still_open:
                del self._slots[(start, pod_uid)]
                self._dirty.discard((start, pod_uid))
            if still_open:  # not closed yet (its inputs stalled): kept until it closes
                self._pods_by_start[start] = set(still_open)
        if expired:
            self.raise_lookup_floor(max(expired) + self.settings.window_ms)
            for pod_uid in [u for u, (_, latest) in self._sources.items() if latest <= until]:
                del self._sources[pod_uid]

    def _emit(self, key: tuple[int, str], slot: _PodSlot, out: PodOutput) -> None:
        """Add the slot's changed rows to `out`; a slot whose rows cannot be formed goes to
        `out.unemittable` instead (`poll` drops it), and the stage goes on."""
        slot.dirty = False
        start, pod_uid = key
        emitted = slot.emitted
        try:
            end = start + self.settings.window_ms
            check_window_times(start, end)
            as_of = end + self.settings.grace_ms
            meta = self.pods.count_as_of([pod_uid], as_of)
            token_rows = {
                model: window.row(start, end, pod_uid, model, window.count)
                for model, window in slot.tokens.items()
            }
            samples = sum(p.samples for p in slot.partials.values())
            deltas = sum(w.count for w in slot.tokens.values())
            version = (samples << 40) | (deltas << 20) | meta
            cost = sum((p.cost_usd for p in slot.partials.values()), Decimal(0))
            owner = self._owner(pod_uid, as_of, slot)
            cost_rows = token_cost_rows(start, end, pod_uid, cost, token_rows, owner, version)
        except Exception as exc:  # one window's data, whatever it is, must not stop the stage
            out.unemittable.append(Unemittable(start, pod_uid, dict(slot.held), repr(exc)))
            return
        for token_row in token_rows.values():
            if emitted.get(token_row.key) != token_row.version:
                emitted[token_row.key] = token_row.version
                out.token_rows.append(token_row)
        for row in cost_rows:
            if emitted.get("cpt|" + row.key) != version:
                emitted["cpt|" + row.key] = version
                out.cost_rows.append(row)
        changed = version != slot.version
        if slot.held:
            self._emitted_held[key] = slot.held
        packed = slot.pack(version)
        self._slots[key] = packed
        if changed:
            out.states.append(
                WindowStateRow(
                    STAGE, start, pod_uid, version, packed, slot.sources[0][1], (pod_uid,)
                )
            )

    def discard(self, start: int, pod_uid: str) -> dict[Partition, int]:
        """Drop the (window, pod) `start`, `pod_uid` (its rows cannot be emitted): it holds no
        offsets any more, so commits move past its inputs. Returns what it held."""
        entry = self._slots.pop((start, pod_uid), None)
        if entry is None:
            return {}
        slot_held = entry.held if isinstance(entry, _PodSlot) else {}
        for index in (self._pods_by_start, self._open):
            uids = index.get(start)
            if uids is not None:
                uids.discard(pod_uid)
                if not uids:
                    del index[start]
        self._dirty.discard((start, pod_uid))
        units = [
            unit.held
            for uid in self._pods_by_start.get(start, ())
            if isinstance(unit := self._slots[(start, uid)], _PodSlot)
        ]
        self.held.rebuild(start, units)
        return self._emitted_held.pop((start, pod_uid), slot_held)

    def _owner(self, pod_uid: str, as_of: int, slot: _PodSlot) -> PodOwner:
        namespace, pod, team, product, cost_center = resolve_owner(
            pod_uid, lambda uid: self.pods.as_of(uid, as_of), self.settings.allocation.labels
        )
        cluster = ""
        for window in slot.tokens.values():
            if window.identity is not None:
                _, _, cluster, token_ns, token_pod = window.identity
                # The scraper knows namespace and pod name even before the watcher does.
                namespace = namespace if pod else token_ns
                pod = pod or token_pod
                break
        return PodOwner(cluster, namespace, pod, team, product, cost_center)

    @property
    def slots(self) -> int:
        """(window, pod) slots in memory, open and closed."""
        return len(self._slots)

    # ------------------------------------------------------------------ partitions

    def revoke(self, partitions: Iterable[Partition]) -> None:
        """Drop the state fed by partitions this worker no longer owns (their checkpoints
        stay, for the next owner)."""
        lost = set(partitions)

        def fed_by_lost(key: Key, entry: _PodSlot | bytes) -> bool:
            if isinstance(entry, _PodSlot):
                return not lost.isdisjoint(entry.sources)
            known = self._sources.get(key[1])
            return known is not None and known[0] in lost

        for key in [k for k, e in self._slots.items() if fed_by_lost(k, e)]:
            del self._slots[key]
        self._pods_by_start, self._open = {}, {}
        for (start, pod_uid), entry in self._slots.items():
            self._pods_by_start.setdefault(start, set()).add(pod_uid)
            if isinstance(entry, _PodSlot) and not entry.closed:
                self._open.setdefault(start, set()).add(pod_uid)
        self.held.revoke(
            lost,
            [
                (start, entry.held)
                for (start, _), entry in self._slots.items()
                if isinstance(entry, _PodSlot)
            ],
        )
        self._dirty = {k for k in self._dirty if k in self._slots}
        self.token_watermark.forget(lost)

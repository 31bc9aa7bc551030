"""Stage two of the worker: token deltas and re-keyed pod costs -> token and cost-per-token rows.

Its inputs are the tokens topic and the internal pod-costs topic, both keyed by pod uid and
co-partitioned. Stage one broadcasts a marker per sample partition to every internal partition
once its windows up to some end are emitted; a (window, pod) closes when every sample partition
has passed its end and the token watermark has passed its end plus grace.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson

from schemas.events import CloudEvent, TokenDelta
from streams.labels import PodHistory, resolve_owner
from streams.rows import TokenCostRow, TokenRow
from streams.tokens import PodOwner, TokenWindow, token_cost_rows
from streams.windows import window_of
from streams.worker.device_stage import (
    DUPLICATE,
    LATE,
    OK,
    TOO_LATE,
    PodCostPartial,
    StreamSettings,
)
from streams.worker.watermark import HeldOffsets, Partition, Watermark


def encode_marker(source_partition: int, source_partitions: int, end_ms: int) -> bytes:
    return orjson.dumps(
        {
            "kind": "marker",
            "source_partition": source_partition,
            "source_partitions": source_partitions,
            "end_ms": end_ms,
        }
    )


@dataclass(frozen=True, slots=True)
class Marker:
    source_partition: int
    source_partitions: int
    end_ms: int


def decode_internal(raw: bytes) -> PodCostPartial | Marker:
    """Internal messages are written by stage one; anything else is a bug, so this raises."""
    doc: dict[str, Any] = orjson.loads(raw)
    if doc["kind"] == "marker":
        return Marker(doc["source_partition"], doc["source_partitions"], doc["end_ms"])
    return PodCostPartial(
        doc["window_start_ms"],
        doc["device_uuid"],
        doc["pod_uid"],
        Decimal(doc["cost_usd"]),
        doc["samples"],
        doc["version"],
    )


class _PodSlot:
    __slots__ = ("closed", "dirty", "emitted", "held", "partials", "tokens")

    def __init__(self) -> None:
        self.tokens: dict[str, TokenWindow] = {}
        self.partials: dict[str, PodCostPartial] = {}
        self.held: dict[Partition, int] = {}
        self.closed = False
        self.dirty = False
        self.emitted: dict[str, int] = {}  # row key -> version emitted


@dataclass
class PodOutput:
    token_rows: list[TokenRow] = field(default_factory=list)
    cost_rows: list[TokenCostRow] = field(default_factory=list)


class PodStage:
    def __init__(self, settings: StreamSettings, pods: PodHistory) -> None:
        self.settings = settings
        self.pods = pods
        self.token_watermark = Watermark(settings.idle_flush_s)
        self.held = HeldOffsets()  # what a restart must replay: the commit positions
        self._markers: dict[int, int] = {}
        self._source_partitions = 0
        self._slots: dict[tuple[int, str], _PodSlot] = {}
        # Indexes by window start, so that a poll or commit costs windows, not slots (a pod
        # slot lives for the retention: thousands of pods x dozens of windows).
        self._pods_by_start: dict[int, set[str]] = {}
        self._open: dict[int, set[str]] = {}  # slots not closed yet
        self._dirty: set[tuple[int, str]] = set()
        self._last_input_s = 0.0

    # ------------------------------------------------------------------ input

    def skip(self, partition: Partition, offset: int) -> None:
        self.held.consumed(partition, offset)

    def _slot_for(self, start: int, pod_uid: str) -> _PodSlot | None:
        slot = self._slots.get((start, pod_uid))
        if slot is None:
            horizon = self._horizon()
            if horizon is not None and start <= horizon:
                return None
            slot = self._slots[(start, pod_uid)] = _PodSlot()
            self._pods_by_start.setdefault(start, set()).add(pod_uid)
            self._open.setdefault(start, set()).add(pod_uid)
        return slot

    def add_tokens(
        self, partition: Partition, offset: int, event: CloudEvent[TokenDelta], now_s: float
    ) -> str:
        self.held.consumed(partition, offset)
        self._last_input_s = now_s
        start = window_of(event.time_ms, self.settings.allocation.window_s)
        self.token_watermark.observe(partition, event.time_ms, now_s)
        slot = self._slot_for(start, event.data.pod_uid)
        if slot is None:
            return TOO_LATE
        window = slot.tokens.setdefault(event.data.model, TokenWindow())
        if not window.add(event):
            return DUPLICATE
        self.held.hold(start, slot.held, partition, offset)
        return self._touched(start, event.data.pod_uid, slot)

    def add_internal(
        self, partition: Partition, offset: int, message: PodCostPartial | Marker, now_s: float
    ) -> str:
        self.held.consumed(partition, offset)
        self._last_input_s = now_s
        if isinstance(message, Marker):
            previous = self._markers.get(message.source_partition, message.end_ms)
            self._markers[message.source_partition] = max(previous, message.end_ms)
            self._source_partitions = max(self._source_partitions, message.source_partitions)
            return OK
        slot = self._slot_for(message.window_start_ms, message.pod_uid)
        if slot is None:
            return TOO_LATE
        current = slot.partials.get(message.device_uuid)
        if current is not None and current.version >= message.version:
            return DUPLICATE
        slot.partials[message.device_uuid] = message
        self.held.hold(message.window_start_ms, slot.held, partition, offset)
        return self._touched(message.window_start_ms, message.pod_uid, slot)

    def _touched(self, start: int, pod_uid: str, slot: _PodSlot) -> str:
        if slot.closed:
            slot.dirty = True
            self._dirty.add((start, pod_uid))
            return LATE
        return OK

    def on_pod_event(self, uid: str, time_ms: int) -> None:
        limit = time_ms - self.settings.window_ms - self.settings.grace_ms
        for start, uids in self._pods_by_start.items():
            if start >= limit and uid in uids:
                slot = self._slots[(start, uid)]
                if slot.closed:
                    slot.dirty = True
                    self._dirty.add((start, uid))

    # ------------------------------------------------------------------ output

    def _cost_watermark(self) -> int | None:
        """The window end up to which every sample partition's pod costs are in."""
        if not self._source_partitions or len(self._markers) < self._source_partitions:
            return None
        return min(self._markers.values())

    def _horizon(self) -> int | None:
        mark = self._cost_watermark()
        if mark is None:
            return None
        return mark - self.settings.retention_ms - self.settings.window_ms

    def poll(self, now_s: float) -> PodOutput:
        out = PodOutput()
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
                slot.closed = True
                self._emit(key, slot, out)
        for key in sorted(self._dirty):
            dirty = self._slots.get(key)
            if dirty is not None and dirty.dirty:
                self._emit(key, dirty, out)
        self._dirty.clear()
        horizon = self._horizon()
        if horizon is not None:
            for start in [s for s in self._pods_by_start if s <= horizon]:
                for pod_uid in self._pods_by_start.pop(start):
                    del self._slots[(start, pod_uid)]
                self._open.pop(start, None)
                self.held.release(start)
        return out

    def _emit(self, key: tuple[int, str], slot: _PodSlot, out: PodOutput) -> None:
        slot.dirty = False
        start, pod_uid = key
        end = start + self.settings.window_ms
        as_of = end + self.settings.grace_ms
        meta = self.pods.count_as_of([pod_uid], as_of)
        token_rows = {}
        for model, window in slot.tokens.items():
            token_row = window.row(start, end, pod_uid, model, len(window.delta_ids))
            token_rows[model] = token_row
            if slot.emitted.get(token_row.key) != token_row.version:
                slot.emitted[token_row.key] = token_row.version
                out.token_rows.append(token_row)
        samples = sum(p.samples for p in slot.partials.values())
        deltas = sum(len(w.delta_ids) for w in slot.tokens.values())
        version = (samples << 40) | (deltas << 20) | meta
        cost = sum((p.cost_usd for p in slot.partials.values()), Decimal(0))
        owner = self._owner(pod_uid, as_of, slot)
        for row in token_cost_rows(start, end, pod_uid, cost, token_rows, owner, version):
            if slot.emitted.get("cpt|" + row.key) != version:
                slot.emitted["cpt|" + row.key] = version
                out.cost_rows.append(row)

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

    # ------------------------------------------------------------------ partitions

    def revoke(self, partitions: Iterable[Partition]) -> None:
        """Drop the state fed by partitions this worker no longer owns."""
        lost = set(partitions)
        for key in [k for k, s in self._slots.items() if not lost.isdisjoint(s.held)]:
            del self._slots[key]
        self._pods_by_start, self._open = {}, {}
        for (start, pod_uid), slot in self._slots.items():
            self._pods_by_start.setdefault(start, set()).add(pod_uid)
            if not slot.closed:
                self._open.setdefault(start, set()).add(pod_uid)
        self.held.revoke(lost, [(start, slot.held) for (start, _), slot in self._slots.items()])
        self._dirty = {k for k in self._dirty if k in self._slots}
        self.token_watermark.forget(lost)

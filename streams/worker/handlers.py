"""What the worker does with each record: decode it, dead-letter what is unusable, count it in
the metrics, and feed the rest to a stage; and what it does with a stage's output.

`DeviceHandler` and `TokenCostHandler` are the `Stage`s the runners drive
(streams.worker.runner); `PodHandler` feeds pod metadata, which every worker reads whole, to
both stages. They share an `Intake`: the decoding, dead letters and counters; each checks
event times with a `ClockCheck` (design §5).
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from aiokafka import ConsumerRecord, TopicPartition

from schemas.events import (
    COST_WINDOWS_TOPIC,
    GPU_SAMPLES_TOPIC,
    POD_TYPE,
    TOKEN_COST_WINDOWS_TOPIC,
    TOKENS_TYPE,
    CloudEvent,
    GpuSample,
    TokenDelta,
    decode_samples,
)
from streams.labels import PodHistory
from streams.rows import CostRow, TokenCostRow
from streams.windows import window_of
from streams.worker.checkpoints import Checkpoints, mark_rows
from streams.worker.clocks import ClockCheck
from streams.worker.device_stage import STAGE as DEVICE_STAGE
from streams.worker.device_stage import DeviceStage, PodCostPartial, Unemittable
from streams.worker.intake import TOO_LATE_DETAIL, Intake
from streams.worker.outbox import Message, Outbox, row_message
from streams.worker.pod_stage import (
    MARKER_ALL_IDLE_MS,
    InvalidInternal,
    Key,
    Marker,
    PodStage,
    decode_internal,
    encode_marker,
)
from streams.worker.pod_stage import STAGE as POD_STAGE
from streams.worker.watermark import Partition

log = logging.getLogger("gpuledger.worker")


class PodTracker(Protocol):
    """How far the pods topic has been used, and which pods changed since a position
    (streams.worker.tables.PodsTable)."""

    handled: dict[int, int]

    def changed_since(self, positions: dict[int, int]) -> set[str]: ...


def pods_marks(source: int, handled: dict[int, int]) -> dict[str, int]:
    return {f"{source}/{q}": offset for q, offset in handled.items()}


def changed_pods(tracker: PodTracker, marks: dict[str, int], source: int) -> set[str]:
    """The pods with events the windows of input partition `source` have not seen: those
    after the pods position its owner wrote with its last checkpoints."""
    positions = {}
    for unit, offset in marks.items():
        p, _, q = unit.partition("/")
        if p == str(source) and q.isdigit():
            positions[int(q)] = offset
    return tracker.changed_since(positions)


_TokenInput = PodCostPartial | Marker | CloudEvent[TokenDelta]
DEVICE_FLOOR = "floor@device"  # replay floors (DeviceStage.replay_floor), per partition
POD_FLOOR = "floor@pod"
DEVICE_PODS = "pods@device"  # pods-topic positions behind each partition's checkpoints
POD_PODS = "pods@pod"


class DeviceHandler:
    """Stage one's `Stage`: GPU samples in; cost rows, pod-cost partials and markers out."""

    def __init__(
        self,
        devices: DeviceStage,
        intake: Intake,
        internal_topic: str,
        *,
        sample_partitions: int,
        internal_partitions: int,
        checkpoints: Checkpoints | None = None,
        pods: PodTracker | None = None,
    ) -> None:
        self.devices = devices
        self.pods = pods
        self._pods_written: dict[int, int] = {}
        self.checkpoints = checkpoints  # None: nothing to restore (tests of the stage alone)
        self._frontier_due = checkpoints is not None
        self.intake = intake
        self.metrics = intake.metrics
        self.internal_topic = internal_topic
        self.sample_partitions = sample_partitions
        self.internal_partitions = internal_partitions
        self.window_s = devices.settings.allocation.window_s
        self.clock = ClockCheck(intake, devices.settings.max_clock_skew_s)
        self._owned: list[int] = []  # sample partitions this worker owns
        self._markers_sent: dict[int, int] = {}
        self._idle_since_s: float | None = None
        self._floor_at_poll: int | None = None  # the stage's replay floor at the last poll
        self._floor_committed: int | None = None  # ... at the last commit
        self._floor_written: int | None = None

    def assigned(self, partitions: set[Partition]) -> None:
        self._owned = sorted(p for topic, p in partitions if topic == GPU_SAMPLES_TOPIC)
        # New partitions may come with windows their last owner checkpointed.
        self._frontier_due = self.checkpoints is not None
        self._floor_written = None

    async def handle(
        self, tp: TopicPartition, records: list[ConsumerRecord], now_s: float, outbox: Outbox
    ) -> None:
        """Decode a batch of one partition, restore the closed windows it corrects that memory
        does not hold, dead-letter what is unusable, fold in the rest."""
        if not records:
            return
        partition = (tp.topic, tp.partition)
        events, indices, others = decode_samples([msg.value for msg in records])
        if not await self._restore(partition, events, now_s, outbox):
            return  # stopped while ClickHouse was unreachable: nothing of the batch consumed
        for index, decoded in others.items():
            self.intake.reject_decoded(records[index], decoded, outbox)
        self.devices.skip(partition, records[-1].offset)
        events, kept = self.clock.sort(records, events, indices, now_s, outbox)
        counts = self.devices.add_samples(partition, [msg.offset for msg in kept], events, now_s)
        topic = tp.topic
        if counts.ok or counts.late:
            self.metrics.events_used(topic, counts.ok + counts.late)
        if counts.late:
            self.metrics.events_late(topic, counts.late)
        if counts.duplicates:
            self.metrics.events_duplicate(topic, counts.duplicates)
        for index in counts.too_late:
            self.intake.reject(kept[index], outbox, "too_late", TOO_LATE_DETAIL)
        for model in counts.unknown_models:
            self.metrics.unknown_gpu_model(model)

    async def _restore(
        self,
        partition: Partition,
        events: list[CloudEvent[GpuSample]],
        now_s: float,
        outbox: Outbox,
    ) -> bool:
        checkpoints = self.checkpoints
        if checkpoints is None:
            return True
        if self._frontier_due and not await self._assigned(checkpoints):
            return False
        keys = self.devices.missing(partition, events, now_s)
        if not keys:
            return True
        found = await checkpoints.load(DEVICE_STAGE, keys, outbox)
        if found is None:
            return False
        self.metrics.checkpoints_restored(DEVICE_STAGE, len(found))
        for start, device in self.devices.restore(partition, keys, found):
            log.error(
                "the checkpoint of window %d of device %s does not decode: taken as a new window",
                start,
                device,
            )
        return True

    async def prepare(self) -> None:
        if self.checkpoints is not None and self._frontier_due:
            await self._assigned(self.checkpoints)

    async def _assigned(self, checkpoints: Checkpoints) -> bool:
        """What the windows of newly owned partitions need from their checkpoints: the lookup
        floor, the replay floors, the windows pod events changed (False if stopped)."""
        latest = await checkpoints.frontier_ms(DEVICE_STAGE)
        floors = await checkpoints.marks(DEVICE_FLOOR)
        if floors is None or self.stopping():
            return False
        if latest is not None:
            self.devices.raise_lookup_floor(latest + self.devices.settings.window_ms)
        for p in self._owned:
            if str(p) in floors:
                self.devices.set_replay_floor((GPU_SAMPLES_TOPIC, p), floors[str(p)])
        if latest is not None and not await self._recheck(checkpoints, latest):
            return False
        self._frontier_due = False
        return True

    async def _recheck(self, checkpoints: Checkpoints, latest_ms: int) -> bool:
        """Restore the retained windows of the owned partitions whose pods changed while no
        worker held them, and re-emit those whose metadata changed (False if stopped)."""
        if self.pods is None:
            return True
        marks = await checkpoints.marks(DEVICE_PODS)
        if marks is None:
            return False
        settings = self.devices.settings
        since = latest_ms - settings.retention_ms - settings.window_ms
        keys: set[tuple[int, str]] = set()
        for source in self._owned:
            uids = changed_pods(self.pods, marks, source)
            found = await checkpoints.load_touching(DEVICE_STAGE, since, {source}, uids)
            if found is None:
                return False
            wanted = set(found)
            partition = (GPU_SAMPLES_TOPIC, source)
            self.devices.restore(partition, wanted, {k: blob for k, (_, blob) in found.items()})
            keys |= wanted
        self.metrics.checkpoints_restored(DEVICE_STAGE, len(keys))
        if keys:
            log.info("stage one: %d closed windows restored to apply pod changes", len(keys))
        self.devices.recheck(keys)
        return True

    def stopping(self) -> bool:
        return self.checkpoints is not None and self.checkpoints.stopping.is_set()

    def poll(self, now_s: float, drain: bool, outbox: Outbox) -> None:
        if drain:
            now_s += self.devices.settings.idle_flush_s + 1
        out = self.devices.poll(now_s)
        failed = list(out.unemittable)
        broken: dict[tuple[int, str], str] = {}  # (window, device) -> why it did not encode
        rows: list[tuple[CostRow, Message]] = []
        for row in out.rows:
            try:
                rows.append((row, row_message(COST_WINDOWS_TOPIC, row, row.device_uuid.encode())))
            except Exception as exc:  # a window that cannot be written must not stop the stage
                broken.setdefault((row.window_start_ms, row.device_uuid), repr(exc))
        partials: list[tuple[tuple[int, str], Message]] = []
        for partial in out.partials:
            key = (partial.window_start_ms, partial.device_uuid)
            route = partial.pod_uid.encode()
            try:
                partials.append((key, (self.internal_topic, route, partial.encode(), route)))
            except Exception as exc:
                broken.setdefault(key, repr(exc))
        if broken:
            rows = [(r, m) for r, m in rows if (r.window_start_ms, r.device_uuid) not in broken]
            partials = [(k, m) for k, m in partials if k not in broken]
            for (start, device), error in broken.items():
                failed.append(
                    Unemittable(start, device, self.devices.discard(start, device), error)
                )
        for row, message in rows:
            outbox.rows.append(row)
            outbox.messages.append(message)
        outbox.messages += [message for _, message in partials]
        outbox.add_states(
            [s for s in out.states if (s.window_start_ms, s.unit) not in broken]
            if broken
            else out.states
        )
        for window in failed:
            self.intake.reject_window(outbox, window, self.devices.held, "device")
        if self.checkpoints is not None:
            # The floor goes out one commit late: a write whose commit is lost must not
            # leave a floor above what the records after the commit in force first met.
            self._floor_at_poll = self.devices.replay_floor(now_s)
            floor = self._floor_committed
            if floor is not None and floor != self._floor_written:
                outbox.rows += mark_rows(DEVICE_FLOOR, {str(p): floor for p in self._owned})
                self._floor_written = floor
            # Pod events up to here are in every retained window emitted by now.
            if self.pods is not None and self.pods.handled != self._pods_written:
                self._pods_written = dict(self.pods.handled)
                for p in self._owned:
                    outbox.rows += mark_rows(DEVICE_PODS, pods_marks(p, self._pods_written))
        if rows:
            self.metrics.rows_emitted([row for row, _ in rows], self.window_s, time.time())
        self.metrics.windows_open(self.devices.open_windows)
        self._send_markers(now_s, drain, outbox)

    def positions(self) -> dict[Partition, int]:
        return self.devices.held.positions()

    def committed(self) -> None:
        self._floor_committed = self._floor_at_poll

    def revoke(self, partitions: set[Partition]) -> None:
        self.intake.metrics.devices_revoked(self.devices.revoke(partitions))
        lost = {p for topic, p in partitions if topic == GPU_SAMPLES_TOPIC}
        self._owned = [p for p in self._owned if p not in lost]

    def _send_markers(self, now_s: float, drain: bool, outbox: Outbox) -> None:
        """Tell stage two, on every internal partition, how far each owned sample partition
        has emitted. A worker with no sample data says so once it has been idle a while."""
        owned = self._owned
        if not owned or not self.sample_partitions:
            return
        closed = self.devices.closed_until_ms()
        if closed is None:
            if self._idle_since_s is None:
                self._idle_since_s = now_s
            if not drain and now_s - self._idle_since_s < self.devices.settings.idle_flush_s:
                return
            closed = MARKER_ALL_IDLE_MS
        for source in owned:
            if self._markers_sent.get(source) == closed:
                continue
            self._markers_sent[source] = closed
            body = encode_marker(source, self.sample_partitions, closed)
            for partition in range(self.internal_partitions):
                outbox.messages.append((self.internal_topic, b"marker", body, partition))


class TokenCostHandler:
    """Stage two's `Stage`: token deltas and pod-cost partials in; token and cost-per-token
    rows out."""

    def __init__(
        self,
        stage: PodStage,
        intake: Intake,
        internal_topic: str,
        checkpoints: Checkpoints | None = None,
        pods: PodTracker | None = None,
    ) -> None:
        self.stage = stage
        self.pods = pods
        self._pods_written: dict[int, int] = {}
        self.intake = intake
        self.internal_topic = internal_topic
        self.checkpoints = checkpoints  # None: nothing to restore (tests of the stage alone)
        self._frontier_due = checkpoints is not None
        self._owned: set[Partition] = set()
        self._floor_at_poll: int | None = None
        self._floor_committed: int | None = None
        self._floor_written: int | None = None
        self.clock = ClockCheck(intake, stage.settings.max_clock_skew_s)

    def assigned(self, partitions: set[Partition]) -> None:
        # Co-partitioned inputs: what the records say is all this stage needs, but new
        # partitions may come with windows their last owner checkpointed.
        self._frontier_due = self.checkpoints is not None
        self._owned = partitions
        self._floor_written = None

    async def handle(
        self, tp: TopicPartition, records: list[ConsumerRecord], now_s: float, outbox: Outbox
    ) -> None:
        """Decode the batch, restore the closed windows it corrects that memory does not hold,
        then feed the stage record by record."""
        items = [self._decode(msg, now_s, outbox) for msg in records]
        if self.checkpoints is not None:
            keys = set()
            for item in items:
                if isinstance(item, PodCostPartial):
                    keys.add((item.window_start_ms, item.pod_uid))
                elif item is not None and not isinstance(item, Marker):
                    start = window_of(item.time_ms, self.stage.settings.allocation.window_s)
                    keys.add((start, item.data.pod_uid))
            if not await self._restore((tp.topic, tp.partition), keys, outbox):
                return  # stopped while ClickHouse was unreachable: nothing of the batch consumed
        for msg, item in zip(records, items, strict=True):
            self._apply(msg, item, now_s, outbox)

    def handle_one(self, msg: ConsumerRecord, now_s: float, outbox: Outbox) -> None:
        """One record, where nothing needs restoring (no checkpoints)."""
        self._apply(msg, self._decode(msg, now_s, outbox), now_s, outbox)

    def _decode(self, msg: ConsumerRecord, now_s: float, outbox: Outbox) -> _TokenInput | None:
        """The record's content, or None for one dead-lettered (unusable, or a bad clock)."""
        if msg.topic == self.internal_topic:
            try:
                return decode_internal(msg.value)
            except InvalidInternal as exc:
                # Only stage one writes here; anything else is still data, not a crash.
                detail = f"not a pod-cost message: {exc}"
                self.intake.reject(msg, outbox, "invalid_internal", detail)
                return None
        decoded = self.intake.decode(msg, TOKENS_TYPE, outbox)
        if decoded is None or not self.clock.check(msg, decoded.event, now_s, outbox):
            return None
        event: CloudEvent[TokenDelta] = decoded.event
        return event

    def _apply(
        self, msg: ConsumerRecord, item: _TokenInput | None, now_s: float, outbox: Outbox
    ) -> None:
        tp = (msg.topic, msg.partition)
        if item is None:
            self.stage.skip(tp, msg.offset)
        elif isinstance(item, PodCostPartial | Marker):
            self.stage.add_internal(tp, msg.offset, item, now_s)
        else:
            status = self.stage.add_tokens(tp, msg.offset, item, now_s)
            self.intake.count(status, msg, outbox)

    async def prepare(self) -> None:
        if self.checkpoints is not None and self._frontier_due:
            await self._assigned(self.checkpoints)

    async def _assigned(self, checkpoints: Checkpoints) -> bool:
        """As `DeviceHandler._assigned`."""
        latest = await checkpoints.frontier_ms(POD_STAGE)
        floors = await checkpoints.marks(POD_FLOOR)
        if floors is None or checkpoints.stopping.is_set():
            return False
        if latest is not None:
            self.stage.raise_lookup_floor(latest + self.stage.settings.window_ms)
        for owned in self._owned:  # tokens and pod costs: co-partitioned, one floor
            if str(owned[1]) in floors:
                self.stage.set_replay_floor(owned, floors[str(owned[1])])
        if latest is not None and not await self._recheck(checkpoints, latest):
            return False
        self._frontier_due = False
        return True

    async def _recheck(self, checkpoints: Checkpoints, latest_ms: int) -> bool:
        """As `DeviceHandler._recheck`, for the (window, pod) slots of stage two."""
        if self.pods is None:
            return True
        marks = await checkpoints.marks(POD_PODS)
        if marks is None:
            return False
        settings = self.stage.settings
        since = latest_ms - settings.retention_ms - settings.window_ms
        keys: set[Key] = set()
        for source in sorted({p for _, p in self._owned}):
            uids = changed_pods(self.pods, marks, source)
            found = await checkpoints.load_touching(POD_STAGE, since, {source}, uids)
            if found is None:
                return False
            partition = (self.internal_topic, source)
            self.stage.restore(partition, set(found), {k: blob for k, (_, blob) in found.items()})
            keys |= set(found)
        self.intake.metrics.checkpoints_restored(POD_STAGE, len(keys))
        self.stage.recheck(keys)
        return True

    async def _restore(self, partition: Partition, keys: set[Key], outbox: Outbox) -> bool:
        checkpoints = self.checkpoints
        assert checkpoints is not None
        if self._frontier_due and not await self._assigned(checkpoints):
            return False
        missing = self.stage.missing(partition, keys)
        if not missing:
            return True
        found = await checkpoints.load(POD_STAGE, missing, outbox)
        if found is None:
            return False
        self.intake.metrics.checkpoints_restored(POD_STAGE, len(found))
        for start, pod_uid in self.stage.restore(partition, missing, found):
            log.error(
                "the checkpoint of window %d of pod %s does not decode: taken as a new window",
                start,
                pod_uid,
            )
        return True

    def poll(self, now_s: float, drain: bool, outbox: Outbox) -> None:
        if drain:
            now_s += self.stage.settings.idle_flush_s + 1
        out = self.stage.poll(now_s)
        failed = list(out.unemittable)
        broken: dict[tuple[int, str], str] = {}  # (window, pod) -> why it did not encode
        rows: list[tuple[TokenCostRow, Message]] = []
        for row in out.cost_rows:
            try:
                message = row_message(TOKEN_COST_WINDOWS_TOPIC, row, row.pod_uid.encode())
            except Exception as exc:  # a window that cannot be written must not stop the stage
                broken.setdefault((row.window_start_ms, row.pod_uid), repr(exc))
                continue
            rows.append((row, message))
        token_rows = out.token_rows
        if broken:
            token_rows = [r for r in token_rows if (r.window_start_ms, r.pod_uid) not in broken]
            rows = [(r, m) for r, m in rows if (r.window_start_ms, r.pod_uid) not in broken]
            for (start, pod_uid), error in broken.items():
                failed.append(
                    Unemittable(start, pod_uid, self.stage.discard(start, pod_uid), error)
                )
        outbox.rows += token_rows
        for row, message in rows:
            outbox.rows.append(row)
            outbox.messages.append(message)
        outbox.add_states(
            [s for s in out.states if (s.window_start_ms, s.unit) not in broken]
            if broken
            else out.states
        )
        for window in failed:
            self.intake.reject_window(outbox, window, self.stage.held, "pod")
        if self.checkpoints is not None:
            self._floor_at_poll = self.stage.replay_floor()  # as in stage one: a commit late
            numbers = {p for _, p in self._owned}
            floor = self._floor_committed
            if floor is not None and floor != self._floor_written:
                outbox.rows += mark_rows(POD_FLOOR, {str(p): floor for p in numbers})
                self._floor_written = floor
            if self.pods is not None and self.pods.handled != self._pods_written:
                self._pods_written = dict(self.pods.handled)
                for p in numbers:
                    outbox.rows += mark_rows(POD_PODS, pods_marks(p, self._pods_written))

    def positions(self) -> dict[Partition, int]:
        return self.stage.held.positions()

    def committed(self) -> None:
        self._floor_committed = self._floor_at_poll

    def revoke(self, partitions: set[Partition]) -> None:
        self.stage.revoke(partitions)


class PodHandler:
    """Pod metadata, from the compacted pods topic every worker reads whole, to both stages."""

    def __init__(
        self, pods: PodHistory, devices: DeviceStage, pod_stage: PodStage, intake: Intake
    ) -> None:
        self.pods = pods
        self.devices = devices
        self.pod_stage = pod_stage
        self.intake = intake
        self.clock = ClockCheck(intake, devices.settings.max_clock_skew_s, offsets=False)

    def handle(self, msg: ConsumerRecord, outbox: Outbox) -> str | None:
        """Use one pod event; returns its pod's uid when it was added to the history."""
        decoded = self.intake.decode(msg, POD_TYPE, outbox)
        if decoded is None or not self.clock.check(msg, decoded.event, time.time(), outbox):
            return None
        event = decoded.event
        if not self.pods.add(event.id, event.time_ms, event.data):
            self.intake.metrics.events_duplicate(msg.topic)
            return None
        self.intake.metrics.events_used(msg.topic)
        self.devices.on_pod_event(event.data.uid, event.time_ms)
        self.pod_stage.on_pod_event(event.data.uid, event.time_ms)
        uid: str = event.data.uid
        return uid

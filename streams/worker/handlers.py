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

from aiokafka import ConsumerRecord, TopicPartition

from schemas.events import (
    COST_WINDOWS_TOPIC,
    GPU_SAMPLES_TOPIC,
    POD_TYPE,
    TOKEN_COST_WINDOWS_TOPIC,
    TOKENS_TOPIC,
    TOKENS_TYPE,
    CloudEvent,
    GpuSample,
    TokenDelta,
    decode_samples,
)
from streams.labels import PodHistory
from streams.rows import CostRow, TokenCostRow
from streams.windows import window_of
from streams.worker.checkpoints import Checkpoints
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
from streams.worker.restoring import PodTracker, Restorer
from streams.worker.watermark import Partition

log = logging.getLogger("gpuledger.worker")


_TokenInput = PodCostPartial | Marker | CloudEvent[TokenDelta]


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
        # None: nothing to restore (tests of the stage alone)
        self.restorer = (
            Restorer(
                DEVICE_STAGE,
                devices,
                checkpoints,
                lambda n: [(GPU_SAMPLES_TOPIC, n)],
                pods=pods,
                restored=lambda count: self.metrics.checkpoints_restored(DEVICE_STAGE, count),
            )
            if checkpoints is not None
            else None
        )

    def assigned(self, partitions: set[Partition]) -> None:
        self._owned = sorted(p for topic, p in partitions if topic == GPU_SAMPLES_TOPIC)
        if self.restorer is not None:  # they may come with windows their last owner left
            self.restorer.assigned(self._owned)

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
        restorer = self.restorer
        if restorer is None:
            return True
        if not await restorer.prepare():
            return False
        return await restorer.load(
            partition, self.devices.missing(partition, events, now_s), outbox
        )

    async def prepare(self) -> None:
        if self.restorer is not None:
            await self.restorer.prepare()

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
        if self.restorer is not None:
            outbox.rows += self.restorer.marks(self.devices.replay_floor(now_s))
        if rows:
            self.metrics.rows_emitted([row for row, _ in rows], self.window_s, time.time())
        self.metrics.windows_open(self.devices.open_windows)
        self._send_markers(now_s, drain, outbox)

    def positions(self) -> dict[Partition, int]:
        return self.devices.held.positions()

    def committed(self) -> None:
        if self.restorer is not None:
            self.restorer.committed()

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
        self.intake = intake
        self.internal_topic = internal_topic
        # None: nothing to restore (tests of the stage alone)
        self.restorer = (
            Restorer(
                POD_STAGE,
                stage,
                checkpoints,
                lambda n: [(internal_topic, n), (TOKENS_TOPIC, n)],
                pods=pods,
                restored=lambda count: intake.metrics.checkpoints_restored(POD_STAGE, count),
            )
            if checkpoints is not None
            else None
        )
        self.clock = ClockCheck(intake, stage.settings.max_clock_skew_s)

    def assigned(self, partitions: set[Partition]) -> None:
        # Co-partitioned inputs: what the records say is all this stage needs, but new
        # partitions may come with windows their last owner checkpointed.
        if self.restorer is not None:
            self.restorer.assigned({p for _, p in partitions})

    async def handle(
        self, tp: TopicPartition, records: list[ConsumerRecord], now_s: float, outbox: Outbox
    ) -> None:
        """Decode the batch, restore the closed windows it corrects that memory does not hold,
        then feed the stage record by record."""
        items = [self._decode(msg, now_s, outbox) for msg in records]
        if self.restorer is not None:
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
        if self.restorer is not None:
            await self.restorer.prepare()

    async def _restore(self, partition: Partition, keys: set[Key], outbox: Outbox) -> bool:
        restorer = self.restorer
        assert restorer is not None
        if not await restorer.prepare():
            return False
        return await restorer.load(partition, self.stage.missing(partition, keys), outbox)

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
        if self.restorer is not None:
            outbox.rows += self.restorer.marks(self.stage.replay_floor())

    def positions(self) -> dict[Partition, int]:
        return self.stage.held.positions()

    def committed(self) -> None:
        if self.restorer is not None:
            self.restorer.committed()

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

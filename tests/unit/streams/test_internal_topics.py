"""The internal `<group>.pod-costs` topic: typed decoding (what does not fit is dead-lettered,
never a crash) and markers, the all-idle one included."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from prometheus_client import CollectorRegistry
from worker_scenario import T0, gpu_samples, pod_events, token_events

from schemas.events import DEAD_LETTER_TOPIC, TOKENS_TOPIC, encode_event
from streams.labels import PodHistory
from streams.metrics import WorkerMetrics
from streams.pricing import EXAMPLE_PRICE_BOOK, load_price_book
from streams.rows import TokenCostRow, WindowStateRow
from streams.worker.device_stage import OK, TOO_LATE, DeviceStage, PodCostPartial, StreamSettings
from streams.worker.handlers import DeviceHandler, TokenCostHandler
from streams.worker.intake import DeadLetterLog, Intake
from streams.worker.outbox import Outbox
from streams.worker.pod_stage import (
    MARKER_ALL_IDLE_MS,
    InvalidInternal,
    Marker,
    PodStage,
    decode_internal,
    encode_marker,
)

BOOK = load_price_book(EXAMPLE_PRICE_BOOK)
INTERNAL = "gpuledger-worker.pod-costs"
NOW = T0 / 1000 + 3600.0
PARTIAL = PodCostPartial(T0, "GPU-h100-a", "uid-search", Decimal("0.012345"), 12, 12 << 32)


def partial_doc(**changes: Any) -> bytes:
    return orjson.dumps({**orjson.loads(PARTIAL.encode()), **changes})


def marker_doc(**changes: Any) -> bytes:
    return orjson.dumps({**orjson.loads(encode_marker(0, 1, T0 + 60_000)), **changes})


def record(offset: int, value: bytes | None, topic: str = INTERNAL) -> ConsumerRecord:
    return ConsumerRecord(topic, 0, offset, int(NOW * 1000), 0, b"k", value, None, 1, 1, ())


def pods() -> PodHistory:
    history = PodHistory()
    for ev in pod_events():
        history.add(ev.id, ev.time_ms, ev.data)
    return history


def token_handler(history: PodHistory | None = None) -> TokenCostHandler:
    intake = Intake(WorkerMetrics(CollectorRegistry()), DeadLetterLog())
    return TokenCostHandler(PodStage(StreamSettings(), history or pods()), intake, INTERNAL)


def letters(outbox: Outbox) -> list[dict[str, Any]]:
    return [orjson.loads(m[2]) for m in outbox.messages if m[0] == DEAD_LETTER_TOPIC]


def test_what_stage_one_writes_decodes_to_the_same_values() -> None:
    assert decode_internal(PARTIAL.encode()) == PARTIAL
    marker = decode_internal(encode_marker(1, 3, T0))
    assert marker == Marker(1, 3, T0) and not marker.idle
    idle = decode_internal(encode_marker(2, 3, MARKER_ALL_IDLE_MS))
    assert isinstance(idle, Marker) and idle.idle


@pytest.mark.parametrize(
    "raw",
    [
        partial_doc(window_start_ms="x"),
        partial_doc(window_start_ms=True),
        partial_doc(window_start_ms=2**62),  # no row can hold that time
        partial_doc(samples=-1),
        partial_doc(version=1.5),
        partial_doc(cost_usd="NaN"),
        partial_doc(cost_usd=0.5),
        partial_doc(pod_uid=""),
        partial_doc(kind="nonsense"),
        marker_doc(end_ms="x"),
        marker_doc(end_ms=-5),
        marker_doc(end_ms=2**61),  # neither a window end nor the idle marker
        marker_doc(source_partition=1, source_partitions=1),
        marker_doc(source_partitions=0),
        b'{"window_start_ms": 1}',
        b"[]",
        b"not json",
    ],
)
def test_anything_else_is_refused(raw: bytes) -> None:
    with pytest.raises(InvalidInternal):
        decode_internal(raw)


@pytest.mark.parametrize(
    "bad",
    [partial_doc(window_start_ms="x"), marker_doc(end_ms="x"), None],
)
def test_a_wrongly_typed_internal_record_is_dead_lettered_and_the_stage_goes_on(
    bad: bytes | None,
) -> None:
    handler = token_handler()
    outbox = Outbox()
    handler.handle_one(record(0, encode_marker(0, 1, T0)), NOW, outbox)  # a real one first
    handler.handle_one(record(1, PARTIAL.encode()), NOW, outbox)
    handler.handle_one(record(2, bad), NOW, outbox)
    handler.handle_one(record(3, encode_marker(0, 1, T0 + 60_000)), NOW, outbox)
    handler.poll(NOW, False, outbox)
    handler.poll(NOW, True, outbox)
    [letter] = letters(outbox)
    assert (letter["reason"], letter["offset"]) == ("invalid_internal", 2)
    assert "not a pod-cost message" in letter["detail"]
    billed = [row for row in outbox.rows if not isinstance(row, WindowStateRow)]
    assert billed == []  # a partial without tokens
    # ... whose window is checkpointed all the same, so nothing holds the input any more.
    [state] = [row for row in outbox.rows if isinstance(row, WindowStateRow)]
    assert (state.stage, state.window_start_ms) == ("pod", T0)
    assert handler.positions() == {(INTERNAL, 0): 4}


def test_the_all_idle_marker_lets_stage_two_move_on_without_poisoning_its_clock() -> None:
    """A worker started before its agents: stage one sends the all-idle marker, then the
    samples come. Stage two must take every token and pod cost, and split costs as usual."""
    history = pods()
    handler = token_handler(history)
    stage = handler.stage
    outbox = Outbox()
    handler.handle_one(record(0, encode_marker(0, 1, MARKER_ALL_IDLE_MS)), NOW, outbox)
    statuses = {
        stage.add_tokens((TOKENS_TOPIC, 0), i, ev, NOW) for i, ev in enumerate(token_events())
    }
    assert statuses == {OK}
    devices = DeviceStage(BOOK, StreamSettings(), history)
    for i, ev in enumerate(gpu_samples()):
        devices.add_sample(("gpuledger.gpu-samples", 0), i, ev, NOW)
    out = devices.poll(NOW + 100)
    for i, partial in enumerate(out.partials, start=1):
        assert stage.add_internal((INTERNAL, 0), i, partial, NOW) == OK
    end = devices.closed_until_ms() or 0
    handler.handle_one(record(999, encode_marker(0, 1, end)), NOW, outbox)
    handler.poll(NOW + 100, False, outbox)
    assert letters(outbox) == []
    search = [r for r in outbox.rows if isinstance(r, TokenCostRow) and r.pod_uid == "uid-search"]
    usage = [r for r in out.rows if r.pod_uid == "uid-search"]
    assert sum((r.cost_usd for r in search), Decimal(0)) == sum(
        (r.cost_usd for r in usage), Decimal(0)
    )
    # Later input is judged against the real ends only.
    late = stage.add_tokens((TOKENS_TOPIC, 0), 10_000, token_events()[0], NOW)
    assert late != TOO_LATE


def test_an_idle_sample_partition_does_not_hold_the_others_back() -> None:
    stage = PodStage(StreamSettings(), pods())
    stage.add_internal((INTERNAL, 0), 0, Marker(0, 2, MARKER_ALL_IDLE_MS), NOW)
    stage.add_internal((INTERNAL, 0), 1, Marker(1, 2, T0 + 60_000), NOW)
    token = token_events()[0]
    assert stage.add_tokens((TOKENS_TOPIC, 0), 0, token, NOW) == OK
    later = next(ev for ev in token_events() if ev.time_ms >= T0 + 75_000)
    stage.add_tokens((TOKENS_TOPIC, 0), 1, later, NOW)
    rows = stage.poll(NOW).cost_rows
    assert {r.window_start_ms for r in rows} == {T0}  # closed on partition 1's marker alone
    # The idle partition gets data: it holds back again, and its clock is its real one.
    stage.add_internal((INTERNAL, 0), 2, Marker(0, 2, T0), NOW)
    assert stage.add_tokens((TOKENS_TOPIC, 0), 2, token, NOW) != TOO_LATE


def test_stage_one_sends_the_idle_marker_once_idle_and_real_ends_after() -> None:
    devices = DeviceHandler(
        DeviceStage(BOOK, StreamSettings(idle_flush_s=30), pods()),
        Intake(WorkerMetrics(CollectorRegistry()), DeadLetterLog()),
        INTERNAL,
        sample_partitions=1,
        internal_partitions=1,
    )
    devices.assigned({("gpuledger.gpu-samples", 0)})
    outbox = Outbox()
    devices.poll(NOW, False, outbox)
    devices.poll(NOW + 31, False, outbox)
    markers = [decode_internal(m[2]) for m in outbox.messages if m[1] == b"marker"]
    assert markers == [Marker(0, 1, MARKER_ALL_IDLE_MS)]
    tp = TopicPartition("gpuledger.gpu-samples", 0)
    values = [encode_event(ev) for ev in gpu_samples()[:15]]
    records = [
        ConsumerRecord(tp.topic, 0, i, int(NOW * 1000), 0, b"k", v, None, 1, 1, ())
        for i, v in enumerate(values)
    ]
    asyncio.run(devices.handle(tp, records, NOW + 32, outbox))
    devices.poll(NOW + 32, False, outbox)
    markers = [decode_internal(m[2]) for m in outbox.messages if m[1] == b"marker"]
    assert markers[-1] == Marker(0, 1, T0 + 60_000)

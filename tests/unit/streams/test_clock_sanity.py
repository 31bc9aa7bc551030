"""Hostile clocks (design §5): event times judged against the Kafka record timestamp and the
worker's clock, a watermark that never goes back, and windows that cannot be emitted."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from prometheus_client import CollectorRegistry
from worker_scenario import T0, gpu_samples, pod_events, token_events

import streams.metrics
import streams.worker.handlers
from schemas.events import (
    DEAD_LETTER_TOPIC,
    GPU_SAMPLES_TOPIC,
    PODS_TOPIC,
    TOKENS_TOPIC,
    CloudEvent,
    event_to_dict,
    make_event,
    parse_time,
)
from streams.labels import PodHistory
from streams.metrics import OTHER_SOURCE, WorkerMetrics
from streams.pricing import EXAMPLE_PRICE_BOOK, load_price_book
from streams.rows import CostRow, WindowStateRow
from streams.worker.device_stage import OK, TOO_LATE, DeviceStage, StreamSettings
from streams.worker.handlers import (
    DeviceHandler,
    PodHandler,
    TokenCostHandler,
)
from streams.worker.intake import DeadLetterLog, Intake
from streams.worker.outbox import Outbox
from streams.worker.pod_stage import PodStage, encode_marker
from streams.worker.watermark import Partition, Watermark

BOOK = load_price_book(EXAMPLE_PRICE_BOOK)
NOW = T0 / 1000 + 3600.0  # the worker's clock: an hour after the scenario's first window
P0: Partition = (GPU_SAMPLES_TOPIC, 0)
P1: Partition = (GPU_SAMPLES_TOPIC, 1)
CREATE_TIME, LOG_APPEND_TIME = 0, 1
DEVICE_A = "GPU-h100-a"


def samples_of(device: str) -> list[CloudEvent[Any]]:
    return [ev for ev in gpu_samples() if ev.data.device_uuid == device]


def raw(event: CloudEvent[Any], time_text: str | None = None, event_id: str | None = None) -> bytes:
    doc = event_to_dict(event)
    if time_text is not None:
        doc["time"] = time_text
    if event_id is not None:
        doc["id"] = event_id
    return orjson.dumps(doc)


def record(
    partition: Partition,
    offset: int,
    value: bytes,
    timestamp_ms: float = NOW * 1000,
    timestamp_type: int = CREATE_TIME,
) -> ConsumerRecord:
    topic, number = partition
    return ConsumerRecord(
        topic, number, offset, int(timestamp_ms), timestamp_type, b"k", value, None, 1, 1, ()
    )


def handler(**settings: float) -> DeviceHandler:
    pods = PodHistory()
    for ev in pod_events():
        pods.add(ev.id, ev.time_ms, ev.data)
    metrics = WorkerMetrics(CollectorRegistry())
    devices = DeviceHandler(
        DeviceStage(BOOK, StreamSettings(**settings), pods),
        Intake(metrics, DeadLetterLog()),
        "internal",
        sample_partitions=2,
        internal_partitions=1,
    )
    devices.assigned({P0, P1})
    return devices


def letters(outbox: Outbox) -> list[dict[str, Any]]:
    return [
        orjson.loads(value) for topic, _, value, _ in outbox.messages if topic == DEAD_LETTER_TOPIC
    ]


def feed(devices: DeviceHandler, partition: Partition, records: list[ConsumerRecord]) -> Outbox:
    outbox = Outbox()
    asyncio.run(devices.handle(TopicPartition(*partition), records, NOW, outbox))
    return outbox


# ------------------------------------------------------------------ the evidence of issue #12


@pytest.mark.parametrize(
    "time_text",
    ["9999-12-31T23:59:30Z", "0001-01-01T00:00:00Z", "1970-01-01T00:00:05Z"],
)
def test_a_sample_no_clock_can_read_is_dead_lettered_and_the_rest_is_emitted(
    time_text: str,
) -> None:
    devices = handler()
    good = samples_of(DEVICE_A)
    records = [record(P0, 0, raw(good[0], time_text, "bad-clock"))]
    records += [record(P0, 1 + i, raw(ev)) for i, ev in enumerate(good)]
    outbox = feed(devices, P0, records)
    devices.poll(NOW, True, outbox)  # every window emitted: none of them may fail
    [letter] = letters(outbox)
    assert (letter["reason"], letter["offset"]) == ("clock_skew", 0)
    assert "event time" in letter["detail"] and "worker time" in letter["detail"]
    assert "record time" in letter["detail"]
    assert {row.window_start_ms for row in outbox.rows} == {T0, T0 + 60_000, T0 + 120_000}
    # Every window closed and checkpointed: nothing holds any record, the bad one included.
    assert devices.positions() == {P0: len(records)}


def test_a_time_before_year_1_in_utc_is_refused_at_decode_and_the_rest_is_emitted() -> None:
    """`0001-01-01T00:00:00+23:59` is 23:59 before year 1 in UTC: not a time, so it is
    dead-lettered by the decoder (strict RFC 3339, years 0001-9999 in UTC)."""
    devices = handler()
    good = samples_of(DEVICE_A)
    records = [record(P0, 0, raw(good[0], "0001-01-01T00:00:00+23:59", "bad-clock"))]
    records += [record(P0, 1 + i, raw(ev)) for i, ev in enumerate(good)]
    outbox = feed(devices, P0, records)
    devices.poll(NOW, True, outbox)
    [letter] = letters(outbox)
    assert (letter["reason"], letter["offset"]) == ("wrong_type", 0)
    assert "RFC 3339" in letter["detail"]
    assert {row.window_start_ms for row in outbox.rows} == {T0, T0 + 60_000, T0 + 120_000}


def test_one_sample_from_2099_moves_no_clock_and_later_samples_are_billed() -> None:
    devices = handler()
    good = samples_of(DEVICE_A)
    first, rest = good[:12], good[12:]  # window one; then windows two and three
    records = [record(P0, i, raw(ev)) for i, ev in enumerate(first)]
    records.append(record(P0, 12, raw(first[0], "2099-01-01T00:00:00Z", "future")))
    records += [record(P0, 13 + i, raw(ev)) for i, ev in enumerate(rest)]
    outbox = feed(devices, P0, records)
    assert [(d["reason"], d["offset"]) for d in letters(outbox)] == [("clock_skew", 12)]
    assert devices.devices.watermark.value(NOW) == good[-1].time_ms
    devices.poll(NOW, False, outbox)
    # Only what the real clock closes: window three is still open, nothing was too late.
    assert {row.window_start_ms for row in outbox.rows} == {T0, T0 + 60_000}
    assert devices.devices.open_windows == 1
    assert devices.metrics.registry.get_sample_value(
        "gpuledger_events_total", {"topic": GPU_SAMPLES_TOPIC}
    ) == len(good)


def test_a_node_reset_to_1970_on_its_own_partition_does_not_hold_the_watermark_back() -> None:
    devices = handler()
    good = samples_of(DEVICE_A)
    feed(devices, P0, [record(P0, i, raw(ev)) for i, ev in enumerate(good[:12])])
    reset = make_event(good[0].data, event_id="reset", source="agent/n9", time_ms=5_000)
    outbox = feed(devices, P1, [record(P1, 0, raw(reset))])
    assert [d["reason"] for d in letters(outbox)] == ["clock_skew"]
    feed(devices, P0, [record(P0, 12 + i, raw(ev)) for i, ev in enumerate(good[12:])])
    assert devices.devices.watermark.value(NOW) == good[-1].time_ms
    out = Outbox()
    devices.poll(NOW, False, out)
    assert {row.window_start_ms for row in out.rows} == {T0, T0 + 60_000}
    assert devices.positions()[P1] == 1


def test_a_too_late_sample_does_not_drag_its_partitions_clock_down() -> None:
    stage = handler(retention_s=300, late_horizon_s=300).devices
    good = samples_of(DEVICE_A)
    for i, ev in enumerate(good[:15]):
        assert stage.add_sample(P0, i, ev, NOW) == OK
    before = stage.watermark.value(NOW)
    old = make_event(good[0].data, event_id="old", source="agent/n9", time_ms=T0 - 3 * 3600_000)
    assert stage.add_sample(P1, 0, old, NOW) == TOO_LATE  # the first record of its partition
    assert stage.watermark.value(NOW) == before
    assert {row.window_start_ms for row in stage.poll(NOW).rows} == {T0}


def test_the_watermark_never_goes_back() -> None:
    wm = Watermark(idle_after_s=30)
    wm.observe(("t", 0), 5_000, now_s=0)
    wm.observe(("t", 1), 9_000, now_s=0)
    assert wm.value(1) == 5_000
    wm.observe(("t", 1), 12_000, now_s=20)
    assert wm.value(40) == 12_000  # partition 0 idle
    wm.observe(("t", 0), 6_000, now_s=41)  # speaks again, behind: it does not step back
    assert wm.value(41) == 12_000
    wm.observe(("t", 0), 3_000, now_s=42)  # nor does a partition's own clock
    wm.observe(("t", 1), 30_000, now_s=42)
    assert wm.value(42) == 12_000
    wm.forget({("t", 0), ("t", 1)})  # no partition left: the next owner starts again
    assert wm.value(43) is None


# ------------------------------------------------------------------ the rule


def test_ahead_of_the_workers_clock_passes_only_when_the_broker_stamped_it() -> None:
    ev = samples_of(DEVICE_A)[0]
    ahead_ms = int(NOW * 1000) + 600_000  # ten minutes ahead of the worker's clock
    value = raw(make_event(ev.data, event_id="ahead", source="agent/n1", time_ms=ahead_ms))
    broker = feed(handler(), P0, [record(P0, 0, value, ahead_ms - 10_000, LOG_APPEND_TIME)])
    assert letters(broker) == []  # the worker's clock is the one behind
    producer = feed(handler(), P0, [record(P0, 0, value, ahead_ms - 10_000, CREATE_TIME)])
    [letter] = letters(producer)
    assert letter["reason"] == "clock_skew"
    assert "600 s ahead of the worker's clock" in letter["detail"]
    assert "at most 300 s" in letter["detail"]
    wider = feed(handler(max_clock_skew_s=900), P0, [record(P0, 0, value, NOW * 1000)])
    assert letters(wider) == []


def test_past_samples_stay_corrections_and_a_date_after_2200_is_refused_whatever_the_skew() -> None:
    ev = samples_of(DEVICE_A)[0]
    devices = handler(max_clock_skew_s=float("inf"))
    week_old = make_event(ev.data, event_id="old", source="agent/n1", time_ms=T0 - 7 * 86400_000)
    far = raw(ev, "2201-01-01T00:00:00Z", "far")
    outbox = feed(devices, P0, [record(P0, 0, raw(week_old)), record(P0, 1, far)])
    [letter] = letters(outbox)
    assert letter["offset"] == 1 and "after 2200-01-01" in letter["detail"]


def test_clock_offsets_and_skewed_events_are_counted_per_source_with_a_bounded_label_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(streams.metrics, "MAX_SOURCES", 2)
    devices = handler()
    ev = samples_of(DEVICE_A)[0]
    records = []
    for i, source in enumerate(["agent/n1", "agent/n2", "agent/n3", "agent/n4"]):
        bad = make_event(ev.data, event_id=f"e{i}", source=source, time_ms=ev.time_ms + 1)
        records.append(record(P0, 2 * i, raw(bad, "2099-01-01T00:00:00Z")))
        records.append(record(P0, 2 * i + 1, raw(bad), ev.time_ms + 1 - 2_000))
    feed(devices, P0, records)
    get = devices.metrics.registry.get_sample_value
    assert get("gpuledger_clock_offset_seconds", {"source": "agent/n1"}) == 2.0
    assert get("gpuledger_clock_offset_seconds", {"source": OTHER_SOURCE}) == 2.0
    assert get("gpuledger_clock_offset_seconds", {"source": "agent/n3"}) is None
    skewed = "gpuledger_clock_skew_events_total"
    assert get(skewed, {"topic": GPU_SAMPLES_TOPIC, "source": "agent/n2"}) == 1
    assert get(skewed, {"topic": GPU_SAMPLES_TOPIC, "source": OTHER_SOURCE}) == 2
    assert (
        get("gpuledger_dead_letters_total", {"topic": GPU_SAMPLES_TOPIC, "reason": "clock_skew"})
        == 4
    )


def test_a_silent_sources_offset_series_goes_away() -> None:
    metrics = WorkerMetrics(CollectorRegistry())
    metrics.clock_offset("agent/gone", 3600.0, now_s=0.0)
    metrics.clock_offset("agent/here", 0.5, now_s=2000.0)
    get = metrics.registry.get_sample_value
    assert get("gpuledger_clock_offset_seconds", {"source": "agent/gone"}) is None
    assert get("gpuledger_clock_offset_seconds", {"source": "agent/here"}) == 0.5


def test_tokens_and_pods_from_a_bad_clock_are_dead_lettered() -> None:
    pods = PodHistory()
    stage_settings = StreamSettings()
    metrics = WorkerMetrics(CollectorRegistry())
    intake = Intake(metrics, DeadLetterLog())
    pod_stage = PodStage(stage_settings, pods)
    tokens = TokenCostHandler(pod_stage, intake, "internal")
    outbox = Outbox()
    token = token_events()[0]
    tokens.handle_one(record((TOKENS_TOPIC, 0), 4, raw(token, "2099-01-01T00:00:00Z")), NOW, outbox)
    tokens.handle_one(record((TOKENS_TOPIC, 0), 5, raw(token)), NOW, outbox)
    assert pod_stage.token_watermark.value(NOW) == token.time_ms
    assert tokens.positions() == {(TOKENS_TOPIC, 0): 5}  # offset 5 is held by its window
    pod = pod_events()[0]
    handler_ = PodHandler(pods, DeviceStage(BOOK, stage_settings, pods), pod_stage, intake)
    handler_.handle(record((PODS_TOPIC, 0), 0, raw(pod, "2099-01-01T00:00:00Z")), outbox)
    assert pods.as_of(pod.data.uid, parse_time("2100-01-01T00:00:00Z")) is None
    assert [(d["topic"], d["reason"]) for d in letters(outbox)] == [
        (TOKENS_TOPIC, "clock_skew"),
        (PODS_TOPIC, "clock_skew"),
    ]


def test_a_too_late_token_does_not_start_its_partitions_clock() -> None:
    pod_stage = PodStage(StreamSettings(retention_s=300, late_horizon_s=300), PodHistory())
    marker_end = T0 + 3 * 3600_000
    from streams.worker.pod_stage import decode_internal

    pod_stage.add_internal(
        ("internal", 0), 0, decode_internal(encode_marker(0, 1, marker_end)), NOW
    )
    token = token_events()[0]
    assert pod_stage.add_tokens((TOKENS_TOPIC, 1), 0, token, NOW) == TOO_LATE
    assert pod_stage.token_watermark.value(NOW) is None


# ------------------------------------------------------------------ emitting cannot crash


def test_a_window_that_cannot_be_formed_is_dead_lettered_with_its_offsets() -> None:
    devices = handler(max_clock_skew_s=float("inf"))
    good = samples_of(DEVICE_A)
    stage = devices.devices
    for i, ev in enumerate(good[:12]):
        stage.add_sample(P0, i, ev, NOW)
    # Past the clock check (as if it were off): the window ends in year 10000.
    bad = make_event(
        good[0].data,
        event_id="y9999",
        source="agent/n1",
        time_ms=parse_time("9999-12-31T23:59:30Z"),
    )
    stage.add_sample(P1, 7, bad, NOW)
    stage.add_sample(
        P1,
        8,
        make_event(bad.data, event_id="y9999b", source="agent/n1", time_ms=bad.time_ms + 1),
        NOW,
    )
    outbox = Outbox()
    devices.poll(NOW, True, outbox)
    [letter] = letters(outbox)
    assert letter["reason"] == "unemittable"
    assert (letter["topic"], letter["partition"], letter["offset"], letter["last_offset"]) == (
        GPU_SAMPLES_TOPIC,
        1,
        7,
        8,
    )
    assert DEVICE_A in letter["detail"]
    assert "outside the times a row can hold" in letter["detail"]
    assert {row.window_start_ms for row in outbox.rows} == {T0}
    # The dropped window holds nothing; the year-9999 clock expired the rest.
    assert devices.positions() == {P0: 12, P1: 9}
    again = Outbox()
    devices.poll(NOW + 1, True, again)  # dropped, not retried
    assert letters(again) == []


def test_a_window_that_cannot_be_written_is_dead_lettered_and_the_others_are_emitted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = streams.worker.handlers.row_message

    def row_message(topic: str, row: Any, route: bytes) -> Any:
        if row.device_uuid == "GPU-l40s":
            raise ValueError("cannot encode")
        return real(topic, row, route)

    monkeypatch.setattr(streams.worker.handlers, "row_message", row_message)
    devices = handler()
    first = [ev for ev in gpu_samples() if ev.time_ms < T0 + 60_000]
    l40s = [ev for ev in first if ev.data.device_uuid == "GPU-l40s"]
    others = [ev for ev in first if ev.data.device_uuid != "GPU-l40s"]
    feed(devices, P0, [record(P0, i, raw(ev)) for i, ev in enumerate(others)])
    feed(devices, P1, [record(P1, i, raw(ev)) for i, ev in enumerate(l40s)])
    outbox = Outbox()
    devices.poll(NOW, True, outbox)
    [letter] = letters(outbox)
    assert (letter["reason"], letter["partition"], letter["offset"]) == ("unemittable", 1, 0)
    assert letter["last_offset"] == len(l40s) - 1
    assert "cannot encode" in letter["detail"]
    rows = [row for row in outbox.rows if isinstance(row, CostRow)]
    assert {row.device_uuid for row in rows} == {ev.data.device_uuid for ev in others}
    # No checkpoint for the dropped window either: it was never emitted.
    assert {s.unit for s in outbox.rows if isinstance(s, WindowStateRow)} == {
        ev.data.device_uuid for ev in others
    }
    partials = [m for m in outbox.messages if m[0] == "internal" and m[1] != b"marker"]
    assert all(orjson.loads(m[2])["device_uuid"] != "GPU-l40s" for m in partials)
    # The others' windows are checkpointed, the broken one dead-lettered: nothing is held.
    assert devices.positions() == {P0: len(others), P1: len(l40s)}


def test_stage_two_dead_letters_a_window_it_cannot_form() -> None:
    pod_stage = PodStage(StreamSettings(), PodHistory())
    intake = Intake(WorkerMetrics(CollectorRegistry()), DeadLetterLog())
    tokens = TokenCostHandler(pod_stage, intake, "internal")
    token = token_events()[0]
    far = make_event(
        token.data, event_id="far", source="tokens", time_ms=parse_time("9999-12-31T23:59:30Z")
    )
    pod_stage.add_tokens((TOKENS_TOPIC, 0), 3, far, NOW)  # past the clock check
    pod_stage.add_tokens((TOKENS_TOPIC, 0), 4, token, NOW)
    outbox = Outbox()
    tokens.poll(NOW, True, outbox)
    [letter] = letters(outbox)
    assert (letter["reason"], letter["topic"], letter["offset"]) == ("unemittable", TOKENS_TOPIC, 3)
    assert {row.window_start_ms for row in outbox.rows} == {T0}
    assert tokens.positions() == {(TOKENS_TOPIC, 0): 5}  # the good window is checkpointed

"""The worker's two stages as pure state machines: closing, lateness, versions, offsets."""

from __future__ import annotations

from decimal import Decimal

from worker_scenario import T0, gpu_samples, pod_events, token_events

from streams.labels import PodHistory
from streams.pricing import EXAMPLE_PRICE_BOOK, load_price_book
from streams.worker.device_stage import (
    DUPLICATE,
    LATE,
    OK,
    TOO_LATE,
    DeviceStage,
    StreamSettings,
)
from streams.worker.pod_stage import Marker, PodStage, decode_internal, encode_marker
from streams.worker.watermark import Watermark

BOOK = load_price_book(EXAMPLE_PRICE_BOOK)
SAMPLES = ("gpuledger.gpu-samples", 0)
NOW = 1_000.0


def stage(**kw: float) -> tuple[DeviceStage, PodHistory]:
    pods = PodHistory()
    for ev in pod_events():
        pods.add(ev.id, ev.time_ms, ev.data)
    return DeviceStage(BOOK, StreamSettings(**kw), pods), pods


def test_watermark_is_the_minimum_of_active_partitions_and_ignores_idle_ones() -> None:
    wm = Watermark(idle_after_s=30)
    assert wm.value(0) is None
    wm.observe(("t", 0), 5_000, now_s=0)
    wm.observe(("t", 1), 9_000, now_s=0)
    assert wm.value(1) == 5_000
    wm.observe(("t", 1), 12_000, now_s=20)
    assert wm.value(40) == 12_000  # partition 0 silent for 40 s no longer holds it back
    assert not wm.all_idle(40) and wm.all_idle(60)


def test_windows_close_only_when_the_watermark_passes_end_plus_grace() -> None:
    devices, _ = stage()
    first = [ev for ev in gpu_samples() if ev.data.device_uuid == "GPU-h100-a"]
    for i, ev in enumerate(first[:13]):  # up to T0 + 60.5 s: window 1 not yet closable
        assert devices.add_sample(SAMPLES, i, ev, NOW) == OK
    assert devices.poll(NOW).rows == []
    for i, ev in enumerate(first[13:15], start=13):  # T0 + 70.5 s passes end + 10 s grace
        devices.add_sample(SAMPLES, i, ev, NOW)
    rows = devices.poll(NOW).rows
    assert {r.window_start_ms for r in rows} == {T0}
    assert sum((r.cost_usd for r in rows), Decimal(0)) > 0
    assert devices.closed_until_ms() == T0 + 60_000


def test_duplicates_late_corrections_and_too_late() -> None:
    devices, _ = stage(retention_s=300, late_horizon_s=300)
    events = [ev for ev in gpu_samples() if ev.data.device_uuid == "GPU-h100-a"]
    for i, ev in enumerate(events):
        devices.add_sample(SAMPLES, i, ev, NOW)
    assert devices.add_sample(SAMPLES, 99, events[0], NOW) == DUPLICATE
    first = devices.poll(NOW).rows
    version = {r.key: r.version for r in first}
    from schemas.events import make_event

    late = make_event(events[0].data, event_id="late", source="s", time_ms=events[0].time_ms)
    assert devices.add_sample(SAMPLES, 100, late, NOW) == LATE
    again = devices.poll(NOW).rows
    assert again and all(r.version > version[r.key] for r in again)
    assert {r.window_start_ms for r in again} == {T0}
    ancient = make_event(events[0].data, event_id="old", source="s", time_ms=T0 - 600_000)
    assert devices.add_sample(SAMPLES, 101, ancient, NOW) == TOO_LATE


def test_commit_position_holds_back_to_the_oldest_open_window() -> None:
    devices, _ = stage(retention_s=300)
    events = [ev for ev in gpu_samples() if ev.data.device_uuid == "GPU-h100-a"]
    for i, ev in enumerate(events):
        devices.add_sample(SAMPLES, 10 + i, ev, NOW)
    assert devices.held.positions() == {SAMPLES: 10}  # nothing closed yet
    out = devices.poll(NOW)
    # Windows 1-2 closed and checkpointed, window 3 open: its first sample is still needed.
    assert {s.window_start_ms for s in out.states} == {T0, T0 + 60_000}
    first_open = next(i for i, ev in enumerate(events) if ev.time_ms >= T0 + 120_000)
    assert devices.held.positions() == {SAMPLES: 10 + first_open}
    devices.revoke({SAMPLES})
    assert devices.held.positions() == {}
    assert devices.open_windows == 0


def test_pod_metadata_arriving_after_close_re_emits_with_a_higher_version() -> None:
    pods = PodHistory()
    devices = DeviceStage(BOOK, StreamSettings(), pods)
    for i, ev in enumerate(gpu_samples()):
        devices.add_sample(SAMPLES, i, ev, NOW)
    rows = devices.poll(NOW + 100).rows  # every input idle: everything closes
    untagged = {r.key: r for r in rows if r.pod_uid == "uid-late"}
    assert {r.team for r in untagged.values()} == {"__untagged__"}
    for ev in pod_events():
        pods.add(ev.id, ev.time_ms, ev.data)
        devices.on_pod_event(ev.data.uid, ev.time_ms)
    tagged = {r.key: r for r in devices.poll(NOW + 100).rows if r.pod_uid == "uid-late"}
    assert {r.team for r in tagged.values()} == {"research"}
    assert all(tagged[k].version > untagged[k].version for k in untagged)


def test_pod_stage_splits_costs_once_every_sample_partition_has_passed() -> None:
    devices, pods = stage()
    pod_stage = PodStage(StreamSettings(), pods)
    tokens = ("gpuledger.tokens", 0)
    internal = ("internal", 0)
    for i, ev in enumerate(token_events()):
        pod_stage.add_tokens(tokens, i, ev, NOW)
    for i, ev in enumerate(gpu_samples()):
        devices.add_sample(SAMPLES, i, ev, NOW)
    out = devices.poll(NOW + 100)
    for i, partial in enumerate(out.partials):
        assert pod_stage.add_internal(internal, i, decode_internal(partial.encode()), NOW) == OK
    assert pod_stage.poll(NOW).cost_rows == []  # no marker yet: stage one may still send
    marker = decode_internal(encode_marker(0, 1, devices.closed_until_ms() or 0))
    assert isinstance(marker, Marker)
    pod_stage.add_internal(internal, 999, marker, NOW)
    result = pod_stage.poll(NOW + 100)
    search = [r for r in result.cost_rows if r.pod_uid == "uid-search"]
    usage = [r for r in out.rows if r.pod_uid == "uid-search"]
    assert sum((r.cost_usd for r in search), Decimal(0)) == sum(
        (r.cost_usd for r in usage), Decimal(0)
    )
    assert {r.model for r in search} == {"llama-3-70b", "mistral-7b"}
    assert all(r.team == "search" for r in search)


def test_garbage_on_the_internal_topic_is_dead_lettered_not_a_crash() -> None:
    from aiokafka import ConsumerRecord
    from prometheus_client import CollectorRegistry

    from streams.metrics import WorkerMetrics
    from streams.worker.handlers import TokenCostHandler
    from streams.worker.intake import DeadLetterLog, Intake
    from streams.worker.outbox import Outbox

    _, pods = stage()
    intake = Intake(WorkerMetrics(CollectorRegistry()), DeadLetterLog())
    handler = TokenCostHandler(PodStage(StreamSettings(), pods), intake, "internal")
    outbox = Outbox()
    record = ConsumerRecord("internal", 0, 7, 0, 0, b"k", b"not json", None, 1, 8, ())
    handler.handle_one(record, NOW, outbox)
    handler.handle_one(record, NOW, outbox)  # the same record again: one letter
    assert [(m[0], m[1]) for m in outbox.messages] == [("gpuledger.dead-letter", b"internal|0|7")]
    assert handler.positions() == {("internal", 0): 8}


def test_a_revoke_keeps_only_what_the_remaining_windows_still_need() -> None:
    from msgspec.structs import replace

    devices, _ = stage()
    first = [ev for ev in gpu_samples() if ev.time_ms < T0 + 60_000]
    a, b = first[0], next(ev for ev in first if ev.data.device_uuid != first[0].data.device_uuid)
    p0, p1 = ("gpuledger.gpu-samples", 0), ("gpuledger.gpu-samples", 1)
    devices.add_sample(p0, 5, a, NOW)
    devices.add_sample(p1, 7, replace(a, id="a-again-on-p1"), NOW)  # one device, two partitions
    devices.add_sample(p1, 9, b, NOW)
    assert devices.held.positions() == {p0: 5, p1: 7}
    devices.revoke([p0])  # the device fed from p0 goes, and with it its hold on p1 at 7
    assert devices.held.positions() == {p1: 9}

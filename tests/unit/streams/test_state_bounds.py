"""The worker's state stays bounded by its configuration over a long run (design §5): closed
windows by the retention, held offsets by the open windows, pod metadata by the pods alive
within the late horizon, remembered prices by `Pricer.MAX_PRICES`; and a closed window, packed,
costs about a kilobyte."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

import pytest
from checkpoint_store import (
    CheckpointTable,
    DeviceRun,
    PodInput,
    PodRun,
    Table,
    gpu_sample,
    token_delta,
)

from schemas.events import CloudEvent, GpuSample, PodInfo
from streams.allocation import Pricer
from streams.labels import PodHistory
from streams.pricing import EXAMPLE_PRICE_BOOK, load_price_book
from streams.worker.device_stage import TOO_LATE, DeviceStage, StreamSettings
from streams.worker.pod_stage import Marker, PodStage

BOOK = load_price_book(EXAMPLE_PRICE_BOOK)
T0 = 1_795_000_020_000  # a window start
SAMPLES = "gpuledger.gpu-samples"
SAMPLE_PARTITIONS = 4
INTERNAL = ("gpuledger.internal", 0)
TOKENS = ("gpuledger.tokens", 0)
SETTINGS = StreamSettings(grace_s=10, idle_flush_s=30, retention_s=600, late_horizon_s=3600)
WINDOWS_RETAINED = int(SETTINGS.retention_s) // 60
MODELS = [f"Model {i}" for i in range(8)]  # not in the book: the default price
MAX_PRICES = 5


@dataclass
class Pod:
    uid: str
    device: int
    created_ms: int
    ends_ms: int
    deleted: bool = False


class Cluster:
    """Devices each running a pod at a time (every fifth, two), pods living 20 to 90 minutes:
    created, relabelled half-way (one in two), deleted, replaced."""

    def __init__(self, devices: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.devices = devices
        self.pods: dict[str, Pod] = {}
        self.running: dict[int, list[Pod]] = {}
        self.events: list[tuple[int, str, PodInfo]] = []  # due pod events (time, id, info)
        self.serial = 0
        for d in range(devices):
            self.running[d] = [self._start(d, T0) for _ in range(2 if d % 5 == 0 else 1)]

    def _start(self, device: int, time_ms: int) -> Pod:
        self.serial += 1
        uid = f"pod-{self.serial}"
        life_ms = self.rng.randrange(20, 90) * 60_000
        pod = self.pods[uid] = Pod(uid, device, time_ms, time_ms + life_ms)
        info = PodInfo("c1", uid, f"ns-{device % 7}", uid, f"n{device}", {"team": "a"}, {})
        self.events.append((time_ms - 2_000, f"{uid}:created", info))
        if self.rng.random() < 0.5:
            relabelled = PodInfo("c1", uid, info.namespace, uid, info.node, {"team": "b"}, {})
            self.events.append((time_ms + life_ms // 2, f"{uid}:relabelled", relabelled))
        gone = PodInfo("c1", uid, info.namespace, uid, info.node, {"team": "a"}, {}, deleted=True)
        self.events.append((time_ms + life_ms, f"{uid}:deleted", gone))
        return pod

    def tick(self, time_ms: int) -> list[tuple[int, str, PodInfo]]:
        """Replace the pods that ended; the pod events now due, in time order."""
        for device, pods in self.running.items():
            for i, pod in enumerate(pods):
                if pod.ends_ms <= time_ms:
                    pod.deleted = True
                    pods[i] = self._start(device, time_ms)
        self.events.sort(key=lambda e: (e[0], e[1]))
        due = 0
        while due < len(self.events) and self.events[due][0] <= time_ms:
            due += 1
        now, self.events = self.events[:due], self.events[due:]
        return now


def known_pods(cluster: Cluster, added: set[str], cutoff_ms: int | None) -> int:
    """Pods whose events were added, less those deleted before the last cutoff."""
    count = 0
    for uid in added:
        pod = cluster.pods[uid]
        if not (pod.deleted and cutoff_ms is not None and pod.ends_ms < cutoff_ms):
            count += 1
    return count


def test_a_long_run_keeps_every_structure_within_its_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Pricer, "MAX_PRICES", MAX_PRICES)
    devices, hours, every_ms = 50, 12, 10_000
    cluster = Cluster(devices, seed=7)
    pods = PodHistory()
    checkpoints = CheckpointTable()
    run = DeviceRun(DeviceStage(BOOK, SETTINGS, pods), Table(), checkpoints)
    pod_run = PodRun(PodStage(SETTINGS, pods), Table(), Table(), checkpoints)
    stage, pod_stage = run.stage, pod_run.stage
    offsets = {p: 0 for p in range(SAMPLE_PARTITIONS)}
    internal_offset = token_offset = 0
    added: set[str] = set()
    cutoff: int | None = None
    reach_ms = SETTINGS.late_horizon_ms + SETTINGS.window_ms + SETTINGS.grace_ms
    marker_sent: int | None = None
    too_late = 0
    for tick in range(hours * 3600_000 // every_ms):
        time_ms = T0 + tick * every_ms
        now_s = time_ms / 1000
        for event_time, event_id, info in cluster.tick(time_ms):
            if pods.add(event_id, event_time, info):
                added.add(info.uid)
                stage.on_pod_event(info.uid, event_time)
                pod_stage.on_pod_event(info.uid, event_time)
        by_partition: dict[int, list[CloudEvent[GpuSample]]] = {}
        for device, running in cluster.running.items():
            procs = [(pod.uid, 20.0, 40.0) for pod in running]
            model = MODELS[device % len(MODELS)]
            ev = gpu_sample(
                f"GPU-{device}", time_ms + device, f"{device}@{time_ms}", procs, gpu_model=model
            )
            by_partition.setdefault(device % SAMPLE_PARTITIONS, []).append(ev)
        if tick % 360 == 180:  # an agent back from half an hour away re-sends a window
            late = [
                gpu_sample("GPU-3", time_ms - 1_800_000 + i * every_ms, f"late-{tick}-{i}")
                for i in range(6)
            ]
            by_partition[3] = late + by_partition[3]
        for partition, events in by_partition.items():
            first = offsets[partition]
            offsets[partition] += len(events)
            counts = run.batch(
                (SAMPLES, partition), list(range(first, offsets[partition])), events, now_s
            )
            too_late += len(counts.too_late)
        # Stage two: the partials and a marker per sample partition, then token deltas.
        internal: list[PodInput] = list(run.partials)
        run.partials.clear()
        closed = stage.closed_until_ms()
        if closed is not None and closed != marker_sent:
            marker_sent = closed
            internal += [Marker(p, SAMPLE_PARTITIONS, closed) for p in range(SAMPLE_PARTITIONS)]
        if internal:
            first = internal_offset
            internal_offset += len(internal)
            pod_run.batch(INTERNAL, list(range(first, internal_offset)), internal, now_s)
        if tick % 3 == 0:
            deltas = [
                token_delta(pod.uid, "m0", time_ms + 5, f"{pod.uid}@{time_ms}")
                for running in cluster.running.values()
                for pod in running
            ]
            first = token_offset
            token_offset += len(deltas)
            statuses = pod_run.batch(TOKENS, list(range(first, token_offset)), deltas, now_s)
            assert TOO_LATE not in statuses
        run.write()
        pod_run.write()
        watermark = stage.watermark.value(now_s)
        if tick % 6 == 5 and watermark is not None:  # once a window, as the seal loop does
            cutoff = watermark - reach_ms
            pods.forget_before(cutoff)

        if tick % 360 != 359:
            continue
        # ---------------------------------------------------------------- once an hour
        assert too_late == 0
        assert len(stage._closed) <= WINDOWS_RETAINED + 2
        assert len(stage._open) <= 2
        assert len(stage.held.windows()) <= 2
        for slots in stage._closed.values():
            for packed in slots.values():
                assert isinstance(packed, bytes)  # no live window once emitted
                assert sys.getsizeof(packed) < 1_200
        for devices in stage._by_pod.values():
            assert devices
            # Each names a device's latest retained window.
            assert all(device in stage._closed.get(start, {}) for device, start in devices.items())
        pods_running = sum(len(r) for r in cluster.running.values())
        retained_pods = len({uid for uid in stage._by_pod})
        assert retained_pods <= pods_running * 2  # the pods of the retained windows only
        assert len(stage.pricer._known) <= MAX_PRICES

        assert len(pods) == known_pods(cluster, added, cutoff)
        assert pods.held_events <= 3 * len(pods)
        # Pods alive within the horizon: those running, and those that ended since the cutoff
        # (a pod lives at least 20 minutes: 50 devices, 60 pods, over 1 h 1 min).
        horizon_pods = pods_running * (1 + reach_ms // 1_200_000 + 1)
        assert len(pods) <= horizon_pods

        starts = set(pod_stage._pods_by_start)
        assert len(starts) <= WINDOWS_RETAINED + 3
        assert len(pod_stage._slots) <= (WINDOWS_RETAINED + 3) * pods_running * 2
        assert len(pod_stage.held.windows()) <= 3
        for (start, pod_uid), pod_slot in pod_stage._slots.items():
            assert start in starts
            # Closed and emitted: the packed bytes alone; live: open, not yet closed.
            assert isinstance(pod_slot, bytes) or pod_uid in pod_stage._open.get(start, ())
    assert run.restored >= hours - 1  # the re-sent windows came back from their checkpoints


def test_a_packed_window_of_a_1_hz_device_with_two_pods_is_about_a_kilobyte() -> None:
    pods = PodHistory()
    stage = DeviceStage(BOOK, StreamSettings(), pods)
    events = [
        gpu_sample(
            "GPU-0",
            T0 + i * 1_000 + 3,
            f"agent-n1/GPU-0/{T0 + i * 1_000}",  # ids as agents make them
            [("9f1c2a4e-5b6d-4e8f-9a0b-1c2d3e4f5a6b", 30, 60.0), ("pod-2-uid", 10, 20.0)],
            interval_s=1.0,
        )
        for i in range(60)
    ]
    partition = (SAMPLES, 0)
    stage.add_samples(partition, list(range(60)), events, 1.0)
    live = stage._open[T0]["GPU-0"].window
    assert live is not None and live.sample_count == 60
    later = gpu_sample("GPU-0", T0 + 75_000, "next", [], interval_s=1.0)
    stage.add_samples(partition, [60], [later], 1.0)  # past the end + grace: it closes
    out = stage.poll(1.0)
    assert {(s.window_start_ms, s.unit) for s in out.states} == {(T0, "GPU-0")}
    packed = stage._closed[T0]["GPU-0"]
    assert isinstance(packed, bytes)  # the bytes alone: no slot, no live window
    assert packed == out.states[0].state
    assert sys.getsizeof(packed) < 1_200
    ids_as_strings = sum(sys.getsizeof(ev.id) for ev in events)
    assert sys.getsizeof(packed) < ids_as_strings  # smaller than the ids alone were
    assert stage.held.positions() == {partition: 60}  # only the open window is held

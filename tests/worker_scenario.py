"""A scripted cluster for worker tests, and the rows the allocation core says it must produce.

Three nodes: two whole H100s, an A100 split into MIG instances (3g.40gb and 1g.10gb), a spot
L40S. Tagged pods, a pod tagged through its namespace, an untagged pod, a pod whose metadata
arrives late, a host process, idle gaps, and three inference models with token counters.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from folding import fold

from runtime.kafka import KafkaSettings, default_topics, ensure_topics, partition_counts
from schemas.events import (
    GPU_SAMPLES_TOPIC,
    PODS_TOPIC,
    TOKENS_TOPIC,
    CloudEvent,
    GpuSample,
    PodInfo,
    ProcessSample,
    TokenDelta,
    encode_event,
    make_event,
)
from streams.allocation import AllocationSettings, DeviceWindow, Pricer, finalize_device_window
from streams.labels import resolve_owner
from streams.pricing import EXAMPLE_PRICE_BOOK, PriceBook, load_price_book
from streams.rows import KIND_USAGE, CostRow, TokenCostRow, TokenRow
from streams.tokens import PodOwner, TokenWindow, token_cost_rows
from streams.windows import window_of

GB = 10**9
T0 = 1_795_000_020_000  # 2026-11-18, a window start
GRACE_MS = 10_000


@dataclass(frozen=True)
class Device:
    node: str
    uuid: str
    gpu_uuid: str
    model: str
    mem_total_bytes: int
    mig: tuple[str, int] | None = None
    labels: dict[str, str] = field(default_factory=dict)


DEVICES = (
    Device("n1", "GPU-h100-a", "GPU-h100-a", "NVIDIA H100 80GB HBM3", 80 * GB),
    Device("n1", "GPU-h100-b", "GPU-h100-b", "NVIDIA H100 80GB HBM3", 80 * GB),
    Device("n2", "MIG-a100-3g", "GPU-a100", "NVIDIA A100-SXM4-80GB", 40 * GB, ("3g.40gb", 3)),
    Device("n2", "MIG-a100-1g", "GPU-a100", "NVIDIA A100-SXM4-80GB", 10 * GB, ("1g.10gb", 1)),
    Device(
        "n3",
        "GPU-l40s",
        "GPU-l40s",
        "NVIDIA L40S",
        48 * GB,
        labels={"karpenter.sh/capacity-type": "spot"},
    ),
)

PODS = {
    "uid-search": PodInfo(
        "c1",
        "uid-search",
        "search",
        "vllm-search-0",
        "n1",
        {"team": "search", "product": "assistant"},
        {"cost-center": "CC-7"},
    ),
    "uid-ads": PodInfo(
        "c1",
        "uid-ads",
        "ads",
        "tgi-ads-0",
        "n1",
        {"product": "ranking"},
        {"team": "ads", "cost-center": "CC-9"},
    ),
    "uid-sandbox": PodInfo("c1", "uid-sandbox", "sandbox", "notebook-0", "n2", {}, {}),
    "uid-late": PodInfo(
        "c1",
        "uid-late",
        "research",
        "trainer-0",
        "n3",
        {"team": "research", "product": "évaluation"},
        {},
    ),
}

# device -> [(pod uid or None, GB, SM %)] by phase; phase = sample index // 6
WORKLOAD: dict[str, list[list[tuple[str | None, float, float | None]]]] = {
    "GPU-h100-a": [[("uid-search", 60, 70.0)], [("uid-search", 60, 85.0), (None, 2, None)]],
    "GPU-h100-b": [[("uid-ads", 20, 30.0), ("uid-search", 50, 80.0)], []],  # idle gap
    "MIG-a100-3g": [[("uid-sandbox", 30, None)], [("uid-sandbox", 35, None)]],
    "MIG-a100-1g": [[], [("uid-ads", 4, None)]],
    "GPU-l40s": [[("uid-late", 40, 95.0)], [("uid-late", 40, 99.0)]],
}
SAMPLE_EVERY_S = 5.0
SAMPLES_PER_DEVICE = 36  # three 60 s windows


def gpu_samples() -> list[CloudEvent[GpuSample]]:
    events = []
    for device in DEVICES:
        phases = WORKLOAD[device.uuid]
        for i in range(SAMPLES_PER_DEVICE):
            procs = tuple(
                ProcessSample(1000 + j, uid, f"containerd://{j}" if uid else None, int(gb * GB), sm)
                for j, (uid, gb, sm) in enumerate(phases[(i // 6) % len(phases)])
            )
            used = sum(p.mem_used_bytes for p in procs)
            data = GpuSample(
                cluster="c1",
                node=device.node,
                device_uuid=device.uuid,
                gpu_uuid=device.gpu_uuid,
                gpu_model=device.model,
                mig_profile=device.mig[0] if device.mig else None,
                mig_slices=device.mig[1] if device.mig else None,
                gpu_slices=7,
                interval_s=SAMPLE_EVERY_S,
                mem_total_bytes=device.mem_total_bytes,
                mem_used_bytes=used,
                sm_util_pct=None if device.mig else 50.0,
                node_labels=device.labels,
                processes=procs,
            )
            time_ms = T0 + int(i * SAMPLE_EVERY_S * 1000) + 500
            events.append(
                make_event(
                    data,
                    event_id=f"{device.uuid}:{time_ms}",
                    source=f"agent/{device.node}",
                    time_ms=time_ms,
                )
            )
    return events


def pod_events(*, include_late: bool = True) -> list[CloudEvent[PodInfo]]:
    out = []
    for uid, pod in PODS.items():
        if uid == "uid-late" and not include_late:
            continue
        out.append(make_event(pod, event_id=f"pod:{uid}:1", source="pods", time_ms=T0 - 60_000))
    return out


SERVED = {"uid-search": ["llama-3-70b", "mistral-7b"], "uid-ads": ["qwen2-7b"]}


def token_events() -> list[CloudEvent[TokenDelta]]:
    events = []
    for uid, models in SERVED.items():
        pod = PODS[uid]
        for k in range(12):  # every 15 s for three windows
            for m, model in enumerate(models):
                delta = TokenDelta(
                    "c1",
                    pod.namespace,
                    pod.name,
                    uid,
                    model,
                    prompt_tokens=1000 * (m + 1) + 10 * k,
                    completion_tokens=400 + 5 * k,
                    requests=3 + m,
                    interval_s=15.0,
                    cached_tokens=100,
                    prefill_s=0.5,
                    decode_s=2.0,
                )
                time_ms = T0 + 15_000 * k + 1_000
                events.append(
                    make_event(
                        delta, event_id=f"tok:{uid}:{model}:{k}", source="tokens", time_ms=time_ms
                    )
                )
    return events


# ------------------------------------------------------------------ expected output


def expected_rows(
    samples: Sequence[CloudEvent[GpuSample]],
    pods: Sequence[CloudEvent[PodInfo]],
    tokens: Sequence[CloudEvent[TokenDelta]],
    settings: AllocationSettings | None = None,
    book: PriceBook | None = None,
) -> tuple[list[CostRow], list[TokenRow], list[TokenCostRow]]:
    """What the allocation core computes from the whole input, ignoring versions."""
    settings = settings or AllocationSettings()
    book = book or load_price_book(EXAMPLE_PRICE_BOOK)
    history = _FirstKnown(pods)
    windows: dict[tuple[int, str], DeviceWindow] = {}
    pricer = Pricer(book)
    for ev in samples:
        start = window_of(ev.time_ms, settings.window_s)
        fold(
            windows.setdefault((start, ev.data.device_uuid), DeviceWindow(start)),
            ev,
            pricer,
            settings,
        )
    size = settings.window_s * 1000
    cost_rows: list[CostRow] = []
    for (start, _), window in sorted(windows.items()):
        as_of = start + size + GRACE_MS
        cost_rows += finalize_device_window(
            window, lambda u, t=as_of: history.as_of(u, t), settings, 0
        )
    token_windows: dict[tuple[int, str], dict[str, TokenWindow]] = defaultdict(dict)
    for ev in tokens:
        start = window_of(ev.time_ms, settings.window_s)
        token_windows[(start, ev.data.pod_uid)].setdefault(ev.data.model, TokenWindow()).add(ev)
    pod_cost: dict[tuple[int, str], Decimal] = defaultdict(Decimal)
    for row in cost_rows:
        if row.kind == KIND_USAGE:
            pod_cost[(row.window_start_ms, row.pod_uid)] += row.cost_usd
    token_rows: list[TokenRow] = []
    cpt_rows: list[TokenCostRow] = []
    for (start, uid), models in sorted(token_windows.items()):
        rows = {m: w.row(start, start + size, uid, m, 0) for m, w in models.items()}
        token_rows += rows.values()
        as_of = start + size + GRACE_MS
        ns, name, team, product, cc = resolve_owner(
            uid, lambda u, t=as_of: history.as_of(u, t), settings.labels
        )
        any_row = next(iter(rows.values()))
        owner = PodOwner(
            any_row.cluster,
            ns if name else any_row.namespace,
            name or any_row.pod,
            team,
            product,
            cc,
        )
        cpt_rows += token_cost_rows(
            start, start + size, uid, pod_cost[(start, uid)], rows, owner, 0
        )
    return cost_rows, token_rows, cpt_rows


class _FirstKnown:
    """The oracle's pod lookup, written apart from `PodHistory`: the latest event (by time, then
    id) dated at or before `t`; where a pod has none that early, its earliest (design §3 step
    6). Duplicate ids count once."""

    def __init__(self, pods: Iterable[CloudEvent[PodInfo]]) -> None:
        self.events: dict[str, dict[str, CloudEvent[PodInfo]]] = defaultdict(dict)
        for ev in pods:
            self.events[ev.data.uid].setdefault(ev.id, ev)

    def as_of(self, uid: str, t: int) -> PodInfo | None:
        events = self.events.get(uid)
        if not events:
            return None
        early = [ev for ev in events.values() if ev.time_ms <= t]
        if early:
            return max(early, key=lambda ev: (ev.time_ms, ev.id)).data
        return min(events.values(), key=lambda ev: (ev.time_ms, ev.id)).data


def comparable(rows: Iterable[Any]) -> list[tuple[Any, ...]]:
    """Rows as tuples without version; floats rounded so engines' float output compares."""
    out = []
    for row in rows:
        values = []
        for name in row.__dataclass_fields__:
            if name == "version":
                continue
            value = getattr(row, name)
            values.append(round(value, 6) if isinstance(value, float) else value)
        out.append(tuple(values))
    return sorted(out, key=repr)


async def publish(
    bootstrap: str, topic: str, events: Iterable[CloudEvent[Any]], key_of: Any
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, encode_event(ev), key=key_of(ev).encode()) for ev in events
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def publish_raw(bootstrap: str, topic: str, values: Iterable[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=b"garbage")
    finally:
        await producer.stop()


async def publish_scenario(bootstrap: str, *, include_late_pod: bool = True) -> None:
    await ensure_topics(KafkaSettings(bootstrap=bootstrap), default_topics(2))
    await publish(
        bootstrap, PODS_TOPIC, pod_events(include_late=include_late_pod), lambda ev: ev.data.uid
    )
    await publish(bootstrap, GPU_SAMPLES_TOPIC, gpu_samples(), lambda ev: ev.data.device_uuid)
    await publish(bootstrap, TOKENS_TOPIC, token_events(), lambda ev: ev.data.pod_uid)


async def read_topic(
    bootstrap: str, topic: str, timeout_s: float = 60
) -> list[tuple[bytes | None, bytes]]:
    """Every record of `topic`, from the beginning to the end it has now."""
    count = (await partition_counts(KafkaSettings(bootstrap=bootstrap), [topic]))[topic]
    tps = [TopicPartition(topic, p) for p in range(count)]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list[tuple[bytes | None, bytes]] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            positions = {tp: await consumer.position(tp) for tp in tps}
            if all(positions[tp] >= end[tp] for tp in tps):
                return out
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out += [(m.key, m.value) for m in records]
        raise TimeoutError(f"{topic} not read to its end within {timeout_s:.0f} s")
    finally:
        await asyncio.sleep(0)
        await consumer.stop()

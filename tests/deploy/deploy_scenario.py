"""Scenario rows for the dashboard tests, made by the real allocation core: two clusters, whole
GPUs and MIG instances, tagged, partly tagged, untagged and late-labelled pods, host processes,
inference pods with token counters, and a correction (the late pod's windows re-emitted with
labels at a higher version) plus a replayed batch (the same rows inserted twice).

`final_rows` is the truth a reader must see: per key, the row with the highest version.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TypeVar

from folding import fold

from schemas.events import GpuSample, PodInfo, ProcessSample, TokenDelta, make_event
from streams.allocation import (
    AllocationSettings,
    DeviceWindow,
    Pricer,
    finalize_device_window,
)
from streams.pricing import load_price_book
from streams.rows import CostRow, Row, TokenCostRow, TokenRow
from streams.tokens import PodOwner, TokenWindow, token_cost_rows

REPO = Path(__file__).resolve().parents[2]
START_MS = int(datetime(2026, 9, 1, 6, 0, tzinfo=UTC).timestamp() * 1000)
WINDOW_S = 60
WINDOWS = 120  # two hours
SAMPLE_S = 15.0
GIB = 1 << 30
LATE_LABEL_WINDOWS = 30  # the late pod's first half hour goes out untagged, then is corrected


@dataclass(frozen=True)
class Device:
    cluster: str
    node: str
    device_uuid: str
    gpu_uuid: str
    gpu_model: str
    mem_total_bytes: int
    mig_profile: str | None = None
    mig_slices: int | None = None
    capacity: str = "on-demand"


DEVICES = (
    Device("prod-eu", "gpu-a", "GPU-a0", "GPU-a0", "NVIDIA H100 80GB HBM3", 80 * GIB),
    Device("prod-eu", "gpu-a", "GPU-a1", "GPU-a1", "NVIDIA H100 80GB HBM3", 80 * GIB),
    Device(
        "prod-eu", "gpu-b", "MIG-b0-0", "GPU-b0", "NVIDIA A100-SXM4-80GB", 40 * GIB, "3g.40gb", 3
    ),
    Device(
        "prod-eu", "gpu-b", "MIG-b0-1", "GPU-b0", "NVIDIA A100-SXM4-80GB", 40 * GIB, "3g.40gb", 3
    ),
    Device("prod-us", "gpu-c", "GPU-c0", "GPU-c0", "NVIDIA L40S", 45 * GIB, capacity="spot"),
)

NS_LABELS = {
    "search": {"team": "search", "product": "assistant", "cost-center": "CC-100"},
    "ads": {"team": "ads", "cost-center": "CC-200"},
    "research": {"team": "ml-research"},
    "scratch": {},
    "batch": {"team": "data", "product": "etl", "cost-center": "CC-300"},
}


@dataclass(frozen=True)
class Pod:
    uid: str
    namespace: str
    name: str
    labels: dict[str, str]
    models: tuple[str, ...] = ()


PODS = {
    p.uid: p
    for p in (
        Pod("uid-search-1", "search", "vllm-llama-0", {}, ("llama-3-70b", "qwen-2-7b")),
        Pod("uid-search-2", "search", "vllm-qwen-0", {"product": "copilot"}, ("qwen-2-7b",)),
        Pod("uid-ads-1", "ads", "tgi-ranker-0", {"product": "ranker"}, ("qwen-2-7b",)),
        Pod("uid-research-1", "research", "notebook-0", {}, ("mistral-7b",)),
        Pod("uid-scratch-1", "scratch", "debug-0", {}),
        Pod("uid-late-1", "batch", "etl-embed-0", {"team": "data"}, ("bge-large",)),
    )
}

# Which pods run on which device, with (memory GiB, SM %) as a function of the window index.
PLACEMENT: dict[str, tuple[tuple[str | None, int, int], ...]] = {
    "GPU-a0": (("uid-search-1", 60, 70),),
    "GPU-a1": (("uid-search-2", 20, 35), ("uid-ads-1", 30, 25), (None, 2, 5)),
    "MIG-b0-0": (("uid-research-1", 10, 40),),
    "MIG-b0-1": (("uid-scratch-1", 12, 20), ("uid-late-1", 6, 30)),
    "GPU-c0": (("uid-ads-1", 15, 55),),
}


def pod_info(pod: Pod, cluster: str, node: str, *, labelled: bool = True) -> PodInfo:
    return PodInfo(
        cluster=cluster,
        uid=pod.uid,
        namespace=pod.namespace,
        name=pod.name,
        node=node,
        labels=pod.labels if labelled else {},
        namespace_labels=NS_LABELS[pod.namespace] if labelled else {},
    )


def _activity(w: int, base: int) -> int:
    """A load that varies over the two hours, and pauses now and then (idle windows)."""
    if w % 17 == 5:
        return 0
    return max(0, base + (w * 7) % 23 - 11)


def _cost_rows() -> tuple[list[CostRow], list[CostRow]]:
    """(rows as first emitted, corrections at version 2)."""
    pricer = Pricer(load_price_book(REPO / "schemas" / "price_book.example.yaml"))
    settings = AllocationSettings(window_s=WINDOW_S)
    first: list[CostRow] = []
    corrections: list[CostRow] = []
    for device in DEVICES:
        for w in range(WINDOWS):
            start_ms = START_MS + w * WINDOW_S * 1000
            window = DeviceWindow(start_ms)
            for s in range(int(WINDOW_S / SAMPLE_S)):
                time_ms = start_ms + int(s * SAMPLE_S * 1000)
                processes = []
                for i, (uid, mem_gib, sm) in enumerate(PLACEMENT[device.device_uuid]):
                    mem = _activity(w + i, mem_gib)
                    if mem == 0:
                        continue
                    processes.append(
                        ProcessSample(1000 + i, uid, None, mem * GIB, float(_activity(w + s, sm)))
                    )
                sample = GpuSample(
                    cluster=device.cluster,
                    node=device.node,
                    device_uuid=device.device_uuid,
                    gpu_uuid=device.gpu_uuid,
                    gpu_model=device.gpu_model,
                    mig_profile=device.mig_profile,
                    mig_slices=device.mig_slices,
                    gpu_slices=7,
                    interval_s=SAMPLE_S,
                    mem_total_bytes=device.mem_total_bytes,
                    mem_used_bytes=sum(p.mem_used_bytes for p in processes),
                    sm_util_pct=float(min(100, sum(p.sm_util_pct or 0 for p in processes))),
                    node_labels={"karpenter.sh/capacity-type": device.capacity},
                    processes=tuple(processes),
                )
                event = make_event(
                    sample,
                    event_id=f"{device.device_uuid}-{time_ms}",
                    source=f"agent/{device.node}",
                    time_ms=time_ms,
                )
                fold(window, event, pricer, settings)

            def labelled(uid: str, dev: Device = device) -> PodInfo | None:
                return pod_info(PODS[uid], dev.cluster, dev.node)

            def late_unknown(uid: str, dev: Device = device) -> PodInfo | None:
                return None if uid == "uid-late-1" else labelled(uid, dev)

            if w < LATE_LABEL_WINDOWS and "uid-late-1" in window.owners:
                first += finalize_device_window(window, late_unknown, settings, version=1)
                corrections += finalize_device_window(window, labelled, settings, version=2)
            else:
                first += finalize_device_window(window, labelled, settings, version=1)
    return first, corrections


K = TypeVar("K", CostRow, TokenRow, TokenCostRow)


def latest(rows: Iterable[K]) -> list[K]:
    """Per key, the row with the highest version (what FINAL reads)."""
    best: dict[str, K] = {}
    for row in rows:
        if row.key not in best or row.version >= best[row.key].version:
            best[row.key] = row
    return sorted(best.values(), key=lambda r: r.key)


def _token_rows(cost_rows: Sequence[CostRow]) -> tuple[list[TokenRow], list[TokenCostRow]]:
    pod_cost: dict[tuple[int, str], Decimal] = defaultdict(Decimal)
    owners: dict[tuple[int, str], CostRow] = {}
    for row in cost_rows:
        if row.kind == "usage":
            pod_cost[(row.window_start_ms, row.pod_uid)] += row.cost_usd
            owners[(row.window_start_ms, row.pod_uid)] = row
    token_rows: list[TokenRow] = []
    token_cost: list[TokenCostRow] = []
    for (start_ms, uid), cost in sorted(pod_cost.items()):
        pod = PODS[uid]
        if not pod.models:
            continue
        owner_row = owners[(start_ms, uid)]
        by_model: dict[str, TokenRow] = {}
        w = (start_ms - START_MS) // (WINDOW_S * 1000)
        for m, model in enumerate(pod.models):
            tw = TokenWindow()
            for s in range(2):
                prompt = 400 * (m + 1) + _activity(w + s, 300) * 7
                completion = 150 * (m + 2) + _activity(w + m, 200) * 3
                tw.add(
                    make_event(
                        TokenDelta(
                            owner_row.cluster,
                            pod.namespace,
                            pod.name,
                            uid,
                            model,
                            prompt,
                            completion,
                            3 + s,
                            30.0,
                            cached_tokens=prompt // 4,
                            prefill_s=0.5,
                            decode_s=2.0,
                        ),
                        event_id=f"{uid}-{model}-{start_ms}-{s}",
                        source=f"tokens/{pod.name}",
                        time_ms=start_ms + 20_000 + s * 30_000,
                    )
                )
            by_model[model] = tw.row(start_ms, start_ms + WINDOW_S * 1000, uid, model, 1)
        token_rows += by_model.values()
        owner = PodOwner(
            owner_row.cluster,
            owner_row.namespace,
            owner_row.pod,
            owner_row.team,
            owner_row.product,
            owner_row.cost_center,
        )
        version = owner_row.version
        token_cost += token_cost_rows(
            start_ms, start_ms + WINDOW_S * 1000, uid, cost, by_model, owner, version
        )
    return token_rows, token_cost


@dataclass(frozen=True)
class Scenario:
    inserts: tuple[tuple[Row, ...], ...]  # insert batches, in order, replays included
    final_costs: tuple[CostRow, ...]
    final_tokens: tuple[TokenRow, ...]
    final_token_costs: tuple[TokenCostRow, ...]


def build() -> Scenario:
    first, corrections = _cost_rows()
    tokens_first, tc_first = _token_rows(first)
    final_costs = latest([*first, *corrections])
    _, tc_corrected = _token_rows(final_costs)
    corrected_tc = [r for r in tc_corrected if r.version > 1]
    replay = tuple(first[: len(first) // 3])  # a worker replaying a third of its output
    return Scenario(
        inserts=(
            tuple(first),
            tuple(tokens_first),
            tuple(tc_first),
            replay,
            tuple(corrections),
            tuple(corrected_tc),
        ),
        final_costs=tuple(final_costs),
        final_tokens=tuple(latest(tokens_first)),
        final_token_costs=tuple(latest([*tc_first, *corrected_tc])),
    )

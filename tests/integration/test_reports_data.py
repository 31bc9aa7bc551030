"""Shared data for the report tests: one chDB folder per test process (chDB allows one), a
fresh database per test, and a small cluster's rows built with the real allocation core plus
hand-made corrections. Holds no tests itself."""

from __future__ import annotations

import uuid
from decimal import Decimal

from chdb_folder import chdb_folder
from folding import fold

from schemas.events import GpuSample, PodInfo, ProcessSample, make_event
from streams.allocation import (
    AllocationSettings,
    DeviceWindow,
    Pricer,
    finalize_device_window,
)
from streams.pricing import load_price_book
from streams.rows import CostRow, Row, TokenCostRow, TokenRow
from streams.store import SCHEMA_DIR, ClickHouseStore
from streams.tokens import PodOwner, token_cost_rows

T0_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z
MIN_MS = 60_000
HOUR_MS = 3_600_000


def fresh_store() -> ClickHouseStore:
    """A new, empty database in this process's chDB folder."""
    store = ClickHouseStore(f"chdb://{chdb_folder()}", database=f"t_{uuid.uuid4().hex[:12]}")
    store.create_schema()
    return store


PODS = {
    "pod-a": PodInfo(
        "c1",
        "pod-a",
        "search",
        "search-vllm-0",
        "n1",
        {"team": "search", "product": "ask", "cost-center": "cc-10"},
    ),
    "pod-b": PodInfo(
        "c1",
        "pod-b",
        "recs",
        "recs-tgi-0",
        "n1",
        {"team": "récommandations", "product": "猫-feed"},
        {"cost-center": "cc-20"},
    ),
    "pod-u": PodInfo("c1", "pod-u", "sandbox", "notebook-7", "n2", {}),
}
MODELS = {"pod-a": ("llama-3-70b",), "pod-b": ("mistral-7b", "llama-3-8b"), "pod-u": ()}


def _sample(device: str, node: str, procs: tuple[ProcessSample, ...], spot: bool) -> GpuSample:
    mig = device.endswith("mig")
    return GpuSample(
        cluster="c1",
        node=node,
        device_uuid=f"GPU-{device}",
        gpu_uuid=f"GPU-{device[:2]}",
        gpu_model="NVIDIA H100 80GB HBM3",
        mig_profile="3g.40gb" if mig else None,
        mig_slices=3 if mig else None,
        gpu_slices=7,
        interval_s=10.0,
        mem_total_bytes=80 * 2**30,
        mem_used_bytes=sum(p.mem_used_bytes for p in procs),
        sm_util_pct=min(100.0, sum(p.sm_util_pct or 0 for p in procs)),
        node_labels={"karpenter.sh/capacity-type": "spot" if spot else "on-demand"},
        processes=procs,
    )


def cluster_rows(hours: int = 3, start_ms: int = T0_MS, window_minutes_step: int = 7) -> list[Row]:
    """Cost, token and cost-per-token rows of a small cluster, made by the allocation core:
    d1 (on-demand) shared by pod-a and pod-b, d2-mig (spot) used by the untagged pod and a host
    process, every few minutes over `hours` hours. Version 1."""
    pricer = Pricer(load_price_book(SCHEMA_DIR / "price_book.example.yaml"))
    settings = AllocationSettings()
    out: list[Row] = []
    gib = 2**30
    for minute in range(0, hours * 60, window_minutes_step):
        w0 = start_ms + minute * MIN_MS
        layouts = {
            "d1": (
                "n1",
                False,
                (
                    ProcessSample(1, "pod-a", None, 30 * gib, 55.0 + minute % 9),
                    ProcessSample(2, "pod-b", None, 10 * gib, 20.0),
                ),
            ),
            "d2-mig": (
                "n2",
                True,
                (
                    ProcessSample(3, "pod-u", None, 8 * gib, 40.0),
                    ProcessSample(4, None, None, 1 * gib, 5.0),
                ),
            ),
        }
        pod_cost: dict[str, Decimal] = {}
        for device, (node, spot, procs) in layouts.items():
            window = DeviceWindow(w0)
            for k in range(6):
                sample = _sample(device, node, procs, spot)
                event = make_event(
                    sample, event_id=f"{device}-{w0}-{k}", source="test", time_ms=w0 + k * 10_000
                )
                fold(window, event, pricer, settings)
            rows = finalize_device_window(window, PODS.get, settings, version=1)
            out += rows
            for r in rows:
                if r.kind == "usage":
                    pod_cost[r.pod_uid] = pod_cost.get(r.pod_uid, Decimal(0)) + r.cost_usd
        for pod_uid, models in MODELS.items():
            if not models:
                continue
            pod = PODS[pod_uid]
            tokens = {}
            for i, model in enumerate(models):
                tokens[model] = TokenRow(
                    w0,
                    w0 + MIN_MS,
                    "c1",
                    pod.namespace,
                    pod.name,
                    pod_uid,
                    model,
                    prompt_tokens=1000 + 37 * i + minute,
                    completion_tokens=400 + 11 * i,
                    requests=5 + i,
                    cached_tokens=100,
                    prefill_s=1.5,
                    decode_s=6.0 + i,
                    version=1,
                )
            out += tokens.values()
            labels = pod.labels
            owner = PodOwner(
                "c1",
                pod.namespace,
                pod.name,
                labels.get("team", "__untagged__"),
                labels.get("product", "__untagged__"),
                labels.get("cost-center")
                or pod.namespace_labels.get("cost-center", "__untagged__"),
            )
            out += token_cost_rows(
                w0,
                w0 + MIN_MS,
                pod_uid,
                pod_cost.get(pod_uid, Decimal(0)),
                tokens,
                owner,
                version=1,
            )
    return out


def corrected(rows: list[Row], version: int = 2) -> list[Row]:
    """A correction of every row: same keys, higher version, and the untagged pod now tagged
    (as when its metadata arrives late). Inserted after the originals it replaces them."""
    import dataclasses

    out: list[Row] = []
    for r in rows:
        if isinstance(r, CostRow) and r.pod_uid == "pod-u":
            out.append(dataclasses.replace(r, team="sandbox-team", version=version))
        else:
            out.append(dataclasses.replace(r, version=version))
    return out


def only(rows: list[Row], kind: type[Row]) -> list[Row]:
    return [r for r in rows if isinstance(r, kind)]


__all__ = [
    "HOUR_MS",
    "MIN_MS",
    "T0_MS",
    "TokenCostRow",
    "cluster_rows",
    "corrected",
    "fresh_store",
    "only",
]

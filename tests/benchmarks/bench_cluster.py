"""A simulated GPU cluster for the worker benchmarks: its devices, pods and GPU-sample records.

`nodes` x `devices_per_node` devices (whole H100, H200, L40S and A100 MIG instances, on-demand
and spot), 1-3 processes each in about 3.9 pods per node. Each node samples all its devices at
its own phase in the second, and each device reports a jittered interval to the microsecond,
as the agent does; the price book gives each sample's expected cost.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
from aiokafka.partitioner import DefaultPartitioner

from schemas.events import (
    GpuSample,
    PodInfo,
    ProcessSample,
    encode_event,
    event_to_dict,
    format_time,
    make_event,
)
from streams.allocation import sample_cost_usd
from streams.pricing import PriceBook, device_price_per_hour

GB = 10**9
T0_MS = 1_795_000_020_000  # 2026-11-18 11:07:00 UTC, a 60 s window start

# (share of nodes in twentieths, model, node labels, memory per device, MIG split)
NODE_TYPES: tuple[tuple[int, str, dict[str, str], int, bool], ...] = (
    (12, "NVIDIA H100 80GB HBM3", {"karpenter.sh/capacity-type": "on-demand"}, 80 * GB, False),
    (3, "NVIDIA H100 80GB HBM3", {"karpenter.sh/capacity-type": "spot"}, 80 * GB, False),
    (2, "NVIDIA A100-SXM4-80GB", {"karpenter.sh/capacity-type": "on-demand"}, 40 * GB, True),
    (2, "NVIDIA L40S", {"karpenter.sh/capacity-type": "spot"}, 48 * GB, False),
    (1, "NVIDIA H200", {"karpenter.sh/capacity-type": "on-demand"}, 141 * GB, False),
)
MIG_PROFILES = (("3g.40gb", 3), ("4g.40gb", 4))  # each MIG GPU is two instances
VARIANTS = 4  # utilisation variants per device, rotated by the second

Record = tuple[int, bytes, bytes]  # partition, key, value


# --------------------------------------------------------------------------- the cluster


@dataclass(frozen=True, slots=True)
class Device:
    uuid: str
    partition: int  # where the producer's default partitioner puts its key
    phase_ms: int  # when in each second its node samples (all devices of a node at once)
    sample_costs_usd: tuple[Decimal, ...]  # per template, from the price book
    templates: tuple[dict[str, Any], ...]  # CloudEvent dicts; id and time are set per sample


class Cluster:
    """`nodes` x `devices_per_node` devices with 1-3 processes each, and their pods."""

    def __init__(
        self, nodes: int, devices_per_node: int, partitions: int, book: PriceBook, seed: int = 7
    ) -> None:
        rng = random.Random(seed)
        kinds = [t for t in NODE_TYPES for _ in range(t[0])]
        self.devices: list[Device] = []
        self.pods: dict[str, PodInfo] = {}
        for n in range(nodes):
            _, model, labels, mem_total, mig = kinds[n % len(kinds)]
            node = f"node-{n:04d}"
            for d in range(devices_per_node):
                gpu = f"GPU-{n:04d}-{d // 2 if mig else d}"
                profile, slices = MIG_PROFILES[d % 2] if mig else (None, None)
                uuid = f"MIG-{n:04d}-{d}" if mig else gpu
                procs = self._processes(rng, node, mem_total, per_process_sm=not mig)
                quote = book.quote(model, book.pricing_class(labels), T0_MS)
                price = device_price_per_hour(quote.price_per_hour_usd, slices, 7)
                variants, costs = [], []
                for v in range(VARIANTS):
                    # a monotonic clock's elapsed time, to the microsecond, as the agent sends it
                    interval_s = round(1.0 + rng.uniform(-0.003, 0.003), 6)
                    costs.append(sample_cost_usd(price, interval_s))
                    sample = GpuSample(
                        cluster="bench",
                        node=node,
                        device_uuid=uuid,
                        gpu_uuid=gpu,
                        gpu_model=model,
                        mig_profile=profile,
                        mig_slices=slices,
                        gpu_slices=7,
                        interval_s=interval_s,
                        mem_total_bytes=mem_total,
                        mem_used_bytes=sum(p.mem_used_bytes for p in procs),
                        sm_util_pct=None if mig else float(40 + 13 * v + d),
                        node_labels={**labels, "node.kubernetes.io/instance-type": model[7:11]},
                        processes=tuple(
                            ProcessSample(
                                p.pid,
                                p.pod_uid,
                                p.container_id,
                                p.mem_used_bytes,
                                None if p.sm_util_pct is None else (p.sm_util_pct + 5 * v) % 100,
                            )
                            for p in procs
                        ),
                    )
                    event = make_event(sample, event_id="", source=f"agent/{node}", time_ms=T0_MS)
                    variants.append(event_to_dict(event))
                self.devices.append(
                    Device(
                        uuid,
                        DefaultPartitioner()(uuid.encode(), list(range(partitions)), []),
                        n * 7919 % 1000,
                        tuple(costs),
                        tuple(variants),
                    )
                )

    def _processes(
        self, rng: random.Random, node: str, mem_total: int, *, per_process_sm: bool
    ) -> list[ProcessSample]:
        out = []
        for i in range(rng.choice((1, 1, 2, 3))):
            uid = None if rng.random() < 0.05 else f"{node}-pod-{rng.randrange(4)}"
            if uid is not None and uid not in self.pods:
                ns = f"ns-{rng.randrange(40)}"
                tagged = rng.random() < 0.9
                labels = {"team": f"team-{rng.randrange(12)}", "product": "p"} if tagged else {}
                ns_labels = {"cost-center": f"CC-{rng.randrange(9)}"}
                self.pods[uid] = PodInfo("bench", uid, ns, uid, node, labels, ns_labels)
            mem = int(mem_total * rng.uniform(0.05, 0.3))
            sm = round(rng.uniform(5, 90), 1) if per_process_sm else None
            out.append(ProcessSample(4000 + i, uid, f"containerd://{uid}-{i}", mem, sm))
        return out

    def second(self, index: int, time_ms: int) -> Iterator[Record]:
        """Every device's sample for one second of cluster time (each node at its own phase)."""
        stamps: dict[int, str] = {}
        for device in self.devices:
            doc = device.templates[index % VARIANTS]
            at_ms = time_ms + device.phase_ms
            stamp = stamps.get(at_ms) or stamps.setdefault(at_ms, format_time(at_ms))
            value = orjson.dumps({**doc, "id": f"{device.uuid}:{at_ms}", "time": stamp})
            yield device.partition, device.uuid.encode(), value

    def pod_events(self, time_ms: int) -> list[tuple[bytes, bytes]]:
        """(key, value) of one metadata event per pod."""
        return [
            (
                uid.encode(),
                encode_event(make_event(pod, event_id=f"pod:{uid}", source="w", time_ms=time_ms)),
            )
            for uid, pod in self.pods.items()
        ]

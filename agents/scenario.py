"""A simulated cluster: nodes, GPUs (whole and MIG), pods, processes, token counters and NVML
faults over simulated time. The fake NVML, the simulated Kubernetes API objects and the simulated
inference `/metrics` pages are all views of one `Scenario`, so they always agree.

Scenario time `t` is seconds since `Scenario.start_unix_s`; the clock that drives it is injected
(`SimClock` for simulations, `time.time` for a live demo).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class MigProfile:
    """One GPU-instance profile as `nvmlDeviceGetGpuInstanceProfileInfo` reports it."""

    profile_id: int  # NVML_GPU_INSTANCE_PROFILE_* value
    name: str  # e.g. "1g.10gb"
    slice_count: int
    memory_size_mb: int
    multiprocessor_count: int


@dataclass(frozen=True, slots=True)
class GpuModel:
    name: str  # as nvmlDeviceGetName returns it
    mem_total_bytes: int
    multiprocessor_count: int
    mig_profiles: tuple[MigProfile, ...] = ()  # empty: no MIG support (NOT_SUPPORTED)


def _profiles(sms: tuple[int, int, int, int, int], mem_mb: int) -> tuple[MigProfile, ...]:
    eighth = mem_mb // 8
    one, two, three, four, seven = sms
    return (
        MigProfile(0, f"1g.{eighth // 1000}gb", 1, eighth, one),
        MigProfile(1, f"2g.{2 * eighth // 1000}gb", 2, 2 * eighth, two),
        MigProfile(2, f"3g.{4 * eighth // 1000}gb", 3, 4 * eighth, three),
        MigProfile(3, f"4g.{4 * eighth // 1000}gb", 4, 4 * eighth, four),
        MigProfile(4, f"7g.{8 * eighth // 1000}gb", 7, 8 * eighth, seven),
        MigProfile(7, f"1g.{eighth // 1000}gb+me", 1, eighth, one),
        MigProfile(9, f"1g.{2 * eighth // 1000}gb", 1, 2 * eighth, one),
    )


H100_80GB = GpuModel(
    "NVIDIA H100 80GB HBM3", 81559 * MIB, 132, _profiles((16, 32, 60, 64, 132), 80_000)
)
A100_80GB = GpuModel(
    "NVIDIA A100-SXM4-80GB", 81920 * MIB, 108, _profiles((14, 28, 42, 56, 98), 80_000)
)
L40S = GpuModel("NVIDIA L40S", 46068 * MIB, 142)
MODELS = {m.name: m for m in (H100_80GB, A100_80GB, L40S)}


@dataclass(frozen=True, slots=True)
class MigInstanceSpec:
    uuid: str  # "MIG-<uuid>"
    profile: str  # a profile name of the parent's model, e.g. "3g.40gb"
    gpu_instance_id: int
    compute_instance_id: int = 0


@dataclass(frozen=True, slots=True)
class GpuSpec:
    uuid: str  # "GPU-<uuid>"
    model: GpuModel
    mig_instances: tuple[MigInstanceSpec, ...] = ()  # non-empty: MIG mode is on
    process_util_supported: bool = True  # False: an older GPU that answers NOT_SUPPORTED

    @property
    def mig_enabled(self) -> bool:
        return bool(self.mig_instances)


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str
    gpus: tuple[GpuSpec, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    # False: a driver older than 550, without nvmlDeviceGetProcessesUtilizationInfo
    has_utilization_info_api: bool = True
    # The device plugin's time-slicing replicas per whole GPU: it advertises GPUs x replicas
    # of `nvidia.com/gpu`, and a pod's request of 1 is one replica (1: not time-sliced).
    gpu_replicas: int = 1


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """A compute process on one device (whole GPU or MIG instance) for [start_s, end_s)."""

    pid: int
    device_uuid: str
    pod_uid: str | None  # None: a host process outside any pod
    container_id: str | None
    start_s: float
    end_s: float | None
    mem_used_bytes: int
    sm_util_pct: float  # mean SM utilisation while busy
    idle_gaps: tuple[tuple[float, float], ...] = ()  # [from, to) with no SM activity
    cgroup_style: str = "systemd-containerd"  # how /proc/<pid>/cgroup names it

    def active(self, t: float) -> bool:
        return self.start_s <= t and (self.end_s is None or t < self.end_s)

    def util_at(self, t: float) -> float:
        """SM % at t: a slow deterministic wave around the mean, 0 in idle gaps."""
        if not self.active(t) or any(a <= t < b for a, b in self.idle_gaps):
            return 0.0
        wave = 1.0 + 0.2 * math.sin(t / 17.0 + self.pid)
        return max(0.0, min(100.0, self.sm_util_pct * wave))


@dataclass(frozen=True, slots=True)
class InferenceSpec:
    """An inference server in a pod, with counters growing at fixed rates while the pod lives."""

    server: str  # "vllm" | "sglang" | "tgi" | "triton"
    model: str
    port: int
    prompt_tokens_per_s: float
    completion_tokens_per_s: float
    requests_per_s: float
    cached_fraction: float = 0.0  # share of prompt tokens served from the prefix cache
    path: str = "/metrics"
    restart_at_s: float | None = None  # the server restarts here: every counter resets


@dataclass(frozen=True, slots=True)
class PodSpec:
    uid: str
    namespace: str
    name: str
    node: str
    start_s: float
    end_s: float | None
    labels: Mapping[str, str] = field(default_factory=dict)
    ip: str = "10.0.0.1"
    inference: InferenceSpec | None = None
    # GPU extended resource -> count its containers request (`nvidia.com/gpu`,
    # `nvidia.com/mig-3g.40gb`, ...); request == limit, as Kubernetes requires of them
    gpu_requests: Mapping[str, int] = field(default_factory=dict)

    def active(self, t: float) -> bool:
        return self.start_s <= t and (self.end_s is None or t < self.end_s)


@dataclass(frozen=True, slots=True)
class NamespaceSpec:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """NVML answers `error_code` (an NVML_ERROR_* value) for [start_s, end_s).

    `device_uuid` None: every device of the node (a driver restart); `call` None: every call.
    A node-wide fault also invalidates every handle: the caller must re-init NVML afterwards.
    """

    node: str
    error_code: int
    start_s: float
    end_s: float
    device_uuid: str | None = None
    call: str | None = None

    def active(self, t: float) -> bool:
        return self.start_s <= t < self.end_s


@dataclass(frozen=True, slots=True)
class Scenario:
    cluster: str
    start_unix_s: float
    nodes: tuple[NodeSpec, ...]
    namespaces: tuple[NamespaceSpec, ...] = ()
    pods: tuple[PodSpec, ...] = ()
    processes: tuple[ProcessSpec, ...] = ()
    faults: tuple[FaultSpec, ...] = ()

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"scenario has no node {name!r}")

    def time_s(self, unix_s: float) -> float:
        return unix_s - self.start_unix_s

    def processes_on(self, device_uuid: str, t: float) -> list[ProcessSpec]:
        return [p for p in self.processes if p.device_uuid == device_uuid and p.active(t)]

    def process(self, pid: int) -> ProcessSpec | None:
        for p in self.processes:
            if p.pid == pid:
                return p
        return None

    def pods_at(self, t: float) -> list[PodSpec]:
        return [p for p in self.pods if p.active(t)]

    def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        for ns in self.namespaces:
            if ns.name == namespace:
                return ns.labels
        return {}

    def device_count(self) -> int:
        return sum(max(1, len(g.mig_instances)) for n in self.nodes for g in n.gpus)


class SimClock:
    """A settable clock in Unix seconds; call it to read the time."""

    def __init__(self, start_unix_s: float) -> None:
        self.now_s = start_unix_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> float:
        self.now_s += seconds
        return self.now_s

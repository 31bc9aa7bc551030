"""A stand-in for pynvml driven by a `Scenario`: same function names, return types (ctypes
structures, `nvmlFriendlyObject`, `c_uint`), units (bytes, percent, microsecond timestamps) and
`pynvml.NVMLError_*` exceptions as the real module, so the agent runs unchanged against it.

    nvml = FakeNvml(scenario, node="gpu-node-1", clock=sim_clock)
    sampler = DeviceSampler(nvml, ...)

Behaviours modelled on nvml.h: NOT_FOUND when no utilisation sample is newer than the timestamp
passed; NOT_SUPPORTED for per-process utilisation on MIG (and on GPUs marked as older); MIG mode
NOT_SUPPORTED on GPUs without MIG; empty MIG slots NOT_FOUND; GPU_IS_LOST and driver restarts from
the scenario's faults (a node-wide fault invalidates handles until `nvmlInit` succeeds again).
"""

from __future__ import annotations

from collections.abc import Callable
from ctypes import c_uint
from dataclasses import dataclass
from typing import Any

import pynvml

from agents.scenario import GpuSpec, MigInstanceSpec, NodeSpec, Scenario

_NO_INSTANCE = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class FakeHandle:
    """What `nvmlDeviceGetHandleByIndex` returns: opaque to callers."""

    uuid: str
    generation: int
    gpu: GpuSpec
    mig: MigInstanceSpec | None = None


class FakeNvml:
    """One node's NVML. Unknown attributes (constants, `NVMLError_*`, structures) come from the
    real pynvml module, so `nvml.NVMLError_NotFound is pynvml.NVMLError_NotFound`."""

    def __init__(self, scenario: Scenario, node: str, clock: Callable[[], float]) -> None:
        self.scenario = scenario
        self.node: NodeSpec = scenario.node(node)
        self.clock = clock
        self.initialized = False
        self.generation = 0
        self.calls = 0  # every NVML call made, for tests and the overhead benchmark

    def __getattr__(self, name: str) -> Any:
        return getattr(pynvml, name)

    # --- plumbing ------------------------------------------------------------------------------

    def _t(self) -> float:
        return self.scenario.time_s(self.clock())

    def _enter(self, call: str, handle: FakeHandle | None = None) -> float:
        """Check init state and faults for one call; returns scenario time."""
        self.calls += 1
        t = self._t()
        for fault in self.scenario.faults:
            if fault.node != self.node.name or not fault.active(t):
                continue
            if fault.device_uuid is None:
                self.initialized = False  # the driver went away: every handle is now stale
                raise pynvml.NVMLError(fault.error_code)
            on_device = handle is not None and fault.device_uuid in (handle.uuid, handle.gpu.uuid)
            if on_device and (fault.call is None or fault.call == call):
                raise pynvml.NVMLError(fault.error_code)
        if not self.initialized:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        if handle is not None and handle.generation != self.generation:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        return t

    def _gpu_handle(self, gpu: GpuSpec) -> FakeHandle:
        return FakeHandle(gpu.uuid, self.generation, gpu)

    # --- library -------------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.calls += 1
        t = self._t()
        for fault in self.scenario.faults:
            if fault.node == self.node.name and fault.device_uuid is None and fault.active(t):
                raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
        if not self.initialized:
            self.generation += 1
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self.calls += 1
        if not self.initialized:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        self.initialized = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return "550.90.07" if self.node.has_utilization_info_api else "535.104.05"

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.node.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.node.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._gpu_handle(self.node.gpus[index])

    # --- identity ------------------------------------------------------------------------------

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        self._enter("nvmlDeviceGetName", handle)
        if handle.mig is not None:
            return f"{handle.gpu.model.name} MIG {handle.mig.profile}"
        return handle.gpu.model.name

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        self._enter("nvmlDeviceGetUUID", handle)
        return handle.uuid

    # --- MIG -----------------------------------------------------------------------------------

    def nvmlDeviceGetMigMode(self, handle: FakeHandle) -> list[int]:
        self._enter("nvmlDeviceGetMigMode", handle)
        if handle.mig is not None or not handle.gpu.model.mig_profiles:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if handle.gpu.mig_enabled else 0
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetMaxMigDeviceCount", handle)
        return 7 if handle.gpu.mig_enabled and handle.mig is None else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeHandle, index: int) -> FakeHandle:
        self._enter("nvmlDeviceGetMigDeviceHandleByIndex", handle)
        if handle.mig is not None or not handle.gpu.mig_enabled or not 0 <= index < 7:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if index >= len(handle.gpu.mig_instances):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        mig = handle.gpu.mig_instances[index]
        return FakeHandle(mig.uuid, self.generation, handle.gpu, mig)

    def nvmlDeviceIsMigDeviceHandle(self, handle: FakeHandle) -> c_uint:
        self._enter("nvmlDeviceIsMigDeviceHandle", handle)
        return c_uint(1 if handle.mig is not None else 0)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: FakeHandle) -> FakeHandle:
        self._enter("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", handle)
        if handle.mig is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._gpu_handle(handle.gpu)

    def nvmlDeviceGetGpuInstanceId(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetGpuInstanceId", handle)
        return handle.mig.gpu_instance_id if handle.mig is not None else _NO_INSTANCE

    def nvmlDeviceGetComputeInstanceId(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetComputeInstanceId", handle)
        return handle.mig.compute_instance_id if handle.mig is not None else _NO_INSTANCE

    def nvmlDeviceGetAttributes(self, handle: FakeHandle) -> Any:
        self._enter("nvmlDeviceGetAttributes", handle)
        if handle.mig is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        profile = _profile(handle.gpu, handle.mig.profile)
        attrs = pynvml.c_nvmlDeviceAttributes()
        attrs.multiprocessorCount = profile.multiprocessor_count
        attrs.gpuInstanceSliceCount = profile.slice_count
        attrs.computeInstanceSliceCount = profile.slice_count
        attrs.memorySizeMB = profile.memory_size_mb
        return attrs

    def nvmlDeviceGetGpuInstanceProfileInfo(
        self, handle: FakeHandle, profile: int, version: int = 2
    ) -> Any:
        self._enter("nvmlDeviceGetGpuInstanceProfileInfo", handle)
        if not 0 <= profile < pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT or handle.mig is not None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        for p in handle.gpu.model.mig_profiles:
            if p.profile_id == profile:
                info = pynvml.c_nvmlGpuInstanceProfileInfo_v2_t()
                info.id = p.profile_id
                info.sliceCount = p.slice_count
                info.instanceCount = 7 // p.slice_count
                info.multiprocessorCount = p.multiprocessor_count
                info.memorySizeMB = p.memory_size_mb
                info.name = f"MIG {p.name}".encode()
                return info
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    # --- memory and utilisation ----------------------------------------------------------------

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> Any:
        t = self._enter("nvmlDeviceGetMemoryInfo", handle)
        total = _total_bytes(handle)
        if handle.mig is None and handle.gpu.mig_enabled:
            uuids = {m.uuid for m in handle.gpu.mig_instances}
            procs = [p for u in uuids for p in self.scenario.processes_on(u, t)]
        else:
            procs = self.scenario.processes_on(handle.uuid, t)
        reserved = min(total, 512 * (1 << 20))  # the driver's own context, never a process's
        used = min(total, reserved + sum(p.mem_used_bytes for p in procs))
        memory = pynvml.c_nvmlMemory_t()
        memory.total = total
        memory.used = used
        memory.free = total - used
        return memory

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> Any:
        t = self._enter("nvmlDeviceGetUtilizationRates", handle)
        if handle.mig is not None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        procs = self.scenario.processes_on(handle.uuid, t)
        util = pynvml.c_nvmlUtilization_t()
        util.gpu = round(min(100.0, sum(p.util_at(t) for p in procs)))
        util.memory = round(min(100.0, sum(p.util_at(t) for p in procs) / 2))
        return util

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[Any]:
        t = self._enter("nvmlDeviceGetComputeRunningProcesses", handle)
        procs = self.scenario.processes_on(handle.uuid, t)
        objects = []
        for p in procs:
            info = pynvml.c_nvmlProcessInfo_v3_t()
            info.pid = p.pid
            info.usedGpuMemory = p.mem_used_bytes
            info.gpuInstanceId = handle.mig.gpu_instance_id if handle.mig else _NO_INSTANCE
            info.computeInstanceId = handle.mig.compute_instance_id if handle.mig else _NO_INSTANCE
            objects.append(pynvml.nvmlStructToFriendlyObject(info))
        return objects

    def nvmlDeviceGetProcessUtilization(self, handle: FakeHandle, timeStamp: int) -> list[Any]:
        samples = self._utilisation("nvmlDeviceGetProcessUtilization", handle, timeStamp)
        out = []
        for pid, ts, sm in samples:
            s = pynvml.c_nvmlProcessUtilizationSample_t()
            s.pid, s.timeStamp, s.smUtil, s.memUtil = pid, ts, sm, sm // 2
            out.append(s)
        return out

    def nvmlDeviceGetProcessesUtilizationInfo(
        self, handle: FakeHandle, timeStamp: int
    ) -> list[Any]:
        if not self.node.has_utilization_info_api:
            self.calls += 1
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        samples = self._utilisation("nvmlDeviceGetProcessesUtilizationInfo", handle, timeStamp)
        out = []
        for pid, ts, sm in samples:
            s = pynvml.c_nvmlProcessUtilizationInfo_v1_t()
            s.pid, s.timeStamp, s.smUtil, s.memUtil = pid, ts, sm, sm // 2
            out.append(s)
        return out

    def _utilisation(
        self, call: str, handle: FakeHandle, since_us: int
    ) -> list[tuple[int, int, int]]:
        t = self._enter(call, handle)
        if (
            handle.mig is not None
            or handle.gpu.mig_enabled
            or not handle.gpu.process_util_supported
        ):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        now_us = int(self.clock() * 1_000_000)
        if now_us <= since_us:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        # One sample per process with non-zero utilisation in the last period, as nvml.h says.
        samples = [
            (p.pid, now_us, round(p.util_at(t)))
            for p in self.scenario.processes_on(handle.uuid, t)
            if round(p.util_at(t)) > 0
        ]
        if not samples:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return samples


def _profile(gpu: GpuSpec, name: str) -> Any:
    for p in gpu.model.mig_profiles:
        if p.name == name:
            return p
    raise ValueError(f"{gpu.model.name} has no MIG profile {name!r}")


def _total_bytes(handle: FakeHandle) -> int:
    if handle.mig is not None:
        return int(_profile(handle.gpu, handle.mig.profile).memory_size_mb) * (1 << 20)
    return handle.gpu.model.mem_total_bytes

"""Device discovery through NVML: every whole GPU, or every MIG instance of a GPU in MIG mode,
with the identity a sample carries (uuids, model, MIG profile and slice counts).

Discovery is done once and repeated rarely (MIG layouts change by operator action), never per
sample: per-sample MIG lookups are what made other exporters burn whole cores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pynvml

# Errors that mean the driver (not one device) is gone: the agent must shut NVML down and
# initialise it again.
DRIVER_ERRORS: tuple[type[Exception], ...] = (
    pynvml.NVMLError_Uninitialized,
    pynvml.NVMLError_DriverNotLoaded,
    pynvml.NVMLError_LibRmVersionMismatch,
    pynvml.NVMLError_LibraryNotFound,
)
# Errors that mean one GPU is gone (XID 79 "fallen off the bus" and friends).
LOST_ERRORS: tuple[type[Exception], ...] = (
    pynvml.NVMLError_GpuIsLost,
    pynvml.NVMLError_ResetRequired,
)


@dataclass(frozen=True, slots=True)
class Device:
    """One metered device: a whole GPU or one MIG instance."""

    handle: Any
    device_uuid: str
    gpu_uuid: str
    gpu_model: str
    mig_profile: str | None
    mig_slices: int | None
    gpu_slices: int

    @property
    def is_mig(self) -> bool:
        return self.mig_profile is not None


@dataclass(frozen=True, slots=True)
class MigProfileInfo:
    name: str
    slice_count: int
    memory_size_mb: int


def error_name(exc: BaseException) -> str:
    """A short stable label for an NVML error: `NotFound`, `GpuIsLost`, `code_999` ..."""
    name = type(exc).__name__
    if name.startswith("NVMLError_"):
        return name[len("NVMLError_") :]
    value = getattr(exc, "value", None)
    return f"code_{value}" if value is not None else name


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_profiles(nvml: Any, gpu: Any) -> list[MigProfileInfo]:
    """Every GPU-instance profile the GPU supports (profile ids until INVALID_ARGUMENT)."""
    profiles = []
    for profile_id in range(int(getattr(nvml, "NVML_GPU_INSTANCE_PROFILE_COUNT", 0x12))):
        try:
            info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(gpu, profile_id)
        except pynvml.NVMLError_InvalidArgument:
            break
        except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_NotFound):
            continue
        name = _text(info.name).removeprefix("MIG ").strip()
        profiles.append(MigProfileInfo(name, int(info.sliceCount), int(info.memorySizeMB)))
    return profiles


def _mig_profile_name(profiles: list[MigProfileInfo], slice_count: int, memory_size_mb: int) -> str:
    candidates = [p for p in profiles if p.slice_count == slice_count]
    if not candidates:
        return f"{slice_count}g.{round(memory_size_mb / 1024)}gb"
    # `+me` variants share slices and memory with the plain profile; the plain one comes first.
    best = min(candidates, key=lambda p: (abs(p.memory_size_mb - memory_size_mb), "+" in p.name))
    return best.name


def discover(
    nvml: Any, on_error: Callable[[str, BaseException], None] | None = None
) -> list[Device]:
    """Every device of this node. A lost GPU is skipped (and reported through `on_error`);
    a driver-level error propagates so the caller re-initialises NVML."""
    devices: list[Device] = []
    for index in range(int(nvml.nvmlDeviceGetCount())):
        try:
            devices.extend(_devices_of_gpu(nvml, index))
        except DRIVER_ERRORS:
            raise
        except pynvml.NVMLError as exc:
            if on_error is not None:
                on_error("discover", exc)
    return devices


def _devices_of_gpu(nvml: Any, index: int) -> list[Device]:
    gpu = nvml.nvmlDeviceGetHandleByIndex(index)
    gpu_uuid = _text(nvml.nvmlDeviceGetUUID(gpu))
    model = _text(nvml.nvmlDeviceGetName(gpu))
    try:
        mig_on = nvml.nvmlDeviceGetMigMode(gpu)[0] == pynvml.NVML_DEVICE_MIG_ENABLE
    except pynvml.NVMLError_NotSupported:
        mig_on = False
    if not mig_on:
        return [Device(gpu, gpu_uuid, gpu_uuid, model, None, None, _whole_gpu_slices(nvml, gpu))]
    profiles = gpu_profiles(nvml, gpu)
    gpu_slices = max((p.slice_count for p in profiles), default=7)
    devices = []
    for slot in range(int(nvml.nvmlDeviceGetMaxMigDeviceCount(gpu))):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, slot)
        except (pynvml.NVMLError_NotFound, pynvml.NVMLError_InvalidArgument):
            continue  # an empty slot
        attrs = nvml.nvmlDeviceGetAttributes(mig)
        slices = int(attrs.gpuInstanceSliceCount)
        devices.append(
            Device(
                handle=mig,
                device_uuid=_text(nvml.nvmlDeviceGetUUID(mig)),
                gpu_uuid=gpu_uuid,
                gpu_model=model,
                mig_profile=_mig_profile_name(profiles, slices, int(attrs.memorySizeMB)),
                mig_slices=slices,
                gpu_slices=gpu_slices,
            )
        )
    return devices


def _whole_gpu_slices(nvml: Any, gpu: Any) -> int:
    """Compute slices of a whole GPU: its largest MIG profile's (7 on A100/H100), else 1."""
    try:
        profiles = gpu_profiles(nvml, gpu)
    except pynvml.NVMLError:
        return 1
    return max((p.slice_count for p in profiles), default=1)

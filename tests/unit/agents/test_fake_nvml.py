"""The fake NVML answers with pynvml's own types, units and exceptions."""

from __future__ import annotations

from ctypes import c_uint

import pynvml
import pytest

from agents.demo_scenario import demo_scenario
from agents.fake_nvml import FakeNvml
from agents.scenario import GIB, SimClock

START = 1_800_000_000.0


@pytest.fixture
def clock() -> SimClock:
    return SimClock(START + 300.0)


@pytest.fixture
def nvml(clock: SimClock) -> FakeNvml:
    fake = FakeNvml(demo_scenario(START), "gpu-node-1", clock)
    fake.nvmlInit()
    return fake


def test_calls_before_init_raise_uninitialized(clock: SimClock) -> None:
    fake = FakeNvml(demo_scenario(START), "gpu-node-1", clock)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()


def test_exceptions_and_constants_are_the_real_pynvml_ones(nvml: FakeNvml) -> None:
    assert nvml.NVMLError_NotFound is pynvml.NVMLError_NotFound
    assert nvml.NVML_DEVICE_MIG_ENABLE == pynvml.NVML_DEVICE_MIG_ENABLE
    with pytest.raises(pynvml.NVMLError) as info:
        nvml.nvmlDeviceGetHandleByIndex(99)
    assert info.value.value == pynvml.NVML_ERROR_INVALID_ARGUMENT


def test_mig_handle_check_returns_c_uint_like_pynvml(nvml: FakeNvml) -> None:
    gpu = nvml.nvmlDeviceGetHandleByIndex(0)
    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, 0)
    flag = nvml.nvmlDeviceIsMigDeviceHandle(mig)
    assert isinstance(flag, c_uint)
    assert flag.value == 1
    assert nvml.nvmlDeviceIsMigDeviceHandle(gpu) != 0  # the c_uint pitfall: never equal to 0
    assert not bool(nvml.nvmlDeviceIsMigDeviceHandle(gpu))


def test_mig_enumeration_slots_and_profiles(nvml: FakeNvml) -> None:
    gpu = nvml.nvmlDeviceGetHandleByIndex(0)
    assert nvml.nvmlDeviceGetMigMode(gpu) == [1, 1]
    assert nvml.nvmlDeviceGetMaxMigDeviceCount(gpu) == 7
    with pytest.raises(pynvml.NVMLError_NotFound):
        nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, 5)  # only four instances exist
    attrs = nvml.nvmlDeviceGetAttributes(nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, 0))
    assert isinstance(attrs, pynvml.c_nvmlDeviceAttributes)
    assert attrs.gpuInstanceSliceCount == 3
    info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(gpu, pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE)
    assert info.sliceCount == 7 and info.name == "MIG 7g.80gb"  # pynvml decodes char arrays
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetGpuInstanceProfileInfo(gpu, pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT)


def test_no_mig_on_l40s() -> None:
    clock = SimClock(START + 300)
    fake = FakeNvml(demo_scenario(START), "gpu-node-3", clock)
    fake.nvmlInit()
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.nvmlDeviceGetMigMode(fake.nvmlDeviceGetHandleByIndex(0))


def test_memory_in_bytes_and_processes_as_friendly_objects(nvml: FakeNvml) -> None:
    gpu = nvml.nvmlDeviceGetHandleByIndex(1)
    memory = nvml.nvmlDeviceGetMemoryInfo(gpu)
    assert isinstance(memory, pynvml.c_nvmlMemory_t)
    assert memory.total == memory.used + memory.free
    procs = nvml.nvmlDeviceGetComputeRunningProcesses(gpu)
    assert len(procs) == 1
    assert isinstance(procs[0], pynvml.nvmlFriendlyObject)
    assert procs[0].usedGpuMemory == 70 * GIB
    assert procs[0].gpuInstanceId == 0xFFFFFFFF  # MIG off


def test_process_utilisation_timestamps_in_microseconds_and_not_found_when_nothing_new(
    nvml: FakeNvml, clock: SimClock
) -> None:
    gpu = nvml.nvmlDeviceGetHandleByIndex(1)
    samples = nvml.nvmlDeviceGetProcessesUtilizationInfo(gpu, 0)
    assert isinstance(samples[0], pynvml.c_nvmlProcessUtilizationInfo_v1_t)
    assert samples[0].timeStamp == int(clock() * 1_000_000)
    assert 0 < samples[0].smUtil <= 100
    with pytest.raises(pynvml.NVMLError_NotFound):
        nvml.nvmlDeviceGetProcessesUtilizationInfo(gpu, samples[0].timeStamp)
    legacy = nvml.nvmlDeviceGetProcessUtilization(gpu, 0)
    assert isinstance(legacy[0], pynvml.c_nvmlProcessUtilizationSample_t)


def test_process_utilisation_not_supported_on_mig(nvml: FakeNvml) -> None:
    gpu = nvml.nvmlDeviceGetHandleByIndex(0)
    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, 0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetProcessUtilization(mig, 0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetUtilizationRates(mig)


def test_processes_come_and_go_with_time(clock: SimClock) -> None:
    scenario = demo_scenario(START)
    fake = FakeNvml(scenario, "gpu-node-3", clock)
    fake.nvmlInit()
    gpu = fake.nvmlDeviceGetHandleByIndex(2)  # batch jobs: 420 s on, 180 s off, from t=60
    clock.now_s = START + 100
    assert len(fake.nvmlDeviceGetComputeRunningProcesses(gpu)) == 1
    clock.now_s = START + 500
    assert fake.nvmlDeviceGetComputeRunningProcesses(gpu) == []


def test_old_driver_lacks_the_newer_utilisation_call(clock: SimClock) -> None:
    fake = FakeNvml(demo_scenario(START), "gpu-node-2", clock)
    fake.nvmlInit()
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        fake.nvmlDeviceGetProcessesUtilizationInfo(fake.nvmlDeviceGetHandleByIndex(0), 0)

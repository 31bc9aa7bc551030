"""One sampling pass of the node agent: read every device through NVML and turn the readings into
`io.gpuledger.gpu.sample.v1` events.

NVML is injected (the real `pynvml` module or `agents.fake_nvml.FakeNvml`), as are the clocks and
the `/proc/<pid>/cgroup` reader, so the same code runs on a GPU node, in tests and in the demo.
What NVML really does is absorbed here: NOT_FOUND (no utilisation sample since the last read) means
0 % for every running process; NOT_SUPPORTED (MIG, older GPUs) means null and a metric; a lost GPU
is dropped until rediscovery finds it again; a driver-level failure shuts NVML down and
re-initialises it with exponential backoff.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pynvml

from agents.cgroup import PodRef, parse_cgroup
from agents.metrics import AgentMetrics
from agents.nvml_devices import DRIVER_ERRORS, LOST_ERRORS, Device, discover, error_name
from schemas.events import CloudEvent, GpuSample, ProcessSample, make_event
from schemas.fields import MAX_PROCESSES, fit_labels

log = logging.getLogger(__name__)

CgroupReader = Callable[[int], str | None]


@dataclass(frozen=True, slots=True)
class SamplerSettings:
    cluster: str
    node: str
    interval_s: float = 1.0
    node_labels: Mapping[str, str] = field(default_factory=dict)
    rediscover_s: float = 60.0  # look for MIG layout changes and lost GPUs this often
    reinit_backoff_max_s: float = 60.0

    @property
    def source(self) -> str:
        return f"gpuledger/agent/{self.cluster}/{self.node}"


@dataclass(slots=True)
class _DeviceState:
    previous_monotonic_s: float | None = None
    util_since_us: int | None = None
    util_unsupported: bool = False


class DeviceSampler:
    """Holds the NVML session and per-device state; `sample()` is one pass over every device."""

    def __init__(
        self,
        nvml: Any,
        settings: SamplerSettings,
        metrics: AgentMetrics,
        *,
        cgroup_reader: CgroupReader,
        wall_clock: Callable[[], float],
        monotonic_clock: Callable[[], float] | None = None,
    ) -> None:
        self.nvml = nvml
        labels, dropped = fit_labels(settings.node_labels)
        if dropped:
            log.warning(
                "%d node labels left out of the samples: keys and values longer than "
                "Kubernetes allows, or more labels than an event carries",
                dropped,
            )
            settings = replace(settings, node_labels=labels)
        self.settings = settings
        self.metrics = metrics
        self.cgroup_reader = cgroup_reader
        self.wall_clock = wall_clock
        self.monotonic_clock = monotonic_clock or wall_clock
        self.devices: list[Device] | None = None
        self._state: dict[str, _DeviceState] = {}
        self._pods: dict[int, PodRef | None] = {}
        self._next_open_s = 0.0
        self._open_backoff_s = 1.0
        self._next_discover_s = 0.0
        self._use_info_api = True  # nvmlDeviceGetProcessesUtilizationInfo until it is missing
        self.last_error: str | None = None

    # --- session -------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self.devices is not None

    def close(self) -> None:
        if self.devices is not None:
            self.devices = None
            with contextlib.suppress(pynvml.NVMLError):  # the driver may already be gone
                self.nvml.nvmlShutdown()
        self._state.clear()

    def _open(self, now_s: float) -> bool:
        try:
            self.nvml.nvmlInit()
            self.devices = discover(self.nvml, self._discovery_error)
        except pynvml.NVMLError as exc:
            self.metrics.nvml_error("nvmlInit", error_name(exc))
            self.metrics.reinit(ok=False)
            self.last_error = f"NVML init failed: {exc}"
            self.devices = None
            self._next_open_s = now_s + self._open_backoff_s
            log.warning("%s; retrying in %.0f s", self.last_error, self._open_backoff_s)
            self._open_backoff_s = min(self._open_backoff_s * 2, self.settings.reinit_backoff_max_s)
            return False
        self.metrics.reinit(ok=True)
        self._devices_found(self.devices)
        self._open_backoff_s = 1.0
        self._next_discover_s = now_s + self.settings.rediscover_s
        self.last_error = None
        return True

    def _devices_found(self, devices: list[Device]) -> None:
        """The device count, and the per-device series of devices gone removed."""
        self.metrics.devices(len(devices))
        self.metrics.devices_present(d.device_uuid for d in devices)

    def _discovery_error(self, call: str, exc: BaseException) -> None:
        self.metrics.nvml_error(call, error_name(exc))

    def _rediscover(self, now_s: float) -> None:
        try:
            devices = discover(self.nvml, self._discovery_error)
        except DRIVER_ERRORS as exc:
            self._driver_lost(exc, now_s)
            return
        except pynvml.NVMLError as exc:
            self.metrics.nvml_error("discover", error_name(exc))
            return
        self.devices = devices
        self._devices_found(devices)
        present = {d.device_uuid for d in devices}
        for uuid in [u for u in self._state if u not in present]:
            del self._state[uuid]
        self._next_discover_s = now_s + self.settings.rediscover_s

    def _driver_lost(self, exc: BaseException, now_s: float) -> None:
        self.last_error = f"NVML driver-level failure: {exc}"
        log.warning("%s; re-initialising", self.last_error)
        self.close()
        self._next_open_s = now_s + self._open_backoff_s

    # --- one pass ------------------------------------------------------------------------------

    def sample(self) -> list[CloudEvent[GpuSample]]:
        """Read every device once; returns one event per device that answered."""
        started_s = self.monotonic_clock()
        if self.devices is None:
            if started_s < self._next_open_s or not self._open(started_s):
                return []
        elif started_s >= self._next_discover_s:
            self._rediscover(started_s)
            if self.devices is None:
                return []
        time_s = self.wall_clock()
        time_ms = round(time_s * 1000)
        events: list[CloudEvent[GpuSample]] = []
        seen_pids: set[int] = set()
        lost: list[str] = []
        for device in self.devices or ():
            try:
                sample = self._read(device, time_s, seen_pids)
            except DRIVER_ERRORS as exc:
                self._driver_lost(exc, started_s)
                return events
            except LOST_ERRORS:
                self.metrics.device_lost(device.device_uuid)
                lost.append(device.device_uuid)
                continue
            except pynvml.NVMLError:
                continue  # counted in _call; this device is skipped for this interval only
            events.append(
                make_event(
                    sample,
                    event_id=f"{device.device_uuid}:{time_ms}",
                    source=self.settings.source,
                    time_ms=time_ms,
                )
            )
        if lost and self.devices is not None:
            self.devices = [d for d in self.devices if d.device_uuid not in lost]
            for uuid in lost:
                self._state.pop(uuid, None)
            self._devices_found(self.devices)
            # Look again soon: a GPU that comes back after a reset gets a new handle.
            self._next_discover_s = min(self._next_discover_s, started_s + 10.0)
        for pid in [p for p in self._pods if p not in seen_pids]:
            del self._pods[pid]
        self.metrics.sampled(len(events), time_s, self.monotonic_clock() - started_s)
        return events

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self.nvml, name)(*args)
        except pynvml.NVMLError_NotFound:
            raise  # "no sample newer than the timestamp": the normal answer for idle devices
        except pynvml.NVMLError as exc:
            self.metrics.nvml_error(name, error_name(exc))
            raise

    def _read(self, device: Device, time_s: float, seen_pids: set[int]) -> GpuSample:
        state = self._state.setdefault(device.device_uuid, _DeviceState())
        handle = device.handle
        memory = self._call("nvmlDeviceGetMemoryInfo", handle)
        total = int(memory.total)
        used = min(int(memory.used), total)
        sm_util: float | None = None
        if not device.is_mig:  # NOT_SUPPORTED on MIG instances by definition
            try:
                sm_util = float(self._call("nvmlDeviceGetUtilizationRates", handle).gpu)
            except pynvml.NVMLError_NotSupported:
                sm_util = None
        try:
            running = self._call("nvmlDeviceGetComputeRunningProcesses", handle)
        except (pynvml.NVMLError_NoPermission, pynvml.NVMLError_NotSupported):
            running = []
        per_process = self._process_util(device, state, time_s)
        processes = []
        for proc in running:
            pid = int(proc.pid)
            seen_pids.add(pid)
            ref = self._pod_of(pid)
            mem = proc.usedGpuMemory
            mem_used = 0 if mem is None else max(0, min(int(mem), total))
            util = None if per_process is None else per_process.get(pid, 0.0)
            processes.append(
                ProcessSample(
                    pid=pid,
                    pod_uid=ref.pod_uid if ref else None,
                    container_id=ref.container_id if ref else None,
                    mem_used_bytes=mem_used,
                    sm_util_pct=util,
                )
            )
        if len(processes) > MAX_PROCESSES:  # NVML sets no count; an event carries so many
            log.warning(
                "%s lists %d processes; its sample carries the %d using the most memory",
                device.device_uuid,
                len(processes),
                MAX_PROCESSES,
            )
            processes.sort(key=lambda p: p.mem_used_bytes, reverse=True)
            del processes[MAX_PROCESSES:]
        now_mono = self.monotonic_clock()
        previous = state.previous_monotonic_s
        elapsed = now_mono - previous if previous is not None else self.settings.interval_s
        state.previous_monotonic_s = now_mono
        if elapsed <= 0:
            elapsed = self.settings.interval_s
        return GpuSample(
            cluster=self.settings.cluster,
            node=self.settings.node,
            device_uuid=device.device_uuid,
            gpu_uuid=device.gpu_uuid,
            gpu_model=device.gpu_model,
            mig_profile=device.mig_profile,
            mig_slices=device.mig_slices,
            gpu_slices=device.gpu_slices,
            interval_s=round(elapsed, 6),
            mem_total_bytes=total,
            mem_used_bytes=used,
            sm_util_pct=sm_util,
            node_labels=self.settings.node_labels,
            processes=tuple(processes),
        )

    def _process_util(
        self, device: Device, state: _DeviceState, time_s: float
    ) -> dict[int, float] | None:
        """SM % per pid since the last read; {} when NVML has no new sample (all idle);
        None when the device cannot report it."""
        if state.util_unsupported:
            return None
        if state.util_since_us is None:
            state.util_since_us = int((time_s - self.settings.interval_s) * 1_000_000)
        try:
            samples = self._util_samples(device.handle, state.util_since_us)
        except pynvml.NVMLError_NotFound:
            return {}
        except pynvml.NVMLError_NotSupported:
            state.util_unsupported = True
            self.metrics.process_util_unsupported(device.device_uuid, True)
            return None
        sums: dict[int, list[float]] = {}
        newest = state.util_since_us
        for s in samples:
            newest = max(newest, int(s.timeStamp))
            sums.setdefault(int(s.pid), []).append(float(s.smUtil))
        state.util_since_us = newest
        return {pid: min(100.0, sum(v) / len(v)) for pid, v in sums.items()}

    def _util_samples(self, handle: Any, since_us: int) -> list[Any]:
        if self._use_info_api:
            try:
                return list(self._call("nvmlDeviceGetProcessesUtilizationInfo", handle, since_us))
            except (pynvml.NVMLError_FunctionNotFound, AttributeError):
                self._use_info_api = False  # driver older than 550 or an older binding
        return list(self._call("nvmlDeviceGetProcessUtilization", handle, since_us))

    def _pod_of(self, pid: int) -> PodRef | None:
        if pid in self._pods:
            return self._pods[pid]
        text = self.cgroup_reader(pid)
        if text is None:
            self.metrics.pid_unresolved()
            return None  # not cached: the next pass tries again
        ref = parse_cgroup(text)
        self._pods[pid] = ref
        return ref

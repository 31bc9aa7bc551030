"""The real sampler against the fake NVML: events, intervals, MIG, and NVML's failure modes."""

from __future__ import annotations

import pynvml
import pytest
from prometheus_client import CollectorRegistry

from agents.demo_scenario import demo_scenario
from agents.fake_nvml import FakeNvml
from agents.metrics import AgentMetrics
from agents.sampler import CgroupReader, DeviceSampler, SamplerSettings
from agents.scenario import (
    GIB,
    H100_80GB,
    FaultSpec,
    GpuSpec,
    NodeSpec,
    ProcessSpec,
    Scenario,
    SimClock,
)
from agents.scenario_views import cgroup_reader, cgroup_text
from schemas.events import GpuSample, Ok, decode_event, encode_event

START = 1_800_000_000.0
POD_A = "11111111-2222-4333-8444-555555555555"
POD_B = "99999999-8888-4777-8666-555555555555"
CID = "ab" * 32


def _sampler(
    scenario: Scenario, node: str, clock: SimClock, reader: CgroupReader | None = None
) -> tuple[DeviceSampler, CollectorRegistry]:
    registry = CollectorRegistry()
    sampler = DeviceSampler(
        FakeNvml(scenario, node, clock),
        SamplerSettings(cluster="c1", node=node, interval_s=1.0, node_labels={"zone": "a"}),
        AgentMetrics(registry, "c1", node),
        cgroup_reader=reader or cgroup_reader(scenario),
        wall_clock=clock,
    )
    return sampler, registry


def _small() -> Scenario:
    """One node, two whole H100s; on GPU A a busy process and a resident but idle one."""
    a, b = GpuSpec("GPU-aaaa", H100_80GB), GpuSpec("GPU-bbbb", H100_80GB)
    return Scenario(
        cluster="c1",
        start_unix_s=START,
        nodes=(NodeSpec("n1", (a, b)),),
        processes=(
            ProcessSpec(100, a.uuid, POD_A, CID, 0, None, 10 * GIB, 50.0),
            ProcessSpec(200, a.uuid, POD_B, CID, 0, None, 5 * GIB, 40.0, idle_gaps=((0, 1e9),)),
        ),
    )


def _by_uuid(events: list) -> dict[str, GpuSample]:  # type: ignore[type-arg]
    return {e.data.device_uuid: e.data for e in events}


def test_one_event_per_device_with_pod_attribution_and_stable_ids() -> None:
    clock = SimClock(START + 10)
    sampler, registry = _sampler(_small(), "n1", clock)
    events = sampler.sample()
    assert [e.id for e in events] == [
        f"GPU-aaaa:{int((START + 10) * 1000)}",
        f"GPU-bbbb:{int((START + 10) * 1000)}",
    ]
    assert all(e.time_ms == int((START + 10) * 1000) for e in events)
    a = _by_uuid(events)["GPU-aaaa"]
    assert a.gpu_model == "NVIDIA H100 80GB HBM3"
    assert a.mig_profile is None and a.mig_slices is None and a.gpu_slices == 7
    assert a.node_labels == {"zone": "a"}
    procs = {p.pid: p for p in a.processes}
    assert procs[100].pod_uid == POD_A and procs[100].container_id == CID
    assert procs[100].mem_used_bytes == 10 * GIB
    assert procs[100].sm_util_pct is not None and procs[100].sm_util_pct > 0
    # resident but idle: NVML has no sample for it, which means 0 %, not unknown
    assert procs[200].sm_util_pct == 0.0
    assert (
        registry.get_sample_value("gpuledger_agent_samples_total", {"cluster": "c1", "node": "n1"})
        == 2
    )
    assert registry.get_sample_value(
        "gpuledger_agent_last_sample_timestamp_seconds", {"cluster": "c1", "node": "n1"}
    ) == pytest.approx(START + 10)
    for event in events:
        decoded = decode_event(encode_event(event))
        assert isinstance(decoded, Ok), decoded
        assert decoded.event.data == event.data


def test_interval_is_the_real_elapsed_time_per_device() -> None:
    clock = SimClock(START + 10)
    sampler, _ = _sampler(_small(), "n1", clock)
    first = sampler.sample()
    assert {e.data.interval_s for e in first} == {1.0}  # no previous sample: the nominal interval
    clock.advance(1.3)
    second = sampler.sample()
    assert [e.data.interval_s for e in second] == [pytest.approx(1.3)] * 2
    clock.advance(0.7)
    assert [e.data.interval_s for e in sampler.sample()] == [pytest.approx(0.7)] * 2


def test_no_new_utilisation_samples_means_zero_for_every_process() -> None:
    idle = _small()
    idle = Scenario(
        idle.cluster,
        idle.start_unix_s,
        idle.nodes,
        processes=tuple(
            ProcessSpec(
                p.pid,
                p.device_uuid,
                p.pod_uid,
                p.container_id,
                0,
                None,
                p.mem_used_bytes,
                p.sm_util_pct,
                idle_gaps=((0, 1e9),),
            )
            for p in idle.processes
        ),
    )
    clock = SimClock(START + 10)
    sampler, registry = _sampler(idle, "n1", clock)
    a = _by_uuid(sampler.sample())["GPU-aaaa"]
    assert [p.sm_util_pct for p in a.processes] == [0.0, 0.0]
    # NOT_FOUND is NVML's normal answer for an idle device, not an error worth alerting on
    assert (
        registry.get_sample_value(
            "gpuledger_agent_nvml_errors_total",
            {
                "cluster": "c1",
                "node": "n1",
                "call": "nvmlDeviceGetProcessesUtilizationInfo",
                "error": "NotFound",
            },
        )
        is None
    )


def test_mig_instances_carry_profile_slices_and_null_process_utilisation() -> None:
    scenario = demo_scenario(START)
    clock = SimClock(START + 300)
    sampler, registry = _sampler(scenario, "gpu-node-1", clock)
    events = sampler.sample()
    migs = [e.data for e in events if e.data.mig_profile is not None]
    assert [(m.mig_profile, m.mig_slices, m.gpu_slices) for m in migs] == [
        ("3g.40gb", 3, 7),
        ("2g.20gb", 2, 7),
        ("1g.10gb", 1, 7),
        ("1g.10gb", 1, 7),
    ]
    parent = scenario.nodes[0].gpus[0].uuid
    assert all(m.gpu_uuid == parent and m.device_uuid.startswith("MIG-") for m in migs)
    assert all(m.sm_util_pct is None for m in migs)
    busy = migs[0]
    assert busy.processes and all(p.sm_util_pct is None for p in busy.processes)
    assert busy.processes[0].pod_uid is not None  # CRI-O layout in this scenario
    assert busy.mem_total_bytes == 40_000 * (1 << 20)
    assert (
        registry.get_sample_value(
            "gpuledger_agent_process_util_unsupported",
            {"cluster": "c1", "node": "gpu-node-1", "device_uuid": busy.device_uuid},
        )
        == 1
    )
    assert len(events) == 7  # 4 MIG instances + 3 whole GPUs; the MIG parent itself is not one


def test_older_driver_falls_back_to_the_legacy_utilisation_call() -> None:
    clock = SimClock(START + 300)
    sampler, registry = _sampler(demo_scenario(START), "gpu-node-2", clock)
    events = sampler.sample()
    busy = [p for e in events for p in e.data.processes if p.sm_util_pct]
    assert busy, "utilisation must still be read through nvmlDeviceGetProcessUtilization"
    assert (
        registry.get_sample_value(
            "gpuledger_agent_nvml_errors_total",
            {
                "cluster": "c1",
                "node": "gpu-node-2",
                "call": "nvmlDeviceGetProcessesUtilizationInfo",
                "error": "FunctionNotFound",
            },
        )
        == 1
    )  # tried once, then never again
    sampler.sample()
    assert (
        registry.get_sample_value(
            "gpuledger_agent_nvml_errors_total",
            {
                "cluster": "c1",
                "node": "gpu-node-2",
                "call": "nvmlDeviceGetProcessesUtilizationInfo",
                "error": "FunctionNotFound",
            },
        )
        == 1
    )


def test_older_gpu_without_per_process_utilisation_reports_null() -> None:
    old = GpuSpec("GPU-old", H100_80GB, process_util_supported=False)
    scenario = Scenario(
        "c1",
        START,
        (NodeSpec("n1", (old,)),),
        processes=(ProcessSpec(100, old.uuid, POD_A, CID, 0, None, GIB, 50.0),),
    )
    sampler, registry = _sampler(scenario, "n1", SimClock(START + 5))
    sample = sampler.sample()[0].data
    assert sample.processes[0].sm_util_pct is None
    assert sample.sm_util_pct is not None  # the device-level figure is still there
    assert (
        registry.get_sample_value(
            "gpuledger_agent_process_util_unsupported",
            {"cluster": "c1", "node": "n1", "device_uuid": "GPU-old"},
        )
        == 1
    )


def test_a_lost_gpu_is_skipped_and_found_again_after_it_recovers() -> None:
    base = _small()
    scenario = Scenario(
        base.cluster,
        base.start_unix_s,
        base.nodes,
        processes=base.processes,
        faults=(
            FaultSpec("n1", pynvml.NVML_ERROR_GPU_IS_LOST, 20.0, 40.0, device_uuid="GPU-aaaa"),
        ),
    )
    clock = SimClock(START + 10)
    sampler, registry = _sampler(scenario, "n1", clock)
    assert len(sampler.sample()) == 2
    clock.now_s = START + 21
    assert [e.data.device_uuid for e in sampler.sample()] == ["GPU-bbbb"]
    assert (
        registry.get_sample_value(
            "gpuledger_agent_devices_lost_total",
            {"cluster": "c1", "node": "n1", "device_uuid": "GPU-aaaa"},
        )
        == 1
    )
    clock.now_s = START + 25
    assert [e.data.device_uuid for e in sampler.sample()] == ["GPU-bbbb"]  # still lost
    for second in range(41, 60):
        clock.now_s = START + second
        events = sampler.sample()
    uuids = [e.data.device_uuid for e in events]
    assert uuids == ["GPU-aaaa", "GPU-bbbb"]
    back = _by_uuid(events)["GPU-aaaa"]
    assert back.interval_s == 1.0  # the gap while lost is not billed as one long sample


def test_a_lost_gpu_leaves_the_per_device_gauges_and_keeps_its_loss_count() -> None:
    old = GpuSpec("GPU-old", H100_80GB, process_util_supported=False)
    scenario = Scenario(
        "c1",
        START,
        (NodeSpec("n1", (old,)),),
        processes=(ProcessSpec(100, old.uuid, POD_A, CID, 0, None, GIB, 50.0),),
        faults=(FaultSpec("n1", pynvml.NVML_ERROR_GPU_IS_LOST, 20.0, 1e9, device_uuid=old.uuid),),
    )
    clock = SimClock(START + 5)
    sampler, registry = _sampler(scenario, "n1", clock)
    sampler.sample()
    labels = {"cluster": "c1", "node": "n1", "device_uuid": "GPU-old"}
    assert registry.get_sample_value("gpuledger_agent_process_util_unsupported", labels) == 1
    clock.now_s = START + 21
    assert sampler.sample() == []
    assert registry.get_sample_value("gpuledger_agent_process_util_unsupported", labels) is None
    assert registry.get_sample_value("gpuledger_agent_devices_lost_total", labels) == 1


def test_driver_restart_reinitialises_with_backoff_and_resumes() -> None:
    base = _small()
    scenario = Scenario(
        base.cluster,
        base.start_unix_s,
        base.nodes,
        processes=base.processes,
        faults=(FaultSpec("n1", pynvml.NVML_ERROR_DRIVER_NOT_LOADED, 20.0, 26.0),),
    )
    clock = SimClock(START + 10)
    sampler, registry = _sampler(scenario, "n1", clock)
    assert len(sampler.sample()) == 2
    labels = {"cluster": "c1", "node": "n1"}
    passes = []
    for second in range(20, 40):
        clock.now_s = START + second
        passes.append((second, len(sampler.sample()), sampler.healthy))
    down = [s for s, n, _ in passes if n == 0]
    assert down[0] == 20 and max(down) >= 25
    assert all(n == 2 for s, n, _ in passes if s >= 32)
    failed = registry.get_sample_value(
        "gpuledger_agent_nvml_reinit_total", {**labels, "result": "failed"}
    )
    ok = registry.get_sample_value("gpuledger_agent_nvml_reinit_total", {**labels, "result": "ok"})
    assert failed is not None and 1 <= failed <= 4  # backoff: not one attempt per pass
    assert ok == 2  # the first init and the one after the restart


def test_a_process_that_exits_between_calls_has_no_pod_and_is_counted() -> None:
    clock = SimClock(START + 10)
    calls: list[int] = []
    scenario = _small()

    def reader(pid: int) -> str | None:
        calls.append(pid)
        if pid == 200:
            return None  # /proc/200 is gone by the time we look
        process = scenario.process(pid)
        assert process is not None
        return cgroup_text(process)

    sampler, registry = _sampler(scenario, "n1", clock, reader)
    a = _by_uuid(sampler.sample())["GPU-aaaa"]
    procs = {p.pid: p for p in a.processes}
    assert procs[200].pod_uid is None
    assert procs[100].pod_uid == POD_A
    assert (
        registry.get_sample_value(
            "gpuledger_agent_pid_unresolved_total", {"cluster": "c1", "node": "n1"}
        )
        == 1
    )
    clock.advance(1)
    sampler.sample()
    assert calls.count(100) == 1  # resolved pids are cached while they keep running
    assert calls.count(200) == 2  # unresolved ones are tried again


def test_processes_coming_and_going_over_time() -> None:
    scenario = demo_scenario(START)
    clock = SimClock(START)
    sampler, _ = _sampler(scenario, "gpu-node-3", clock)
    seen: dict[float, int] = {}
    for t in (100.0, 500.0, 1300.0):  # jobs on this GPU: [60, 480), [1260, 1680)
        clock.now_s = START + t
        gpu2 = _by_uuid(sampler.sample())[scenario.nodes[2].gpus[2].uuid]
        seen[t] = len(gpu2.processes)
    assert seen == {100.0: 1, 500.0: 0, 1300.0: 1}

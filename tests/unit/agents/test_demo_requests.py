"""The demo cluster's GPU requests and capacity: every pod requests one unit of each device it
runs on (a whole GPU, one replica of a time-sliced one, or its MIG profile), one pod requests a
whole GPU it barely uses, and the nodes advertise what their device plugins would; the
simulated API serves both to the real watcher."""

from __future__ import annotations

import asyncio
from collections import Counter

from prometheus_client import CollectorRegistry

from agents.demo_nodes import demo_nodes
from agents.demo_scenario import demo_scenario
from agents.kube_client import KubeClient, KubeSettings
from agents.metrics import PodsMetrics
from agents.node_state import NodeEmission, NodeState
from agents.pod_state import PodEmission, PodState
from agents.pod_watcher import PodWatcher
from agents.scenario import Scenario, SimClock
from gpuledger.demo.cluster_api import SimulatedClusterApi

START = 1_795_000_000.0


def devices_of(scenario: Scenario) -> dict[str, str]:
    """Device uuid -> the resource that names it: `nvidia.com/gpu` or `nvidia.com/mig-<p>`."""
    out = {}
    for node in scenario.nodes:
        for gpu in node.gpus:
            out[gpu.uuid] = "nvidia.com/gpu"
            for mig in gpu.mig_instances:
                out[mig.uuid] = f"nvidia.com/mig-{mig.profile}"
    return out


def test_every_pod_requests_one_unit_of_each_device_it_runs_on() -> None:
    scenario = demo_scenario(START)
    resource = devices_of(scenario)
    for pod in scenario.pods:
        used = Counter(resource[p.device_uuid] for p in scenario.processes if p.pod_uid == pod.uid)
        assert dict(pod.gpu_requests) == dict(used), pod.name
    by_name = {p.name: p for p in scenario.pods}
    assert by_name["qwen-vllm-0"].gpu_requests == {"nvidia.com/gpu": 2}
    assert by_name["mistral-sglang-0"].gpu_requests == {"nvidia.com/mig-3g.40gb": 1}
    assert by_name["ranker-triton-0"].gpu_requests == {"nvidia.com/mig-2g.20gb": 1}
    assert by_name["notebook-alice"].gpu_requests == {"nvidia.com/mig-1g.10gb": 1}
    assert by_name["llama-vllm-1"].gpu_requests == {"nvidia.com/mig-3g.40gb": 1}


def test_one_pod_holds_a_whole_gpu_it_barely_uses() -> None:
    scenario = demo_scenario(START)
    (pod,) = [p for p in scenario.pods if p.name == "debug-shell"]
    assert pod.gpu_requests == {"nvidia.com/gpu": 1} and pod.node == "gpu-node-2"
    (process,) = [p for p in scenario.processes if p.pod_uid == pod.uid]
    assert process.sm_util_pct <= 3 and process.mem_used_bytes <= 2 * 2**30
    others = [p for p in scenario.processes if p.device_uuid == process.device_uuid]
    assert others == [process]  # alone on its GPU: usage-based cost leaves the rest idle


def test_the_nodes_advertise_their_gpus_time_sliced_and_mig_devices() -> None:
    nodes = demo_nodes()
    assert [dict(n.gpu_capacity) for n in nodes] == [
        {
            "nvidia.com/gpu": 3,
            "nvidia.com/mig-1g.10gb": 2,
            "nvidia.com/mig-2g.20gb": 1,
            "nvidia.com/mig-3g.40gb": 1,
        },
        {"nvidia.com/gpu": 3, "nvidia.com/mig-2g.20gb": 2, "nvidia.com/mig-3g.40gb": 1},
        {"nvidia.com/gpu": 16},  # 4 L40S, time-sliced into 4 replicas each
    ]
    assert [n.gpus for n in nodes] == [3, 3, 16]  # capacity nvidia.com/gpu, as Kubernetes says
    scenario = demo_scenario(START)
    assert [n.gpu_replicas for n in scenario.nodes] == [1, 1, 4]
    time_sliced = [p for p in scenario.pods if p.node == "gpu-node-3"]
    assert time_sliced and all(p.gpu_requests == {"nvidia.com/gpu": 1} for p in time_sliced)


async def test_the_simulated_api_serves_requests_and_capacity_to_the_real_watcher() -> None:
    scenario = demo_scenario(START)
    api = SimulatedClusterApi(scenario, SimClock(START))
    await api.start()
    await api.advance(0.0)
    client = KubeClient(KubeSettings(server=api.url))
    await client.start()
    pods: list[PodEmission] = []
    nodes: list[NodeEmission] = []
    watcher = PodWatcher(
        client,
        PodState("demo"),
        pods.append,
        PodsMetrics(CollectorRegistry(), "demo"),
        nodes=NodeState("demo"),
        emit_node=nodes.append,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    live = scenario.pods_at(0.0)
    try:
        for _ in range(250):
            if len(nodes) >= 3 and len(pods) >= len(live):
                break
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await client.close()
        await api.stop()
    assert {e.info.uid: dict(e.info.gpu_requests) for e in pods} == {
        p.uid: dict(p.gpu_requests) for p in live
    }
    assert [(e.info.node, dict(e.info.gpu_capacity), e.info.gpus) for e in nodes] == [
        (n.name, dict(n.gpu_capacity), n.gpus) for n in demo_nodes()
    ]

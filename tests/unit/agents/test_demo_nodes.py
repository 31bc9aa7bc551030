"""The demo cluster's nodes: AWS identities and instance types that fit their GPUs, the same on
every call, and served by the simulated Kubernetes API so that the real pod watcher publishes
exactly `demo_nodes()`."""

from __future__ import annotations

import asyncio
import re

from prometheus_client import CollectorRegistry

from agents.demo_nodes import AWS_INSTANCE_TYPES, DemoNode, demo_nodes
from agents.demo_scenario import demo_scenario
from agents.kube_client import KubeClient, KubeSettings
from agents.metrics import PodsMetrics
from agents.node_state import NodeEmission, NodeState
from agents.pod_state import PodState
from agents.pod_watcher import PodWatcher
from agents.scenario import SimClock
from gpuledger.demo.cluster_api import SimulatedClusterApi

START = 1_795_000_000.0


def test_the_demo_nodes_are_aws_instances_that_fit_the_scenarios_gpus() -> None:
    nodes = demo_nodes()
    scenario = demo_scenario(START)
    assert [n.name for n in nodes] == [spec.name for spec in scenario.nodes]
    assert nodes == demo_nodes()  # deterministic
    assert len({n.provider_id for n in nodes}) == len(nodes)
    for node, spec in zip(nodes, scenario.nodes, strict=True):
        assert isinstance(node, DemoNode)
        assert re.fullmatch(r"aws:///us-east-1[a-f]/i-[0-9a-f]{17}", node.provider_id), node
        assert node.provider_id == f"aws:///{node.zone}/{node.instance_id}"
        kind = AWS_INSTANCE_TYPES[node.instance_type]
        assert node.instance_type == spec.labels["node.kubernetes.io/instance-type"]
        assert (
            node.zone == spec.labels["topology.kubernetes.io/zone"] and node.region == "us-east-1"
        )
        assert {g.model.name for g in spec.gpus} == {kind.gpu_model}
        assert kind.gpus >= len(spec.gpus)  # the provider bills the instance's GPUs
        assert node.gpus == node.gpu_capacity["nvidia.com/gpu"]  # the device plugin's count
        assert node.cpu_millicores == kind.vcpus * 1000
        assert node.memory_bytes == kind.memory_gib * 2**30
    assert [n.instance_type for n in nodes] == ["p5.48xlarge", "p4de.24xlarge", "g6e.12xlarge"]
    assert [AWS_INSTANCE_TYPES[n.instance_type].gpus for n in nodes] == [8, 8, 4]
    assert [n.gpus for n in nodes] == [3, 3, 16]  # 3 whole GPUs beside a MIG one; time-sliced x4


async def test_the_simulated_api_serves_them_to_the_real_watcher() -> None:
    scenario = demo_scenario(START)
    api = SimulatedClusterApi(scenario, SimClock(START))
    await api.start()
    client = KubeClient(KubeSettings(server=api.url))
    await client.start()
    seen: list[NodeEmission] = []
    watcher = PodWatcher(
        client,
        PodState("demo"),
        lambda _: None,
        PodsMetrics(CollectorRegistry(), "demo"),
        nodes=NodeState("demo"),
        emit_node=seen.append,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    try:
        for _ in range(200):
            if len(seen) >= 3:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # the watch starts, and brings nothing new
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await client.close()
        await api.stop()
    published = [
        (e.info.node, e.info.provider_id, e.info.instance_type, e.info.gpus, e.info.cpu_millicores)
        for e in seen
    ]
    assert published == [
        (n.name, n.provider_id, n.instance_type, n.gpus, n.cpu_millicores) for n in demo_nodes()
    ]
    assert [e.info.memory_bytes for e in seen] == [n.memory_bytes for n in demo_nodes()]
    assert all(e.kind == "added" and e.time_ms == int(START * 1000) for e in seen)

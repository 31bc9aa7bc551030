"""The demo cluster's nodes as the cloud provider knows them: AWS instance identity (providerID,
instance type, zone) and the instance type's capacity, derived from the demo scenario.

The simulated Kubernetes API serves these as Node objects, so the pod watcher publishes them as
any cluster's nodes; `demo_nodes()` gives the same values to whoever builds a provider bill for
exactly these instances. Deterministic: the same names give the same instance ids.

Their GPU capacity is what the NVIDIA device plugin would advertise for the GPUs the scenario
runs, with the MIG "mixed" strategy: `nvidia.com/gpu` counts the whole GPUs (times the
time-slicing replicas), `nvidia.com/mig-<profile>` the MIG instances of each profile.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from agents.demo_scenario import demo_scenario
from agents.scenario import NodeSpec, Scenario

GIB = 2**30
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
ZONE_LABEL = "topology.kubernetes.io/zone"
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True, slots=True)
class InstanceType:
    """An EC2 instance type's accelerators and size, as AWS lists them."""

    name: str
    gpu_model: str  # as NVML names it
    gpus: int
    vcpus: int
    memory_gib: int


# The GPU instance types the demo's nodes can be (AWS's published figures).
AWS_INSTANCE_TYPES = {
    t.name: t
    for t in (
        InstanceType("p5.48xlarge", "NVIDIA H100 80GB HBM3", 8, 192, 2048),
        InstanceType("p4de.24xlarge", "NVIDIA A100-SXM4-80GB", 8, 96, 1152),
        InstanceType("p4d.24xlarge", "NVIDIA A100-SXM4-40GB", 8, 96, 1152),
        InstanceType("g6e.xlarge", "NVIDIA L40S", 1, 4, 32),
        InstanceType("g6e.12xlarge", "NVIDIA L40S", 4, 48, 384),
        InstanceType("g6e.24xlarge", "NVIDIA L40S", 4, 96, 768),
        InstanceType("g6e.48xlarge", "NVIDIA L40S", 8, 192, 1536),
    )
}


@dataclass(frozen=True, slots=True)
class DemoNode:
    """One node of the demo cluster, as its Node object and the provider's bill name it."""

    name: str
    provider_id: str  # aws:///<zone>/<instance id>
    instance_type: str
    zone: str
    gpus: int  # status.capacity nvidia.com/gpu: whole GPUs x time-slicing replicas
    cpu_millicores: int
    memory_bytes: int
    gpu_capacity: Mapping[str, int]  # status.capacity of every nvidia.com/ resource

    @property
    def instance_id(self) -> str:
        return self.provider_id.rsplit("/", 1)[-1]

    @property
    def region(self) -> str:
        """The zone's region: us-east-1a is in us-east-1."""
        return self.zone.rstrip("abcdefghijklmnopqrstuvwxyz")


def instance_id(cluster: str, node: str) -> str:
    """An EC2 instance id (`i-` and 17 hex digits), the same for the same cluster and node."""
    return "i-" + hashlib.sha256(f"{cluster}/{node}".encode()).hexdigest()[:17]


def demo_nodes() -> tuple[DemoNode, ...]:
    """The demo scenario's nodes, in its order, with the CPU and memory of their instance types.

    The scenario models four GPUs of each node; the instance types are the real ones for those
    GPUs (AWS sells H100 and A100 only eight to an instance), so the provider bills eight GPUs
    of the H100 and A100 nodes while the device plugin advertises, and the agents meter, the 4
    the scenario runs."""
    return cloud_nodes(demo_scenario(0.0))


def cloud_nodes(scenario: Scenario) -> tuple[DemoNode, ...]:
    """A scenario's nodes as AWS instances: the type its instance-type label names (one of
    AWS_INSTANCE_TYPES) in the zone its zone label names."""
    nodes = []
    for spec in scenario.nodes:
        kind = AWS_INSTANCE_TYPES[spec.labels[INSTANCE_TYPE_LABEL]]
        zone = spec.labels[ZONE_LABEL]
        capacity = gpu_capacity(spec)
        nodes.append(
            DemoNode(
                name=spec.name,
                provider_id=f"aws:///{zone}/{instance_id(scenario.cluster, spec.name)}",
                instance_type=kind.name,
                zone=zone,
                gpus=capacity.get(GPU_RESOURCE, 0),
                cpu_millicores=kind.vcpus * 1000,
                memory_bytes=kind.memory_gib * GIB,
                gpu_capacity=capacity,
            )
        )
    return tuple(nodes)


def gpu_capacity(spec: NodeSpec) -> dict[str, int]:
    """What the device plugin advertises for a node's GPUs (MIG "mixed" strategy): its whole
    GPUs times the time-slicing replicas as `nvidia.com/gpu`, and each MIG profile's instances
    as `nvidia.com/mig-<profile>`; a resource with none is not listed."""
    capacity: dict[str, int] = {}
    whole = sum(1 for gpu in spec.gpus if not gpu.mig_instances)
    if whole:
        capacity[GPU_RESOURCE] = whole * spec.gpu_replicas
    for gpu in spec.gpus:
        for mig in gpu.mig_instances:
            name = f"nvidia.com/mig-{mig.profile}"
            capacity[name] = capacity.get(name, 0) + 1
    return dict(sorted(capacity.items()))

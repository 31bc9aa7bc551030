"""Built-in scenarios: the demo cluster (`gpuledger demo`, `gpuledger agent --fake-nvml`) and
the eight-GPU node of the agent's overhead benchmark. Deterministic: the same start time gives the
same cluster, uuids and counters.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable

from pynvml import NVML_ERROR_DRIVER_NOT_LOADED, NVML_ERROR_GPU_IS_LOST

from agents.scenario import (
    A100_80GB,
    GIB,
    H100_80GB,
    L40S,
    FaultSpec,
    GpuModel,
    GpuSpec,
    InferenceSpec,
    MigInstanceSpec,
    NamespaceSpec,
    NodeSpec,
    PodSpec,
    ProcessSpec,
    Scenario,
)

_NS = uuid.UUID("6f1c2b1e-8f0a-4c53-9a52-3f4f6d0c9a11")


def _uuid(*parts: object) -> str:
    return str(uuid.uuid5(_NS, "/".join(str(p) for p in parts)))


def _container_id(*parts: object) -> str:
    return hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()


def _gpu(node: str, index: int, model: GpuModel, mig: tuple[str, ...] = ()) -> GpuSpec:
    instances = tuple(
        MigInstanceSpec(f"MIG-{_uuid(node, index, 'mig', slot)}", profile, gpu_instance_id=slot + 1)
        for slot, profile in enumerate(mig)
    )
    return GpuSpec(f"GPU-{_uuid(node, index)}", model, instances)


def _labels(instance_type: str, capacity: str, zone: str) -> dict[str, str]:
    return {
        "node.kubernetes.io/instance-type": instance_type,
        "karpenter.sh/capacity-type": capacity,
        "topology.kubernetes.io/zone": zone,
    }


NAMESPACES = (
    NamespaceSpec("search", {"team": "search", "product": "web-search", "cost-center": "cc-100"}),
    NamespaceSpec("recsys", {"team": "recsys", "product": "feed", "cost-center": "cc-200"}),
    NamespaceSpec(
        "assistant", {"team": "assistant", "product": "chatbot", "cost-center": "cc-300"}
    ),
    NamespaceSpec("research", {"team": "research", "cost-center": "cc-400"}),
    NamespaceSpec("sandbox", {}),  # untagged: its cost shows up as __untagged__
)


def demo_scenario(start_unix_s: float, duration_s: float = 3600.0) -> Scenario:
    """Three nodes, 17 devices (H100 with MIG, A100 spot with MIG, L40S time-sliced), five
    namespaces (four teams, one untagged), inference pods serving five models on vLLM, SGLang,
    TGI and Triton, batch jobs coming and going, idle gaps, a host process and one vLLM restart
    (counter reset). Every pod requests one unit of each device it runs on (`nvidia.com/gpu`, or
    `nvidia.com/mig-<profile>`); one holds a whole GPU it barely uses.
    """
    n1, n2, n3 = "gpu-node-1", "gpu-node-2", "gpu-node-3"
    nodes = (
        NodeSpec(
            n1,
            (
                _gpu(n1, 0, H100_80GB, ("3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb")),
                _gpu(n1, 1, H100_80GB),
                _gpu(n1, 2, H100_80GB),
                _gpu(n1, 3, H100_80GB),
            ),
            _labels("p5.48xlarge", "on-demand", "us-east-1a"),
        ),
        NodeSpec(
            n2,
            (
                _gpu(n2, 0, A100_80GB),
                _gpu(n2, 1, A100_80GB),
                _gpu(n2, 2, A100_80GB),
                _gpu(n2, 3, A100_80GB, ("3g.40gb", "2g.20gb", "2g.20gb")),
            ),
            _labels("p4de.24xlarge", "spot", "us-east-1b"),
            has_utilization_info_api=False,  # an older driver: the legacy per-process call
        ),
        NodeSpec(
            n3,
            tuple(_gpu(n3, i, L40S) for i in range(4)),
            _labels("g6e.12xlarge", "on-demand", "us-east-1a"),
            gpu_replicas=4,  # time-sliced: 16 nvidia.com/gpu, each pod asks for one replica
        ),
    )
    gpu = {(n.name, i): g for n in nodes for i, g in enumerate(n.gpus)}
    # The extended resource a pod requests to run on a device (MIG "mixed" strategy).
    resource_of = {g.uuid: "nvidia.com/gpu" for n in nodes for g in n.gpus}
    resource_of.update(
        {
            m.uuid: f"nvidia.com/mig-{m.profile}"
            for n in nodes
            for g in n.gpus
            for m in g.mig_instances
        }
    )
    pods: list[PodSpec] = []
    procs: list[ProcessSpec] = []
    next_pid = [4100]
    next_ip = [10]

    def pod(
        ns: str,
        name: str,
        node: str,
        devices: list[str],
        *,
        mem_gib: float,
        util: float,
        start: float = 0.0,
        end: float | None = None,
        labels: dict[str, str] | None = None,
        inference: InferenceSpec | None = None,
        idle: tuple[tuple[float, float], ...] = (),
        style: str = "systemd-containerd",
    ) -> None:
        uid = _uuid("pod", ns, name, start)
        next_ip[0] += 1
        requests: dict[str, int] = {}
        for device in devices:  # one unit of each device it runs on
            requests[resource_of[device]] = requests.get(resource_of[device], 0) + 1
        pods.append(
            PodSpec(
                uid,
                ns,
                name,
                node,
                start,
                end,
                labels or {},
                f"10.42.0.{next_ip[0]}",
                inference,
                requests,
            )
        )
        cid = _container_id(uid)
        for device in devices:
            next_pid[0] += 17
            procs.append(
                ProcessSpec(
                    next_pid[0],
                    device,
                    uid,
                    cid,
                    start + 2.0,
                    end,
                    int(mem_gib * GIB),
                    util,
                    idle,
                    style,
                )
            )

    def mig(node: str, index: int, slot: int) -> str:
        return gpu[(node, index)].mig_instances[slot].uuid

    def whole(node: str, index: int) -> str:
        return gpu[(node, index)].uuid

    llama = "meta-llama/Llama-3.1-8B-Instruct"
    qwen = "Qwen/Qwen2.5-72B-Instruct"
    mistral = "mistralai/Mistral-7B-Instruct-v0.3"
    gemma = "google/gemma-2-9b-it"
    ranker = "bert-reranker"
    app = {"app.kubernetes.io/component": "inference"}
    pod(
        "search",
        "llama-vllm-0",
        n1,
        [whole(n1, 1)],
        mem_gib=70,
        util=65,
        labels=app,
        inference=InferenceSpec(
            "vllm", llama, 8000, 2400, 600, 3.0, 0.35, restart_at_s=duration_s / 2
        ),
    )
    pod(
        "assistant",
        "qwen-vllm-0",
        n1,
        [whole(n1, 2), whole(n1, 3)],
        mem_gib=74,
        util=80,
        labels={**app, "team": "assistant"},
        inference=InferenceSpec("vllm", qwen, 8000, 1800, 450, 1.5, 0.5),
    )
    pod(
        "recsys",
        "mistral-sglang-0",
        n1,
        [mig(n1, 0, 0)],
        mem_gib=30,
        util=50,
        labels=app,
        inference=InferenceSpec("sglang", mistral, 30000, 1500, 300, 2.0, 0.2),
        style="systemd-crio",
    )
    pod(
        "recsys",
        "ranker-triton-0",
        n1,
        [mig(n1, 0, 1)],
        mem_gib=12,
        util=30,
        inference=InferenceSpec("triton", ranker, 8002, 0, 0, 40.0),
        style="systemd-crio",
    )
    pod(
        "sandbox",
        "notebook-alice",
        n1,
        [mig(n1, 0, 2)],
        mem_gib=6,
        util=20,
        idle=((60.0, 900.0), (1500.0, 2400.0)),
    )
    # mig(n1, 0, 3) stays empty: idle burn
    pod(
        "search",
        "gemma-tgi-0",
        n2,
        [whole(n2, 0)],
        mem_gib=40,
        util=55,
        labels=app,
        inference=InferenceSpec("tgi", gemma, 80, 900, 250, 1.2),
        style="cgroupfs-v2",
    )
    pod(
        "research",
        "eval-harness",
        n2,
        [whole(n2, 1)],
        mem_gib=60,
        util=90,
        labels={"team": "research", "product": "llm-eval"},
        style="cgroupfs-v2",
    )
    pod(
        "assistant",
        "llama-vllm-1",
        n2,
        [mig(n2, 3, 0)],
        mem_gib=35,
        util=60,
        labels=app,
        inference=InferenceSpec("vllm", llama, 8000, 1200, 300, 1.5, 0.4),
        style="cgroupfs-v1",
    )
    # A whole GPU held for a debugging shell that barely touches it: request-based allocation
    # charges research the whole device, usage-based allocation leaves most of it idle.
    pod(
        "research",
        "debug-shell",
        n2,
        [whole(n2, 2)],
        mem_gib=1.5,
        util=2,
        labels={"team": "research", "product": "llm-eval"},
        style="cgroupfs-v2",
    )
    # MIG slots 1-2 of n2 GPU 3: idle burn on spot capacity
    pod(
        "recsys",
        "mistral-sglang-1",
        n3,
        [whole(n3, 0)],
        mem_gib=38,
        util=45,
        labels=app,
        inference=InferenceSpec("sglang", mistral, 30000, 1300, 260, 1.8, 0.25),
    )
    pod(
        "sandbox",
        "finetune-bob",
        n3,
        [whole(n3, 1)],
        mem_gib=20,
        util=70,
        style="systemd-guaranteed",
    )
    # Batch jobs of the research team come and go on n3 GPU 2 and 3.
    job_s, gap_s, k = 420.0, 180.0, 0
    start = 60.0
    while start < duration_s:
        device = whole(n3, 2 + k % 2)
        pod(
            "research",
            f"batch-train-{k}",
            n3,
            [device],
            mem_gib=30 + 5 * (k % 3),
            util=85,
            start=start,
            end=start + job_s,
            labels={"team": "research", "product": "llm-eval"},
        )
        start += job_s + gap_s
        k += 1
    # A stray process outside any pod (host monitoring left running by an operator).
    procs.append(ProcessSpec(999, whole(n3, 3), None, None, 0.0, None, 300 << 20, 1.0))
    return Scenario(
        cluster="demo",
        start_unix_s=start_unix_s,
        nodes=nodes,
        namespaces=NAMESPACES,
        pods=tuple(pods),
        processes=tuple(procs),
    )


def bench_scenario(start_unix_s: float, gpus: int = 8) -> Scenario:
    """One node with `gpus` whole H100s, each running two pod processes: the agent's overhead
    benchmark (8 GPUs sampled every second)."""
    node = "bench-node"
    specs = tuple(_gpu(node, i, H100_80GB) for i in range(gpus))
    pods, procs = [], []
    for i, g in enumerate(specs):
        for j in range(2):
            uid = _uuid("bench", i, j)
            pods.append(PodSpec(uid, "bench", f"server-{i}-{j}", node, 0.0, None))
            procs.append(
                ProcessSpec(
                    5000 + 10 * i + j,
                    g.uuid,
                    uid,
                    _container_id(uid),
                    0.0,
                    None,
                    20 * GIB,
                    30.0 + 10 * j,
                )
            )
    return Scenario(
        cluster="bench",
        start_unix_s=start_unix_s,
        nodes=(NodeSpec(node, specs, _labels("p5.48xlarge", "on-demand", "us-east-1a")),),
        namespaces=(NamespaceSpec("bench", {"team": "bench"}),),
        pods=tuple(pods),
        processes=tuple(procs),
    )


def faults_scenario(start_unix_s: float) -> Scenario:
    """The demo cluster with NVML trouble on gpu-node-1: one GPU lost for a minute from t=30 s,
    and a driver restart (every call failing, init refused) from t=90 s to t=100 s."""
    base = demo_scenario(start_unix_s)
    lost = base.nodes[0].gpus[1].uuid
    faults = (
        FaultSpec("gpu-node-1", NVML_ERROR_GPU_IS_LOST, 30.0, 90.0, device_uuid=lost),
        FaultSpec("gpu-node-1", NVML_ERROR_DRIVER_NOT_LOADED, 90.0, 100.0),
    )
    return Scenario(
        base.cluster,
        base.start_unix_s,
        base.nodes,
        base.namespaces,
        base.pods,
        base.processes,
        faults,
    )


SCENARIOS: dict[str, Callable[[float], Scenario]] = {
    "demo": demo_scenario,
    "bench": bench_scenario,
    "faults": faults_scenario,
}

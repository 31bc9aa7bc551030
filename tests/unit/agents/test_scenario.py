"""The built-in demo scenario is rich enough for `gpuledger demo`, and its views agree."""

from __future__ import annotations

from agents.demo_scenario import SCENARIOS, bench_scenario, demo_scenario
from agents.scenario import SimClock
from agents.scenario_views import metrics_page, pod_infos
from agents.token_counters import parse_totals

START = 1_800_000_000.0


def test_demo_cluster_size_and_variety() -> None:
    s = demo_scenario(START)
    assert len(s.nodes) >= 3
    assert s.device_count() >= 12
    assert any(g.mig_enabled for n in s.nodes for g in n.gpus)
    models = {g.model.name for n in s.nodes for g in n.gpus}
    assert models == {"NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA L40S"}
    infos = pod_infos(s, 100.0)
    teams = {i.labels.get("team") or i.namespace_labels.get("team") for i in infos} - {None}
    products = {i.labels.get("product") or i.namespace_labels.get("product") for i in infos} - {
        None
    }
    assert len(teams) >= 4 and len(products) >= 3
    assert any(not i.namespace_labels and not i.labels for i in infos)  # untagged
    served = {p.inference.model for p in s.pods if p.inference}
    assert len(served) >= 3
    assert any(p.pod_uid is None for p in s.processes)  # a host process


def test_pods_come_and_go() -> None:
    s = demo_scenario(START)
    names = lambda t: {p.name for p in s.pods_at(t)}  # noqa: E731
    assert "batch-train-0" in names(100) and "batch-train-0" not in names(500)
    assert "batch-train-1" in names(700)


def test_every_inference_page_parses_to_its_model() -> None:
    s = demo_scenario(START)
    for pod in s.pods:
        if pod.inference is not None:
            totals = parse_totals(metrics_page(s, pod, 200.0), pod.inference.model)
            assert pod.inference.model in totals, pod.name


def test_every_process_pid_is_unique_and_on_a_known_device() -> None:
    for build in SCENARIOS.values():
        s = build(START)
        uuids = {m.uuid for n in s.nodes for g in n.gpus for m in g.mig_instances} | {
            g.uuid for n in s.nodes for g in n.gpus if not g.mig_enabled
        }
        pids = [p.pid for p in s.processes]
        assert len(pids) == len(set(pids))
        assert all(p.device_uuid in uuids for p in s.processes)


def test_sim_clock_drives_time() -> None:
    clock = SimClock(START)
    clock.advance(2.5)
    assert clock() == START + 2.5
    assert bench_scenario(START).device_count() == 8

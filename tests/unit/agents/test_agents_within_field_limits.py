"""The agents never publish an event the decoder refuses for its size (design §2, "Field limits").

What Kubernetes or an inference server allows beyond the limits (more than 256 labels on one
object, a long model name in a metric label or an annotation, more than 1,024 processes on one
device) is cut with a warning before publishing; what an operator configures beyond them is
refused at start.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agents.fake_nvml import FakeNvml
from agents.metrics import AgentMetrics
from agents.pod_state import PodState
from agents.sampler import DeviceSampler, SamplerSettings
from agents.scenario import H100_80GB, GpuSpec, NodeSpec, ProcessSpec, Scenario, SimClock
from agents.scenario_views import cgroup_reader
from agents.token_counters import parse_totals
from agents.token_scraper import ScrapeTarget, parse_static_target, targets_from_pods
from runtime.errors import ConfigError
from schemas import fields
from schemas.events import Ok, decode_event, encode_event, make_event

NOW = 1_795_000_000_000
GIB = 2**30


def pod(labels: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {
            "uid": "dde1244b-5bb5-4297-b544-85f3bc0d80bf",
            "namespace": "search",
            "name": "vllm-0",
            "labels": labels,
            "resourceVersion": "7",
        },
        "spec": {"nodeName": "gpu-node-1"},
    }


def namespace(labels: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": "search", "labels": labels, "resourceVersion": "3"}}


def decodes(event: Any) -> bool:
    return isinstance(decode_event(encode_event(event)), Ok)


def test_a_pod_with_more_labels_than_an_event_carries_is_published_with_the_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    many = {f"example.com/label-{i:04d}": "v" for i in range(fields.MAX_LABELS + 50)}
    state = PodState("prod")
    state.apply_namespace(namespace(many), NOW)
    with caplog.at_level(logging.WARNING, logger="agents.pod_state"):
        [emission] = state.apply_pod("ADDED", pod({**many, "team": "search"}), NOW)
    info = emission.info
    assert len(info.labels) == fields.MAX_LABELS
    assert len(info.namespace_labels) == fields.MAX_LABELS
    assert "example.com/label-0000" in info.labels
    assert "labels" in caplog.text and "search/vllm-0" in caplog.text
    event = make_event(info, event_id=emission.event_id, source="pods", time_ms=NOW)
    assert decodes(event)


def test_labels_no_api_server_would_accept_are_left_out() -> None:
    state = PodState("prod")
    labels = {"k" * 400: "v", "team": "x" * 100, "app": "vllm"}
    [emission] = state.apply_pod("ADDED", pod(labels), NOW)
    assert dict(emission.info.labels) == {"app": "vllm"}


def test_a_long_model_name_is_cut_to_the_limit() -> None:
    name = "/models/" + "m" * 2000
    page = f'vllm:prompt_tokens_total{{model_name="{name}"}} 10\n'
    [model] = parse_totals(page)
    assert model == name[: fields.MAX_MODEL]
    [annotated] = parse_totals("tgi_request_success 3\n", default_model=name)
    assert annotated == name[: fields.MAX_MODEL]


def test_a_long_model_annotation_is_cut_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    ready = {"phase": "Running", "podIP": "10.0.0.7"}
    notes = {"prometheus.io/scrape": "true", "prometheus.io/port": "8000"}
    long_pod = pod({})
    long_pod["metadata"]["annotations"] = {**notes, "gpuledger.io/model": "x" * 5000}
    long_pod["status"] = ready
    with caplog.at_level(logging.WARNING, logger="agents.token_scraper"):
        [target] = targets_from_pods([long_pod])
    assert target.default_model == "x" * fields.MAX_MODEL
    assert "gpuledger.io/model" in caplog.text


@pytest.mark.parametrize(
    "text",
    [
        "n" * 64 + "/pod=http://10.0.0.1:8000/metrics",
        "ns/" + "p" * 254 + "=http://10.0.0.1:8000/metrics",
        "ns/pod/" + "u" * 385 + "=http://10.0.0.1:8000/metrics",
    ],
)
def test_a_static_target_with_names_longer_than_events_carry_is_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_static_target(text)


def test_the_longest_static_target_fits_an_event() -> None:
    target = parse_static_target("n" * 63 + "/" + "p" * 253 + "=http://10.0.0.1:8000/metrics")
    assert isinstance(target, ScrapeTarget)
    assert len(target.pod_uid) <= fields.MAX_SERIES_UID


def crowded_scenario(processes: int) -> Scenario:
    gpu = GpuSpec("GPU-aaaa", H100_80GB)
    return Scenario(
        cluster="c1",
        start_unix_s=1_800_000_000.0,
        nodes=(NodeSpec("n1", (gpu,)),),
        processes=tuple(
            ProcessSpec(1000 + i, gpu.uuid, None, None, 0, None, (i % 7 + 1) * 2**20, 1.0)
            for i in range(processes)
        ),
    )


def test_a_device_listing_more_processes_than_an_event_carries_keeps_the_largest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scenario = crowded_scenario(fields.MAX_PROCESSES + 100)
    clock = SimClock(scenario.start_unix_s + 10)
    sampler = DeviceSampler(
        FakeNvml(scenario, "n1", clock),
        SamplerSettings(cluster="c1", node="n1"),
        AgentMetrics(CollectorRegistry(), "c1", "n1"),
        cgroup_reader=cgroup_reader(scenario),
        wall_clock=clock,
    )
    with caplog.at_level(logging.WARNING, logger="agents.sampler"):
        [event] = sampler.sample()
    processes = event.data.processes
    assert len(processes) == fields.MAX_PROCESSES
    listed = sorted((p.mem_used_bytes for p in scenario.processes), reverse=True)
    assert sorted((p.mem_used_bytes for p in processes), reverse=True) == listed[:1024]
    assert "GPU-aaaa" in caplog.text
    assert decodes(event)


def test_node_labels_beyond_the_limits_are_left_out_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scenario = crowded_scenario(1)
    clock = SimClock(scenario.start_unix_s + 10)
    labels = {"zone": "a", "note": "x" * 100}
    with caplog.at_level(logging.WARNING, logger="agents.sampler"):
        sampler = DeviceSampler(
            FakeNvml(scenario, "n1", clock),
            SamplerSettings(cluster="c1", node="n1", node_labels=labels),
            AgentMetrics(CollectorRegistry(), "c1", "n1"),
            cgroup_reader=cgroup_reader(scenario),
            wall_clock=clock,
        )
    [event] = sampler.sample()
    assert dict(event.data.node_labels) == {"zone": "a"}
    assert "node label" in caplog.text
    assert decodes(event)

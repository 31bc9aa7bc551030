"""The producers' metrics stay bounded whatever NVML or the API server names: device series
are capped and leave with their device, error and watch-event labels are capped, and no label
value is longer than MAX_LABEL_CHARS. Series are counted in the exposition text."""

from __future__ import annotations

import re
from collections import Counter

from prometheus_client import CollectorRegistry, generate_latest

from agents.metrics import MAX_DEVICE_SERIES, MAX_NAMED_SERIES, AgentMetrics, PodsMetrics
from runtime.metric_labels import MAX_LABEL_CHARS

SERIES = re.compile(r"^([a-z_]+)\{(.*)\} ", re.MULTILINE)
LABEL = re.compile(r'[a-z_]+="((?:[^"\\]|\\.)*)"')


def series(registry: CollectorRegistry) -> Counter[str]:
    text = generate_latest(registry).decode()
    return Counter(name for name, _ in SERIES.findall(text) if not name.endswith("_created"))


def label_values(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return [value for _, labels in SERIES.findall(text) for value in LABEL.findall(labels)]


def test_a_flood_of_devices_and_errors_keeps_each_family_within_its_cap() -> None:
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry, "c1", "n1")
    for n in range(100_000):
        metrics.process_util_unsupported(f"MIG-{n}", True)
        metrics.device_lost(f"GPU-{n}")
        metrics.nvml_error("nvmlDeviceGetMemoryInfo", f"code_{n}")
    counts = series(registry)
    assert counts["gpuledger_agent_process_util_unsupported"] <= MAX_DEVICE_SERIES
    assert counts["gpuledger_agent_devices_lost_total"] <= MAX_DEVICE_SERIES
    assert counts["gpuledger_agent_nvml_errors_total"] <= MAX_NAMED_SERIES
    assert 'device_uuid="MIG-99999"' in generate_latest(registry).decode()  # the latest kept


def test_a_device_gone_leaves_its_gauge() -> None:
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry, "c1", "n1")
    metrics.process_util_unsupported("MIG-a", True)
    metrics.process_util_unsupported("MIG-b", True)
    metrics.devices_present(["MIG-b", "GPU-c"])
    text = generate_latest(registry).decode()
    assert 'device_uuid="MIG-a"' not in text and 'device_uuid="MIG-b"' in text


def test_a_flood_of_watch_event_types_keeps_the_family_within_its_cap() -> None:
    registry = CollectorRegistry()
    metrics = PodsMetrics(registry, "c1")
    for n in range(100_000):
        metrics.watch_event("pods", f"TYPE-{n}")
    assert series(registry)["gpuledger_pods_watch_events_total"] <= MAX_NAMED_SERIES


def test_a_1_mb_value_becomes_a_bounded_label() -> None:
    registry = CollectorRegistry()
    huge = "x" * 1_000_000
    metrics = AgentMetrics(registry, huge, huge)
    metrics.process_util_unsupported(huge, True)
    metrics.device_lost(huge)
    metrics.nvml_error(huge, huge)
    pods = PodsMetrics(registry, huge)
    pods.watch_event("pods", huge)
    values = label_values(registry)
    assert values and max(len(v) for v in values) <= MAX_LABEL_CHARS == 128
    assert any("\u2026" in v for v in values)
    assert len(generate_latest(registry)) < 200_000

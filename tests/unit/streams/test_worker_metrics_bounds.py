"""Worker metrics stay bounded: series named by the input (device, GPU model, event source,
team) leave the exposition once silent for the TTL, and no family outgrows its cap."""

from __future__ import annotations

import re
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from row_builders import cost_row

from streams.metrics import MAX_SOURCES, OTHER_SOURCE, SERIES_TTL_S, WorkerMetrics
from streams.rows import KIND_IDLE, KIND_USAGE, CostRow

START_MS = 1_795_046_400_000
T0 = START_MS / 1000 + 61


def rows(device: str, team: str = "search", cost: str = "0.01") -> list[CostRow]:
    usage = cost_row(
        START_MS, device, node=f"node-{device}", team=team, kind=KIND_USAGE, cost_usd=Decimal(cost)
    )
    idle = cost_row(
        START_MS,
        device,
        node=f"node-{device}",
        team="platform",
        kind=KIND_IDLE,
        pod_uid="__idle__",
        cost_usd=Decimal("0.001"),
        idle_cost_usd=Decimal("0.001"),
    )
    return [usage, idle]


def exposed(registry: CollectorRegistry, metric: str, label: str) -> set[str]:
    """The values of `label` over the series of `metric` in the exposition text."""
    text = generate_latest(registry).decode()
    pattern = rf'^{metric}\{{[^}}]*\b{label}="([^"]*)"'
    return set(re.findall(pattern, text, flags=re.MULTILINE))


def test_a_silent_device_leaves_the_rate_gauges_after_the_ttl() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    assert metrics.series_ttl_s == SERIES_TTL_S == 3600
    metrics.rows_emitted(rows("gpu-a", "search"), 60, T0)
    metrics.rows_emitted(rows("gpu-b", "ads"), 60, T0 + 3000)
    metrics.prune(T0 + 3600)
    assert exposed(registry, "gpuledger_idle_burn_usd_per_hour", "device_uuid") == {
        "gpu-a",
        "gpu-b",
    }
    metrics.prune(T0 + 3601)
    assert exposed(registry, "gpuledger_idle_burn_usd_per_hour", "device_uuid") == {"gpu-b"}
    assert exposed(registry, "gpuledger_cost_usd_per_hour", "team") == {"ads", "platform"}
    metrics.prune(T0 + 6601)
    assert exposed(registry, "gpuledger_idle_burn_usd_per_hour", "device_uuid") == set()
    assert exposed(registry, "gpuledger_cost_usd_per_hour", "team") == set()
    assert exposed(registry, "gpuledger_untagged_cost_usd_per_hour", "cluster") == set()


def test_the_device_family_keeps_the_most_recently_updated() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, max_series=3)
    for n, device in enumerate(["gpu-1", "gpu-2", "gpu-3", "gpu-4", "gpu-1", "gpu-5"]):
        metrics.rows_emitted(rows(device), 60, T0 + n)
    assert exposed(registry, "gpuledger_idle_burn_usd_per_hour", "device_uuid") == {
        "gpu-1",
        "gpu-4",
        "gpu-5",
    }
    assert metrics.series_evicted == 3


def test_a_revoked_device_is_no_longer_counted_against_the_cap() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, max_series=2)
    metrics.rows_emitted(rows("gpu-1"), 60, T0)
    metrics.rows_emitted(rows("gpu-2"), 60, T0 + 1)
    metrics.devices_revoked(["gpu-2"])
    metrics.rows_emitted(rows("gpu-3"), 60, T0 + 2)
    assert exposed(registry, "gpuledger_idle_burn_usd_per_hour", "device_uuid") == {
        "gpu-1",
        "gpu-3",
    }
    assert metrics.series_evicted == 0


def test_team_rates_beyond_the_cap_fold_into_other() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, max_series=3)  # the devices' family holds three too
    for n, (team, cost) in enumerate([("a", "0.05"), ("b", "0.04"), ("c", "0.01")]):
        metrics.rows_emitted(rows(f"gpu-{team}", team, cost), 60, T0 + n)
    assert exposed(registry, "gpuledger_cost_usd_per_hour", "team") == {"a", "b", "__other__"}

    def rate(team: str) -> float:
        value = registry.get_sample_value(
            "gpuledger_cost_usd_per_hour", {"cluster": "c1", "team": team}
        )
        assert value is not None
        return value

    # the two largest keep their own series; the idle platform rows (3 x 0.06/h) and c
    # (0.6/h) share __other__
    assert abs(rate("a") - 3.0) < 1e-9 and abs(rate("b") - 2.4) < 1e-9
    assert abs(rate("__other__") - (0.18 + 0.6)) < 1e-9


def test_unknown_gpu_models_are_pruned_and_capped() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, max_series=2)
    family = "gpuledger_unknown_gpu_model_samples_total"
    metrics.unknown_gpu_model("m1", now_s=0.0)
    metrics.unknown_gpu_model("m2", now_s=1000.0)
    metrics.prune(3600.5)
    assert exposed(registry, family, "gpu_model") == {"m2"}
    metrics.unknown_gpu_model("m3", now_s=3601.0)
    metrics.unknown_gpu_model("m4", now_s=3602.0)
    assert exposed(registry, family, "gpu_model") == {"m3", "m4"}
    metrics.unknown_gpu_model("m2", now_s=3603.0)  # evicted: counts again from one
    assert registry.get_sample_value(f"{family}", {"gpu_model": "m2"}) == 1.0


def test_a_silent_source_gives_up_its_series_and_its_place() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    for n in range(MAX_SOURCES):
        metrics.clock_offset(f"agent/node-{n}", 0.5, now_s=0.0)
    metrics.clock_offset("agent/late-comer", 0.5, now_s=10.0)
    metrics.clock_skewed("gpuledger.gpu-samples", "agent/node-0", now_s=10.0)
    sources = exposed(registry, "gpuledger_clock_offset_seconds", "source")
    assert OTHER_SOURCE in sources and "agent/late-comer" not in sources
    metrics.prune(911.0)  # offsets silent 900 s are gone; node-0's skew count stays
    assert exposed(registry, "gpuledger_clock_offset_seconds", "source") == set()
    assert exposed(registry, "gpuledger_clock_skew_events_total", "source") == {"agent/node-0"}
    metrics.clock_offset("agent/late-comer", 0.25, now_s=912.0)
    assert exposed(registry, "gpuledger_clock_offset_seconds", "source") == {"agent/late-comer"}
    metrics.prune(3611.0)
    assert exposed(registry, "gpuledger_clock_skew_events_total", "source") == set()


@given(
    st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 1500)), max_size=40),
    st.integers(2, 5),
)
def test_the_exposed_devices_are_the_recent_ones_within_the_cap(
    updates: list[tuple[str, int]], max_series: int
) -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, series_ttl_s=1000, max_series=max_series)
    now = T0
    last: dict[str, float] = {}
    for device, step in updates:
        now += step
        metrics.rows_emitted(rows(f"gpu-{device}"), 60, now)
        last.pop(device, None)
        last[device] = now
        metrics.prune(now)
        recent = [d for d, t in last.items() if t >= now - 1000][-max_series:]
        want = {f"gpu-{d}" for d in recent}
        assert exposed(registry, "gpuledger_idle_burn_usd_per_hour", "device_uuid") == want

"""Worker metrics labelled by event data stay bounded whatever the input: a flood of distinct
clusters, teams, GPU models, sources or reasons keeps every family within its cap, a label value
is never longer than MAX_LABEL_CHARS, and a device silent for the TTL leaves the exposition.
Series are counted in the exposition text, as Prometheus would scrape it."""

from __future__ import annotations

import re
from collections import Counter
from decimal import Decimal

from prometheus_client import CollectorRegistry, generate_latest
from row_builders import cost_row

from runtime.metric_labels import MAX_LABEL_CHARS
from streams.metrics import MAX_REASON_SERIES, MAX_SOURCES, WorkerMetrics
from streams.rows import KIND_IDLE, UNTAGGED, CostRow

START_MS = 1_795_046_400_000
T0 = START_MS / 1000 + 61
FLOOD = 100_000
CAP = 1_000
SERIES = re.compile(r"^([a-z_]+)\{(.*)\} ", re.MULTILINE)
LABEL = re.compile(r'[a-z_]+="((?:[^"\\]|\\.)*)"')


def series(registry: CollectorRegistry) -> Counter[str]:
    """Series per family in the exposition (a counter's `_created` lines not counted twice)."""
    text = generate_latest(registry).decode()
    return Counter(name for name, _ in SERIES.findall(text) if not name.endswith("_created"))


def label_values(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return [value for _, labels in SERIES.findall(text) for value in LABEL.findall(labels)]


def device_rows(n: int, *, cluster: str | None = None, team: str | None = None) -> list[CostRow]:
    """A device's usage row (its own cluster and team unless given) and its idle row."""
    device, c = f"GPU-{n}", cluster or f"cluster-{n}"
    usage = cost_row(
        START_MS,
        device,
        cluster=c,
        node=f"node-{n}",
        team=team or f"team-{n}",
        cost_usd=Decimal("0.01") + Decimal(n) / 10**9,
    )
    idle = cost_row(
        START_MS,
        device,
        cluster=c,
        node=f"node-{n}",
        team="platform",
        kind=KIND_IDLE,
        pod_uid="__idle__",
        cost_usd=Decimal("0.001"),
        idle_cost_usd=Decimal("0.001"),
    )
    untagged = cost_row(
        START_MS,
        device,
        cluster=c,
        node=f"node-{n}",
        team=UNTAGGED,
        pod_uid=f"uid-{n}",
        cost_usd=Decimal("0.002"),
    )
    return [usage, idle, untagged]


def test_a_flood_of_clusters_and_teams_keeps_every_rate_family_within_its_cap() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, max_series=CAP)
    for batch in range(0, FLOOD, 5_000):
        rows = [row for n in range(batch, batch + 5_000) for row in device_rows(n)]
        metrics.rows_emitted(rows, 60, T0 + batch)
    counts = series(registry)
    assert counts["gpuledger_cost_usd_per_hour"] <= CAP
    assert counts["gpuledger_untagged_cost_usd_per_hour"] <= CAP
    assert counts["gpuledger_idle_burn_usd_per_hour"] <= CAP


def test_a_flood_of_teams_in_many_clusters_still_folds_within_the_cap() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, max_series=10)
    rows = [row for n in range(10) for row in device_rows(n)]  # 10 clusters, 30 (cluster, team)
    metrics.rows_emitted(rows, 60, T0)
    assert series(registry)["gpuledger_cost_usd_per_hour"] <= 10
    total = sum(float(r.cost_usd) * 60 for r in rows)
    text = generate_latest(registry).decode()
    exposed = [
        float(v)
        for v in re.findall(r"^gpuledger_cost_usd_per_hour\{.*\} (.*)$", text, flags=re.MULTILINE)
    ]
    assert abs(sum(exposed) - total) < 1e-6  # folded, not dropped


def test_a_flood_of_models_and_sources_keeps_their_families_within_their_caps() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, max_series=CAP)
    for n in range(FLOOD):
        metrics.unknown_gpu_model(f"model-{n}", now_s=T0 + n)
        metrics.clock_offset(f"agent/node-{n}", 0.5, now_s=T0 + n)
        metrics.clock_skewed("gpuledger.gpu-samples", f"agent/node-{n}", now_s=T0 + n)
    counts = series(registry)
    assert counts["gpuledger_unknown_gpu_model_samples_total"] <= CAP
    assert counts["gpuledger_clock_offset_seconds"] <= min(CAP, MAX_SOURCES + 1)
    assert counts["gpuledger_clock_skew_events_total"] <= min(CAP, MAX_SOURCES + 1)


def test_a_flood_of_reasons_keeps_the_rejection_families_within_their_cap() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    for n in range(FLOOD // 10):
        metrics.event_rejected("gpuledger.gpu-samples", f"reason-{n}")
        metrics.dead_lettered(f"table-{n}", "unstorable")
    counts = series(registry)
    assert counts["gpuledger_events_rejected_total"] <= MAX_REASON_SERIES
    assert counts["gpuledger_dead_letters_total"] <= MAX_REASON_SERIES
    other = registry.get_sample_value(
        "gpuledger_events_rejected_total", {"topic": "__other__", "reason": "__other__"}
    )
    assert other == FLOOD // 10 - (MAX_REASON_SERIES - 1)  # counted, in one shared series


def test_a_1_mb_value_becomes_a_bounded_label() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    huge = "c" * 1_000_000
    metrics.rows_emitted(device_rows(1, cluster=huge, team=huge + "t"), 60, T0)
    metrics.rows_emitted(device_rows(2, cluster=huge + "x", team=huge), 60, T0)
    metrics.unknown_gpu_model(huge, now_s=T0)
    metrics.clock_offset(huge, 0.5, now_s=T0)
    metrics.clock_skewed("gpuledger.gpu-samples", huge, now_s=T0)
    metrics.event_rejected(huge, huge)
    metrics.dead_lettered(huge, huge)
    values = label_values(registry)
    assert values and max(len(v) for v in values) <= MAX_LABEL_CHARS == 128
    assert len(generate_latest(registry)) < 100_000
    cut = [v for v in values if v.startswith("ccc")]
    assert cut and all("\u2026" in v for v in cut)  # marked as cut
    clusters = {v for v in cut if v.endswith(tuple("0123456789abcdef"))}
    assert len(clusters) >= 2  # two long values that differ stay two series


def test_the_series_of_a_device_silent_for_the_ttl_are_gone() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, series_ttl_s=600)
    metrics.rows_emitted(device_rows(1), 60, T0)
    metrics.rows_emitted(device_rows(2), 60, T0 + 300)
    metrics.prune(T0 + 601)
    text = generate_latest(registry).decode()
    assert 'device_uuid="GPU-1"' not in text and 'cluster="cluster-1"' not in text
    assert 'device_uuid="GPU-2"' in text and 'cluster="cluster-2"' in text
    metrics.prune(T0 + 901)
    counts = series(registry)
    assert counts["gpuledger_idle_burn_usd_per_hour"] == 0
    assert counts["gpuledger_cost_usd_per_hour"] == 0
    assert counts["gpuledger_untagged_cost_usd_per_hour"] == 0

"""Worker metrics: the cost-rate series follow the devices a worker owns."""

from __future__ import annotations

from decimal import Decimal

from prometheus_client import CollectorRegistry
from row_builders import cost_row

from streams.metrics import WorkerMetrics
from streams.rows import KIND_IDLE, KIND_USAGE, CostRow

START_MS = 1_795_046_400_000


def row(device: str, team: str, kind: str, cost: str) -> CostRow:
    return cost_row(
        START_MS,
        device,
        node=f"node-{device}",
        team=team,
        kind=kind,
        pod_uid=f"uid-{team}" if kind == KIND_USAGE else "__idle__",
        cost_usd=Decimal(cost),
        idle_cost_usd=Decimal(cost) if kind == KIND_IDLE else Decimal(0),
    )


def test_a_revoked_device_leaves_the_rate_gauges() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    metrics.rows_emitted(
        [
            row("gpu-a", "search", KIND_USAGE, "0.01"),
            row("gpu-a", "platform", KIND_IDLE, "0.02"),
            row("gpu-b", "ads", KIND_USAGE, "0.03"),
            row("gpu-b", "platform", KIND_IDLE, "0.001"),
        ],
        60,
        START_MS / 1000 + 61,
    )

    def rate(team: str) -> float | None:
        return registry.get_sample_value(
            "gpuledger_cost_usd_per_hour", {"cluster": "c1", "team": team}
        )

    def idle(device: str) -> float | None:
        return registry.get_sample_value(
            "gpuledger_idle_burn_usd_per_hour",
            {"cluster": "c1", "node": f"node-{device}", "device_uuid": device},
        )

    def near(value: float | None, want: float) -> bool:
        return value is not None and abs(value - want) < 1e-9

    assert near(rate("search"), 0.6) and near(idle("gpu-a"), 1.2)
    assert near(rate("platform"), 1.26)

    metrics.devices_revoked({"gpu-a", "gpu-never-seen"})
    assert rate("search") is None, "a team seen only on the revoked device loses its series"
    assert idle("gpu-a") is None
    assert near(rate("ads"), 1.8) and near(idle("gpu-b"), 0.06)
    assert near(rate("platform"), 0.06)

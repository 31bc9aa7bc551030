from decimal import Decimal

from streams.reports.chargeback import (
    ChargebackSettings,
    CostPart,
    ModelPart,
    build_export,
)
from streams.reports.focus_rules import check_rows
from streams.reports.params import parse_month


def part(pod: str, device: str, team: str, kind: str, cost: str, secs: float) -> CostPart:
    return CostPart("c1", pod, device, team, "p", "on_demand", kind, Decimal(cost), secs)


def test_pod_cost_is_split_by_model_and_device_ratios_sum_to_one() -> None:
    parts = [
        part("a", "d1", "t1", "usage", "1.000000000000001", 600.0),
        part("a", "d2", "t1", "usage", "2", 1200.0),
        part("b", "d1", "__untagged__", "usage", "0.5", 300.0),
        part("__idle__", "d1", "platform", "idle", "0.7", 500.0),
        part("__idle__", "d2", "platform", "idle", "0", 0.0),
    ]
    models = [
        ModelPart("a", "t1", "p", "m1", Decimal("2"), 100, 50, 3),
        ModelPart("a", "t1", "p", "m2", Decimal("0.5"), 10, 5, 1),
    ]
    export = build_export(parse_month("2026-11"), ChargebackSettings(), parts, models)
    assert check_rows(export.records()) == []
    by = {(r["x_Team"], r["x_Model"], r["x_CostKind"]): r for r in export.rows}
    assert by[("t1", "m1", "allocated")]["x_UnroundedCost"] == Decimal("2")
    assert by[("t1", None, "allocated")]["x_UnroundedCost"] == Decimal("0.500000000000001")
    assert by[("__untagged__", None, "untagged")]["AllocatedResourceId"] is not None
    assert by[("platform", None, "idle")]["AllocatedResourceId"] is None
    assert sum(r["BilledCost"] for r in export.rows) == Decimal("4.20")
    assert by[("t1", "m1", "allocated")]["x_PromptTokens"] == 100

"""The budget and forecast gauges' hook: values, series removed when an owner or budget goes,
and the series cap (budgeted owners kept, the smallest forecasts folded into __other__)."""

from __future__ import annotations

from decimal import Decimal

from prometheus_client import CollectorRegistry

from streams.metrics import BudgetValues, OwnerForecast, WorkerMetrics


def _owner(name: str, usd: int, dimension: str = "team") -> OwnerForecast:
    d = Decimal(usd)
    return OwnerForecast(dimension, name, d / 2, d, d - 1, d + 1, d - 2, d + 2)


def _series(registry: CollectorRegistry, name: str) -> dict[str, float]:
    return {
        s.labels["owner"]: s.value
        for metric in registry.collect()
        for s in metric.samples
        if s.name == name
    }


def test_values_and_removal() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    budget = BudgetValues("team", "a", Decimal(1000), (Decimal(80), Decimal("99.5")))
    metrics.budgets_refreshed([budget], [_owner("a", 900), _owner("b", 10)], 1_000.0)
    assert _series(registry, "gpuledger_forecast_usd") == {"a": 900.0, "b": 10.0}
    assert _series(registry, "gpuledger_forecast_high95_usd") == {"a": 902.0, "b": 12.0}
    assert _series(registry, "gpuledger_budget_month_to_date_usd") == {"a": 450.0, "b": 5.0}
    thresholds = {
        s.labels["threshold_pct"]: s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == "gpuledger_budget_threshold_usd"
    }
    assert thresholds == {"80": 800.0, "99.5": 995.0}
    assert registry.get_sample_value("gpuledger_budget_last_refresh_timestamp_seconds") == 1000.0
    metrics.budgets_refreshed([], [_owner("b", 20)], 1_300.0)
    assert _series(registry, "gpuledger_forecast_usd") == {"b": 20.0}
    assert _series(registry, "gpuledger_budget_usd") == {}
    assert _series(registry, "gpuledger_budget_threshold_usd") == {}
    metrics.budget_refresh_failed()
    assert registry.get_sample_value("gpuledger_budget_refresh_failures_total") == 1


def test_the_cap_keeps_budgeted_owners_and_folds_the_smallest() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, max_series=3)
    budget = BudgetValues("team", "tiny", Decimal(5), (Decimal(100),))
    owners = [_owner("big", 500), _owner("mid", 300), _owner("small", 100), _owner("tiny", 1)]
    metrics.budgets_refreshed([budget], owners, 0.0)
    # tiny has a budget: kept; big is the largest of the rest; mid + small are __other__.
    assert _series(registry, "gpuledger_forecast_usd") == {
        "tiny": 1.0,
        "big": 500.0,
        "__other__": 400.0,
    }
    assert _series(registry, "gpuledger_budget_month_to_date_usd")["__other__"] == 200.0

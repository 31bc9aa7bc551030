"""The budget report on the real embedded ClickHouse: a generated month with a constant spend
a day per owner, so the forecast, each budget's status, percentages and the day the forecast
reaches the budget are known exactly."""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal

from test_reports_data import HOUR_MS, T0_MS, fresh_store

from streams.reports.budget_report import (
    FORECAST_OVER,
    NO_SPEND,
    ON_TRACK,
    OVER,
    budget_report,
)
from streams.reports.budgets import parse_budgets
from streams.reports.params import parse_month
from streams.reports.render import to_csv, to_json, to_table
from streams.rollups import seal_hours
from streams.rows import CostRow

DAYS = 10  # complete days: as of 2026-11-11T00:00Z
# team -> (USD an hour, product, cost centre): search spends 120 a day, recs 60.
OWNERS = {"search": (Decimal(5), "ask", "cc-1"), "recs": (Decimal("2.5"), "feed", "cc-2")}
BUDGETS = """
budgets:
  - {team: search, monthly_usd: 4000}                      # forecast 3,600: 90 %
  - {team: recs, monthly_usd: 1470}                        # forecast 1,800: 122.45 %
  - {team: ghost, monthly_usd: 500}                        # no spend
  - {cost_center: cc-1, monthly_usd: 1000}                 # 1,200 spent already
  - {cost_center: cc-2, monthly_usd: 10000}                # 18 %
  - {product: ask, monthly_usd: 3600, thresholds_pct: [100]}  # exactly at 100 %
"""


def cost_row(team: str, h: int) -> CostRow:
    usd, product, cost_center = OWNERS[team]
    w0 = T0_MS + h * HOUR_MS
    return CostRow(
        w0, w0 + 60_000, "c1", "n1", f"GPU-{team}", "GPU-1", "H100", "", "ns", f"pod-{team}",
        f"uid-{team}", team, product, cost_center, "usage", 60.0, 50.0, 0.0, usd, Decimal(0),
        Decimal("4.0"), "on_demand", 1,
    )  # fmt: skip


def month_rows() -> list[CostRow]:
    return [cost_row(team, h) for h in range(DAYS * 24) for team in OWNERS]


def test_budget_report_known_answers_on_a_constant_month() -> None:
    store = fresh_store()
    store.insert_rows(month_rows())
    seal_hours(store, T0_MS + 6 * 24 * HOUR_MS, retention_s=0)  # rollups, then base rows
    now_ms = T0_MS + DAYS * 24 * HOUR_MS
    report = budget_report(store, parse_budgets(BUDGETS), parse_month("2026-11"), now_ms=now_ms)
    got = {
        (line.budget.dimension, line.budget.owner): (
            line.forecast.month_to_date_usd,
            line.forecast.total_usd,
            line.used_pct,
            line.forecast_pct,
            line.status,
            line.threshold_pct,
        )
        for line in report.lines
    }
    assert got == {
        ("team", "search"): (1200, 3600, Decimal("30.00"), Decimal("90.00"), FORECAST_OVER, 80),
        ("team", "recs"): (600, 1800, Decimal("40.82"), Decimal("122.45"), FORECAST_OVER, 100),
        ("team", "ghost"): (0, 0, 0, 0, ON_TRACK, None),
        ("cost_center", "cc-1"): (1200, 3600, 120, 360, OVER, 100),
        ("cost_center", "cc-2"): (600, 1800, 6, 18, ON_TRACK, None),
        ("product", "ask"): (1200, 3600, Decimal("33.33"), 100, FORECAST_OVER, 100),
    }
    days = {(r["dimension"], r["owner"]): r["reaches_budget_on"] for r in report.records()}
    # recs: 600 now + 60 a day reaches 1,470 14.5 days on, at noon; ask reaches 3,600 at the
    # month's end, on its last day; search never does; cc-1 did already.
    assert days == {
        ("team", "search"): None,
        ("team", "recs"): "2026-11-25",
        ("team", "ghost"): None,
        ("cost_center", "cc-1"): None,
        ("cost_center", "cc-2"): None,
        ("product", "ask"): "2026-11-30",
    }
    recs = next(line for line in report.lines if line.budget.owner == "recs")
    assert recs.crosses_ms == now_ms + 29 * 12 * HOUR_MS  # 14.5 days
    ghost = next(line for line in report.lines if line.budget.owner == "ghost")
    assert ghost.forecast.method == NO_SPEND
    table = to_table(report)
    assert "forecast over" in table and "122.4%" in table and "2026-11-25" in table
    header, *rows = to_csv(report).splitlines()
    assert header.startswith("dimension,owner,budget_usd,month_to_date_usd,used_pct")
    assert len(rows) == 6
    doc = json.loads(to_json(report))
    assert doc["report"] == "budget" and doc["month"] == "2026-11"
    assert doc["lines"][1]["status"] == "forecast_over" and doc["lines"][1]["budget_usd"] == "1470"


def test_as_of_after_the_month_is_the_month_spent() -> None:
    store = fresh_store()
    store.insert_rows(month_rows())
    budgets = parse_budgets("budgets: [{team: search, monthly_usd: 1000}]")
    report = budget_report(store, budgets, parse_month("2026-11"), now_ms=T0_MS + 40 * 86_400_000)
    [line] = report.lines
    assert line.forecast.total_usd == line.forecast.month_to_date_usd == 1200
    assert (line.status, line.crosses_ms) == (OVER, None)


def test_at_risk_when_only_the_top_of_the_80_interval_reaches_a_threshold() -> None:
    """A spend that varies day to day has a real interval: a budget whose 80 % threshold lies
    between the point forecast and the interval's top is at risk, not forecast over."""
    store = fresh_store()
    rows = [
        dataclasses.replace(cost_row("search", h), cost_usd=Decimal(8 if h // 24 % 3 == 0 else 3))
        for h in range(DAYS * 24)
    ]  # 192, 72, 72 USD a day
    store.insert_rows(rows)
    month, now_ms = parse_month("2026-11"), T0_MS + DAYS * 24 * HOUR_MS
    probe = budget_report(
        store, parse_budgets("budgets: [{team: search, monthly_usd: 1}]"), month, now_ms=now_ms
    )
    f = probe.lines[0].forecast
    assert f.total_usd < f.high80_usd  # a real interval
    between = (f.total_usd + f.high80_usd) / 2
    budget = (between * 100 / 80).quantize(Decimal("0.01"))
    budgets = parse_budgets(f"budgets: [{{team: search, monthly_usd: '{budget}'}}]")
    [line] = budget_report(store, budgets, month, now_ms=now_ms).lines
    assert line.forecast == f  # the same forecast: one implementation
    assert (line.status, line.threshold_pct, line.crosses_ms) == ("at_risk", 80, None)

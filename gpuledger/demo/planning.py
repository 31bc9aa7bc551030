"""The demo's planning answers, from the data it just collected: the month-end forecast by
team, the cost of scaling its busiest model 3x, its teams against a budgets file, and what
request-based allocation would have charged each team. Each is the report its command prints;
nothing here computes a figure of its own but the demo's budgets, which are set from the
forecast so that every status shows (`demo_budgets`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from fractions import Fraction
from pathlib import Path

from streams.pricing import PriceBook
from streams.reports.budget_report import (
    AT_RISK,
    FORECAST_OVER,
    ON_TRACK,
    OVER,
    BudgetReport,
    assess_budgets,
)
from streams.reports.budgets import load_budgets
from streams.reports.forecast_report import ForecastReport, forecast
from streams.reports.params import Period, format_ms, parse_month
from streams.reports.plan_data import PlanReport, plan
from streams.reports.render import Tabular
from streams.reports.requests_data import requests_report
from streams.reports.requests_report import RequestsReport
from streams.reports.showback import ALLOCATED, ShowbackReport
from streams.store import ClickHouseStore

GROWTH = Fraction(3)
BUDGETS_FILE = "gpuledger-demo-budgets.yaml"
_CENT = Decimal("0.01")
# The demo's teams by forecast, largest first, get these statuses (the default 80 % and 100 %
# thresholds): one of each, then on track.
STATUS_ORDER = (OVER, FORECAST_OVER, AT_RISK, ON_TRACK)


@dataclass(frozen=True, slots=True)
class DemoPlanning:
    month: Period
    as_of_ms: int
    forecast: ForecastReport
    model: str | None  # the model that served the most tokens; None: no tokens were served
    plan: PlanReport | None
    budgets_path: Path
    wanted_status: dict[str, str]  # team -> the status its demo budget was set to give
    budgets: BudgetReport
    requests: RequestsReport

    def tables(self) -> tuple[Tabular, ...]:
        out = [*self.forecast.table()]
        if self.plan is not None:
            out.extend(self.plan.table())
        out.extend(self.budgets.table())
        out.extend(self.requests.table())
        return tuple(out)


def busiest_model(by_model: ShowbackReport) -> str | None:
    """The model with the most tokens in the demo's showback by model."""
    served = [(line.tokens, line.key) for line in by_model.lines if line.tokens > 0]
    return max(served)[1] if served else None


def demo_budgets(fc: ForecastReport) -> tuple[str, dict[str, str]]:
    """A budgets file for the demo's teams (YAML text) and the status each budget gives:
    amounts in cents placed from the team's month to date, forecast and 80 % interval so that
    the largest team is over, the next forecast over, the next at risk and the rest on track."""
    teams = [line for line in fc.lines if line.line_kind == ALLOCATED]
    entries, wanted = [], {}
    for i, line in enumerate(teams):
        f = line.forecast
        status = STATUS_ORDER[min(i, len(STATUS_ORDER) - 1)]
        if status == OVER and f.month_to_date_usd >= Decimal("0.2"):
            amount = (f.month_to_date_usd * Decimal("0.9")).quantize(_CENT, ROUND_FLOOR)
        elif status == FORECAST_OVER and f.total_usd - f.month_to_date_usd >= 2 * _CENT:
            amount = f.total_usd.quantize(_CENT, ROUND_FLOOR)  # reached at 100 %, not yet spent
        elif status == AT_RISK and f.high80_usd - f.total_usd >= Decimal("0.1"):
            # 80 % of it lies between the forecast and the top of its 80 % interval.
            amount = ((f.total_usd + f.high80_usd) / 2 / Decimal("0.8")).quantize(_CENT)
        else:
            status = ON_TRACK
            amount = (max(f.high80_usd, _CENT) / Decimal("0.8") * 2).quantize(_CENT, ROUND_CEILING)
        wanted[line.key] = status
        entries.append(f"  - {{team: {json.dumps(line.key)}, monthly_usd: {amount}}}\n")
    text = (
        "# The demo's budgets, set from its forecast so that each status shows.\n"
        "thresholds_pct: [80, 100]\n"
        "budgets:\n" + ("".join(entries) if entries else "  []\n")
    )
    return text.replace("budgets:\n  []\n", "budgets: []\n"), wanted


def demo_planning(
    store: ClickHouseStore,
    period: Period,
    as_of_ms: int,
    by_model: ShowbackReport,
    price_book: PriceBook,
    folder: Path,
) -> DemoPlanning:
    """The planning reports as of `as_of_ms` (the end of `period`, all it metered): the forecast of
    the month it falls in, the plan for the busiest model over the demo's `period`, the teams
    against a budgets file written into `folder`, and request-based cost over `period`."""
    month = parse_month(format_ms(as_of_ms)[:7])
    fc = forecast(store, month, "team", now_ms=as_of_ms)
    model = busiest_model(by_model)
    scaled = (
        plan(store, period, model, growth=GROWTH, price_book=price_book)
        if model is not None
        else None
    )
    text, wanted = demo_budgets(fc)
    path = folder / BUDGETS_FILE
    path.write_text(text, encoding="utf-8")
    budgets = assess_budgets(load_budgets(path), {"team": fc}, month, as_of_ms=fc.as_of_ms)
    return DemoPlanning(
        month,
        as_of_ms,
        fc,
        model,
        scaled,
        path,
        wanted,
        budgets,
        requests_report(store, period, "team"),
    )

"""The demo's planning answers, from the data it just collected: the month-end forecast by
team, the cost of scaling its busiest model 3x, its teams against a budgets file, and what
request-based allocation would have charged each team. Each is the report its command prints;
nothing here computes a figure of its own."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from streams.pricing import PriceBook
from streams.reports.forecast_report import ForecastReport, forecast
from streams.reports.params import Period, format_ms, parse_month
from streams.reports.plan_data import PlanReport, plan
from streams.reports.render import Tabular
from streams.reports.showback import ShowbackReport
from streams.store import ClickHouseStore

GROWTH = Fraction(3)


@dataclass(frozen=True, slots=True)
class DemoPlanning:
    month: Period
    as_of_ms: int
    forecast: ForecastReport
    model: str | None  # the model that served the most tokens; None: no tokens were served
    plan: PlanReport | None

    def tables(self) -> tuple[Tabular, ...]:
        out = [*self.forecast.table()]
        if self.plan is not None:
            out.extend(self.plan.table())
        return tuple(out)


def busiest_model(by_model: ShowbackReport) -> str | None:
    """The model with the most tokens in the demo's showback by model."""
    served = [(line.tokens, line.key) for line in by_model.lines if line.tokens > 0]
    return max(served)[1] if served else None


def demo_planning(
    store: ClickHouseStore,
    period: Period,
    as_of_ms: int,
    by_model: ShowbackReport,
    price_book: PriceBook,
) -> DemoPlanning:
    """The planning reports as of `as_of_ms` (the end of the simulated time): the forecast of
    the month it falls in, and the plan for the busiest model over the demo's `period`."""
    month = parse_month(format_ms(as_of_ms)[:7])
    fc = forecast(store, month, "team", now_ms=as_of_ms)
    model = busiest_model(by_model)
    scaled = (
        plan(store, period, model, growth=GROWTH, price_book=price_book)
        if model is not None
        else None
    )
    return DemoPlanning(month, as_of_ms, fc, model, scaled)

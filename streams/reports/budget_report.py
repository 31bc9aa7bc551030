"""Budget report: each budgeted owner's month to date and month-end forecast (the forecast
report's, `streams.reports.forecast_report.forecast`) against its budget and thresholds, with
a status and the day the forecast reaches the budget. `assess` is pure; `budget_report` reads
the store through the forecast, one forecast per dimension the budgets name."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from streams.reports.budgets import Budget, Budgets
from streams.reports.forecast import MonthForecast
from streams.reports.forecast_report import ForecastReport, forecast
from streams.reports.money import round_total
from streams.reports.params import Period, format_ms
from streams.reports.render import Tabular, display, money
from streams.reports.showback import ALLOCATED
from streams.store import ClickHouseStore

ON_TRACK, AT_RISK, FORECAST_OVER, OVER = "on_track", "at_risk", "forecast_over", "over"
STATUSES = (ON_TRACK, AT_RISK, FORECAST_OVER, OVER)  # from best to worst
STATUS_TEXT = {
    ON_TRACK: "on track",
    AT_RISK: "at risk",
    FORECAST_OVER: "forecast over",
    OVER: "over",
}
NO_SPEND = "no_spend"  # the method of an owner the month has seen no spend of
_ZERO = Decimal(0)
_HUNDRED = Decimal(100)
_PCT_PLACES = Decimal("0.01")
_TENTH = Decimal("0.1")  # the table's, rounded once from the exact amounts


@dataclass(frozen=True, slots=True)
class BudgetLine:
    """One budget against its owner's month. Percentages are of the budget, to 0.01; the
    status compares the exact amounts."""

    budget: Budget
    forecast: MonthForecast
    status: str  # one of STATUSES
    threshold_pct: Decimal | None  # the highest threshold the status's amount reaches
    crosses_ms: int | None  # when the forecast path reaches the budget, if it does later

    @property
    def used_pct(self) -> Decimal:
        return _pct(self.forecast.month_to_date_usd, self.budget.monthly_usd)

    @property
    def forecast_pct(self) -> Decimal:
        return _pct(self.forecast.total_usd, self.budget.monthly_usd)


def _pct(amount: Decimal, of: Decimal, places: Decimal = _PCT_PLACES) -> Decimal:
    return (amount * _HUNDRED / of).quantize(places, ROUND_HALF_UP)


# The forecast of an owner the month has seen no spend of: nothing to extrapolate.
NO_SPEND_FORECAST = MonthForecast(
    _ZERO, _ZERO, _ZERO, _ZERO, _ZERO, _ZERO, NO_SPEND, "no spend this month so far", 0
)


def assess(
    budget: Budget, month_forecast: MonthForecast, *, as_of_ms: int, end_ms: int
) -> BudgetLine:
    """The status of `budget` given its owner's forecast made at `as_of_ms` of a month ending
    at `end_ms`:

    - over: the month to date is past the budget (threshold: the highest it reaches);
    - forecast over: the month-end forecast reaches a threshold;
    - at risk: the top of the forecast's 80 % interval reaches one;
    - on track: none of these.

    The forecast path runs straight from the month to date now to the forecast at the month's
    end (exact for a constant daily spend); `crosses_ms` is where it reaches the budget."""
    f, amount = month_forecast, budget.monthly_usd

    def reached(value: Decimal) -> Decimal | None:
        hits = [t for t in budget.thresholds_pct if value * _HUNDRED >= t * amount]
        return max(hits) if hits else None

    status, threshold = ON_TRACK, None
    if f.month_to_date_usd > amount:
        status, threshold = OVER, reached(f.month_to_date_usd)
    elif (hit := reached(f.total_usd)) is not None:
        status, threshold = FORECAST_OVER, hit
    elif (hit := reached(f.high80_usd)) is not None:
        status, threshold = AT_RISK, hit
    crosses_ms = None
    rest = f.total_usd - f.month_to_date_usd
    if f.month_to_date_usd < amount <= f.total_usd and rest > 0 and end_ms > as_of_ms:
        share = (amount - f.month_to_date_usd) / rest
        crosses_ms = as_of_ms + int(share * (end_ms - as_of_ms))
    return BudgetLine(budget, f, status, threshold, crosses_ms)


@dataclass(frozen=True, slots=True)
class BudgetReport:
    month: Period
    as_of_ms: int
    source: str  # the budgets file
    lines: tuple[BudgetLine, ...]

    def table(self) -> Sequence[Tabular]:
        headers = (
            "dimension",
            "owner",
            "status",
            "threshold",
            "budget",
            "to date",
            "used",
            "forecast",
            "80 %",
            "of budget",
            "reaches budget",
        )

        def row(line: BudgetLine) -> tuple[str, ...]:
            f = line.forecast
            return (
                line.budget.dimension.replace("_", " "),
                display(line.budget.owner),
                STATUS_TEXT[line.status],
                "-" if line.threshold_pct is None else f"{line.threshold_pct}%",
                money(line.budget.monthly_usd),
                money(round_total(f.month_to_date_usd)),
                f"{_pct(f.month_to_date_usd, line.budget.monthly_usd, _TENTH)}%",
                money(round_total(f.total_usd)),
                f"{money(round_total(f.low80_usd))}-{money(round_total(f.high80_usd))}",
                f"{_pct(f.total_usd, line.budget.monthly_usd, _TENTH)}%",
                _day(line.crosses_ms) or "-",
            )

        notes = (
            "over: the month to date is past the budget; forecast over: the month-end forecast "
            "reaches a threshold; at risk: the top of its 80 % interval does",
            "reaches budget: the day the forecast, taken straight from today's month to date "
            "to the month-end forecast, reaches the budget",
            *sorted(
                {
                    f"{line.budget.owner}: {line.forecast.method_text}"
                    for line in self.lines
                    if line.forecast.method == NO_SPEND
                }
            ),
        )
        title = (
            f"GPU spend against budgets ({self.source}), {format_ms(self.month.start_ms)[:7]}, "
            f"as of {format_ms(self.as_of_ms)}"
        )
        return (Tabular(title, headers, tuple(row(line) for line in self.lines), (), notes, 3),)

    def records(self) -> list[dict[str, Any]]:
        return [_record(line) for line in self.lines]

    def to_dict(self) -> dict[str, Any]:
        return {
            "report": "budget",
            "month": format_ms(self.month.start_ms)[:7],
            "as_of": format_ms(self.as_of_ms),
            "budgets": self.source,
            "lines": self.records(),
        }


def _day(time_ms: int | None) -> str | None:
    """The day spend reaches the budget: a path reaching it at midnight reached it on the day
    that midnight ends."""
    return None if time_ms is None else format_ms(time_ms - 1)[:10]


def _record(line: BudgetLine) -> dict[str, Any]:
    f = line.forecast
    return {
        "dimension": line.budget.dimension,
        "owner": line.budget.owner,
        "budget_usd": line.budget.monthly_usd,
        "month_to_date_usd": f.month_to_date_usd,
        "used_pct": line.used_pct,
        "forecast_usd": f.total_usd,
        "low80_usd": f.low80_usd,
        "high80_usd": f.high80_usd,
        "low95_usd": f.low95_usd,
        "high95_usd": f.high95_usd,
        "forecast_pct": line.forecast_pct,
        "status": line.status,
        "threshold_pct": line.threshold_pct,
        "thresholds_pct": " ".join(str(t) for t in line.budget.thresholds_pct),
        "reaches_budget_on": _day(line.crosses_ms),
        "method": f.method,
    }


def owner_forecasts(report: ForecastReport) -> dict[str, MonthForecast]:
    """The forecast of each owner (allocated line) of a forecast report, by its key."""
    return {line.key: line.forecast for line in report.lines if line.line_kind == ALLOCATED}


def assess_budgets(
    budgets: Budgets, forecasts: Mapping[str, ForecastReport], month: Period, *, as_of_ms: int
) -> BudgetReport:
    """Every budget against its dimension's forecast report (`forecasts[dimension]`, made as
    of `as_of_ms`); an owner with no line there has had no spend this month."""
    by_dimension = {dim: owner_forecasts(report) for dim, report in forecasts.items()}
    lines = tuple(
        assess(
            budget,
            by_dimension[budget.dimension].get(budget.owner, NO_SPEND_FORECAST),
            as_of_ms=as_of_ms,
            end_ms=month.end_ms,
        )
        for budget in budgets.budgets
    )
    return BudgetReport(month, as_of_ms, budgets.source, lines)


def forecasts_of(
    store: ClickHouseStore,
    budgets: Budgets,
    month: Period,
    *,
    now_ms: int,
    use_rollups: bool = True,
) -> dict[str, ForecastReport]:
    """The month-end forecast by each dimension the budgets name."""
    return {
        dim: forecast(store, month, dim, now_ms=now_ms, use_rollups=use_rollups)
        for dim in budgets.dimensions
    }


def budget_report(
    store: ClickHouseStore,
    budgets: Budgets,
    month: Period,
    *,
    now_ms: int,
    use_rollups: bool = True,
) -> BudgetReport:
    """`budgets` against the month so far of `month` as of `now_ms` (the forecast's month to
    date: [month start, min(now, month end)))."""
    forecasts = forecasts_of(store, budgets, month, now_ms=now_ms, use_rollups=use_rollups)
    as_of_ms = max(month.start_ms, min(now_ms, month.end_ms))
    return assess_budgets(budgets, forecasts, month, as_of_ms=as_of_ms)

"""Forecast report: each showback line's month-end spend (team, product, model, namespace or
cost centre, with the untagged, host and idle lines) from the month so far, with prediction
intervals, and the fleet total, whose month to date is showback's total for the same span."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from streams.reports.forecast import MonthForecast, forecast_month_end
from streams.reports.limits import MAX_SERIES_POINTS, query_bounded
from streams.reports.money import round_total
from streams.reports.params import DAY_MS, DIMENSIONS, Period, check_choice, check_period, format_ms
from streams.reports.render import Tabular, display, money
from streams.reports.showback import (
    ALLOCATED,
    HOST_LINE,
    IDLE_LINE,
    NO_MODEL,
    NO_MODEL_LINE,
    UNTAGGED_LINE,
)
from streams.reports.sources import cost_source, read_plan, token_source
from streams.rows import KIND_HOST, KIND_IDLE, UNKNOWN, UNTAGGED
from streams.store import ClickHouseStore

_ZERO = Decimal(0)
_LABELS = {
    IDLE_LINE: "(idle GPU time)",
    HOST_LINE: "(host processes, no pod)",
    NO_MODEL_LINE: "(no model)",
}


@dataclass(frozen=True, slots=True)
class ForecastLine:
    key: str
    line_kind: str  # allocated | no_model | untagged | host | idle | total
    forecast: MonthForecast

    @property
    def label(self) -> str:
        if self.line_kind == "total":
            return "total (all metered GPU cost)"
        return _LABELS.get(self.line_kind) or display(self.key)


@dataclass(frozen=True, slots=True)
class ForecastReport:
    month: Period
    by: str
    as_of_ms: int
    lines: tuple[ForecastLine, ...]
    total: ForecastLine

    def table(self) -> Sequence[Tabular]:
        headers = (self.by.replace("_", " "), "to date", "forecast", "80 %", "95 %", "method")

        def row(line: ForecastLine) -> tuple[str, ...]:
            f = line.forecast
            return (
                line.label,
                money(round_total(f.month_to_date_usd)),
                money(round_total(f.total_usd)),
                f"{money(round_total(f.low80_usd))}-{money(round_total(f.high80_usd))}",
                f"{money(round_total(f.low95_usd))}-{money(round_total(f.high95_usd))}",
                f.method,
            )

        notes = (
            f"total: {self.total.forecast.method_text}",
            "each line is forecast on its own series: the lines' forecasts need not add up to "
            "the total's; the month to date does, exactly",
            *sorted(
                {
                    f"{line.forecast.method}: {line.forecast.fallback}"
                    for line in self.lines
                    if line.forecast.fallback
                }
            ),
        )
        title = (
            f"Month-end GPU spend forecast by {self.by.replace('_', ' ')}, "
            f"{format_ms(self.month.start_ms)[:7]}, as of {format_ms(self.as_of_ms)}"
        )
        return (
            Tabular(
                title,
                headers,
                tuple(row(line) for line in self.lines),
                (row(self.total),),
                notes,
            ),
        )

    def records(self) -> list[dict[str, Any]]:
        return [_record(self.by, line) for line in (*self.lines, self.total)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "report": "forecast",
            "month": format_ms(self.month.start_ms)[:7],
            "as_of": format_ms(self.as_of_ms),
            "by": self.by,
            "lines": [_record(self.by, line) for line in self.lines],
            "total": _record(self.by, self.total),
        }


def _record(by: str, line: ForecastLine) -> dict[str, Any]:
    f = line.forecast
    return {
        by: line.key,
        "label": line.label,
        "line_kind": line.line_kind,
        "month_to_date_usd": f.month_to_date_usd,
        "forecast_usd": f.total_usd,
        "low80_usd": f.low80_usd,
        "high80_usd": f.high80_usd,
        "low95_usd": f.low95_usd,
        "high95_usd": f.high95_usd,
        "method": f.method,
        "method_text": f.method_text,
        "fallback": f.fallback,
        "days_of_history": f.days_of_history,
    }


def forecast(
    store: ClickHouseStore, month: Period, by: str, *, now_ms: int, use_rollups: bool = True
) -> ForecastReport:
    """The month-end forecast of `month` (a billing month, `params.parse_month`) as of
    `now_ms`: the month so far is [month start, min(now, month end))."""
    check_choice(by, DIMENSIONS, "--by")
    check_period(month)
    end_ms = max(month.start_ms, min(now_ms, month.end_ms))
    db = store.database
    plan = read_plan(store, month.start_ms, end_ms, use_rollups=use_rollups)
    costs, tokens = cost_source(db, plan), token_source(db, plan)
    start_s = month.start_ms // 1000
    day_sql = f"intDiv(toUnixTimestamp(hour) - {start_s}, 86400)"
    dim = "''" if by == "model" else by
    key_sql = f"if(kind IN ({KIND_IDLE!r}, {KIND_HOST!r}), '', {dim})"
    what, narrow = f"forecast by {by}", "give a coarser --by"
    rows = query_bounded(
        store,
        f"SELECT {key_sql} AS key, kind, {day_sql} AS day, sum(cost_usd) FROM {costs} "
        "GROUP BY key, kind, day",
        limit=MAX_SERIES_POINTS,
        what=what,
        narrow=narrow,
    )
    series: dict[tuple[str, str], dict[int, Decimal]] = {}
    fleet: dict[int, Decimal] = {}
    for key, kind, day, cost in rows:
        line_kind = _classify(kind, key)
        if by == "model" and line_kind in (ALLOCATED, UNTAGGED_LINE):
            line_kind, key = NO_MODEL_LINE, NO_MODEL  # models take their part below
        group = key if line_kind in (ALLOCATED, UNTAGGED_LINE, NO_MODEL_LINE) else ""
        days = series.setdefault((line_kind, group), {})
        days[int(day)] = days.get(int(day), _ZERO) + cost
        fleet[int(day)] = fleet.get(int(day), _ZERO) + cost
    if by == "model":
        # The cost of the pods that served a model's tokens is the model's (showback's rule);
        # the rest of the pods' cost stays on (no model).
        token_rows = query_bounded(
            store,
            f"SELECT model, {day_sql} AS day, sum(cost_usd) FROM {tokens} GROUP BY model, day",
            limit=MAX_SERIES_POINTS,
            what=what,
            narrow=narrow,
        )
        rest = series.setdefault((NO_MODEL_LINE, NO_MODEL), {})
        for model, day, cost in token_rows:
            days = series.setdefault((ALLOCATED, model), {})
            days[int(day)] = days.get(int(day), _ZERO) + cost
            rest[int(day)] = rest.get(int(day), _ZERO) - cost
    profile = _day_profile(store, costs, start_s, end_ms)
    elapsed_days, into_today_ms = divmod(end_ms - month.start_ms, DAY_MS)
    days_in_month = (month.end_ms - month.start_ms) // DAY_MS
    metered_from_h = (metered_from_ms(store, costs, month.start_ms) - month.start_ms) / 3_600_000

    def one(days: dict[int, Decimal]) -> MonthForecast:
        return forecast_month_end(
            [days.get(d, _ZERO) for d in range(elapsed_days)],
            days.get(elapsed_days, _ZERO),
            hours_into_today=into_today_ms / 3_600_000,
            days_in_month=days_in_month,
            day_profile=profile,
            metered_from_hours=metered_from_h,
        )

    lines = [ForecastLine(key, kind, one(days)) for (kind, key), days in series.items()]
    lines.sort(key=lambda line: (-line.forecast.total_usd, line.line_kind, line.key))
    return ForecastReport(month, by, end_ms, tuple(lines), ForecastLine("", "total", one(fleet)))


def _classify(kind: str, key: str) -> str:
    if kind == KIND_IDLE:
        return IDLE_LINE
    if kind == KIND_HOST:
        return HOST_LINE
    return UNTAGGED_LINE if key in (UNTAGGED, UNKNOWN) else ALLOCATED


def metered_from_ms(store: ClickHouseStore, costs: str, start_ms: int) -> int:
    """When metering began this month: the first hour with cost (rollups or windows), to the
    window where its windows are still kept (a ledger that began at 22:11 has metered 10
    minutes by 22:21, not 21); the month's start when nothing was metered."""
    db = store.database
    [(first_s, hours)] = store.query_rows(
        f"SELECT toUnixTimestamp(min(hour)), count() FROM {costs}"
    )
    if not hours:
        return start_ms
    hour_ms = int(first_s) * 1000
    [(first_ms, windows)] = store.query_rows(
        f"SELECT toUnixTimestamp64Milli(min(window_start)), count() FROM {db}.gpu_cost_windows "
        f"WHERE window_start >= fromUnixTimestamp64Milli({hour_ms}) "
        f"AND window_start < fromUnixTimestamp64Milli({hour_ms + 3_600_000})"
    )
    return max(start_ms, int(first_ms) if windows else hour_ms)


def _day_profile(store: ClickHouseStore, costs: str, start_s: int, end_ms: int) -> list[float]:
    """Fleet spend per hour of the day over the last 7 complete days of the month so far: how
    much of a day is still to come for every line (one profile: 24 rows, not 24 per line)."""
    today_s = start_s + (end_ms // 1000 - start_s) // 86400 * 86400
    rows = store.query_rows(
        f"SELECT toHour(hour), toFloat64(sum(cost_usd)) FROM {costs} "
        f"WHERE toUnixTimestamp(hour) >= {max(start_s, today_s - 7 * 86400)} "
        f"AND toUnixTimestamp(hour) < {today_s} GROUP BY 1"
    )
    profile = [0.0] * 24
    for hour, cost in rows:
        profile[int(hour)] = float(cost or 0.0)
    return profile

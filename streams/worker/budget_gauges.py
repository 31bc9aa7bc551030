"""`BudgetGauges`: the worker's loop that recomputes, every interval, each budget and the
month-end forecast of every owner of the budgets' dimensions (the forecast report's own
`forecast`), for the `gpuledger_budget_*` and `gpuledger_forecast_*` gauges. It runs in a
thread on a read-only connection of its own, so the event loop and the writer never wait for
it; a failed refresh is logged and counted and the gauges keep their last values."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from streams.metrics import BudgetValues, OwnerForecast, WorkerMetrics
from streams.reports.budget_report import NO_SPEND_FORECAST, forecasts_of, owner_forecasts
from streams.reports.budgets import Budgets
from streams.reports.forecast import MonthForecast
from streams.reports.params import format_ms, parse_month
from streams.store import ClickHouseStore

log = logging.getLogger("gpuledger.worker.budgets")

BUDGET_INTERVAL_S = 300.0
MIN_REFRESH_LIMIT_S = 30.0  # the reports' own default time limit


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


class BudgetGauges:
    """Owns the refresh loop (`run`); each refresh reads on a read-only connection of its
    own."""

    def __init__(
        self,
        store: ClickHouseStore,
        budgets: Budgets,
        metrics: WorkerMetrics,
        *,
        interval_s: float = BUDGET_INTERVAL_S,
        clock_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"the budget interval must be positive, not {interval_s}")
        self.store = store  # the worker's: only its reader() is used here
        self.budgets = budgets
        self.metrics = metrics
        self.interval_s = interval_s
        self.clock_ms = clock_ms
        self.refreshes = 0  # successful ones
        self.failures = 0

    async def run(self, stopping: asyncio.Event) -> None:
        """Refresh now and then every `interval_s` until `stopping` is set."""
        while not stopping.is_set():
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=self.interval_s)

    async def refresh(self) -> bool:
        """One refresh in a thread; False (logged, counted) when it failed."""
        try:
            budgets, owners, now_s = await asyncio.to_thread(self._compute)
        except Exception as exc:  # a refresh must never end the worker, whatever failed
            self.failures += 1
            self.metrics.budget_refresh_failed()
            log.warning("refreshing the budget and forecast gauges failed: %s", exc)
            return False
        self.metrics.budgets_refreshed(budgets, owners, now_s)  # on the loop, as every hook
        self.refreshes += 1
        return True

    def _compute(self) -> tuple[list[BudgetValues], list[OwnerForecast], float]:
        """The gauges' values as of now (in a thread: it reads the store and fits models)."""
        now_ms = self.clock_ms()
        month = parse_month(format_ms(now_ms)[:7])
        # A connection of its own for each refresh, opened and closed in this thread: the
        # event loop never waits on its lock, even while a query of a refresh still runs.
        reader = self.store.reader()
        try:
            # Stopped by ClickHouse past the interval (the next refresh is due by then), but
            # never sooner than a report may take.
            with reader.time_limit(max(self.interval_s, MIN_REFRESH_LIMIT_S)):
                forecasts = forecasts_of(reader, self.budgets, month, now_ms=now_ms)
        finally:
            reader.close()
        budgets = [
            BudgetValues(b.dimension, b.owner, b.monthly_usd, b.thresholds_pct)
            for b in self.budgets.budgets
        ]
        owners = [
            OwnerForecast(
                dimension,
                owner,
                f.month_to_date_usd,
                f.total_usd,
                f.low80_usd,
                f.high80_usd,
                f.low95_usd,
                f.high95_usd,
            )
            for dimension, report in forecasts.items()
            for owner, f in _with_budgeted(owner_forecasts(report), self.budgets, dimension).items()
        ]
        return budgets, owners, now_ms / 1000


def _with_budgeted(
    seen: dict[str, MonthForecast], budgets: Budgets, dimension: str
) -> dict[str, MonthForecast]:
    """Every owner the forecast saw, and each budgeted one it did not (no spend yet: 0)."""
    for budget in budgets.of(dimension):
        seen.setdefault(budget.owner, NO_SPEND_FORECAST)
    return seen

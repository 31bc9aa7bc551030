"""The worker's budget and forecast gauges on /metrics: a real worker on the embedded broker
and the real ClickHouse engine, over a generated month with a constant daily spend, so every
gauge's value is known; a refresh that fails is counted and the worker runs on."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from test_read_endpoints import free_port
from test_reports_budget import DAYS, month_rows
from test_reports_data import HOUR_MS, T0_MS

from gpuledger.embedded_broker import EmbeddedBroker
from runtime.kafka import KafkaSettings
from streams.metrics import WorkerMetrics
from streams.pricing import EXAMPLE_PRICE_BOOK, load_price_book
from streams.reports.budgets import parse_budgets
from streams.store import ClickHouseStore
from streams.worker.app import Worker, WorkerConfig
from streams.worker.budget_gauges import BudgetGauges

pytestmark = pytest.mark.kafka
AS_OF_MS = T0_MS + DAYS * 24 * HOUR_MS  # 2026-11-11T00:00:00Z
BUDGETS = parse_budgets(
    """
budgets:
  - {team: search, monthly_usd: 4000}
  - {team: ghost, monthly_usd: 500, thresholds_pct: [50, 90]}
  - {cost_center: cc-1, monthly_usd: 1000}
""",
    source="budgets.yaml",
)


@pytest.fixture
def tansu() -> Iterator[str]:
    broker = EmbeddedBroker()
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(("gpuledger_budget", "gpuledger_forecast"))
    }


def owner(dimension: str, name: str, **more: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"dimension": dimension, "owner": name, **more}.items()))


async def test_the_gauges_appear_on_metrics_with_the_known_values(
    tansu: str, store: ClickHouseStore
) -> None:
    store.insert_rows(month_rows())  # search 120 a day (cc-1), recs 60 a day (cc-2)
    port = free_port()
    config = WorkerConfig(
        kafka=KafkaSettings(bootstrap=tansu),
        clickhouse_dsn="unused",
        partitions=1,
        http_port=port,
        budgets=BUDGETS,
        budget_interval_s=0.5,
    )
    worker = Worker(config, load_price_book(EXAMPLE_PRICE_BOOK), store=store)
    assert worker.budget_gauges is not None
    worker.budget_gauges.clock_ms = lambda: AS_OF_MS  # the month as of its 11th day
    run = asyncio.create_task(worker.run())
    try:
        got: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                await asyncio.sleep(0.2)
                assert not run.done(), run
                try:
                    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                        got = samples(await response.text())
                except aiohttp.ClientConnectionError:
                    continue
                if ("gpuledger_budget_usd", owner("team", "search")) in got:
                    break
        assert worker.budget_gauges.failures == 0
        threshold = "gpuledger_budget_threshold_usd"
        expected = {
            ("gpuledger_budget_usd", owner("team", "search")): 4000.0,
            ("gpuledger_budget_usd", owner("team", "ghost")): 500.0,
            ("gpuledger_budget_usd", owner("cost_center", "cc-1")): 1000.0,
            (threshold, owner("team", "search", threshold_pct="80")): 3200.0,
            (threshold, owner("team", "search", threshold_pct="100")): 4000.0,
            (threshold, owner("team", "ghost", threshold_pct="50")): 250.0,
            (threshold, owner("team", "ghost", threshold_pct="90")): 450.0,
            (threshold, owner("cost_center", "cc-1", threshold_pct="80")): 800.0,
            (threshold, owner("cost_center", "cc-1", threshold_pct="100")): 1000.0,
        }
        # Every owner of the budgets' dimensions, with a budget or not (recs, cc-2 have none).
        for dimension, name, to_date, month_end in (
            ("team", "search", 1200.0, 3600.0),
            ("team", "recs", 600.0, 1800.0),
            ("team", "ghost", 0.0, 0.0),
            ("cost_center", "cc-1", 1200.0, 3600.0),
            ("cost_center", "cc-2", 600.0, 1800.0),
        ):
            labels = owner(dimension, name)
            expected[("gpuledger_budget_month_to_date_usd", labels)] = to_date
            for suffix in ("", "_low80", "_high80", "_low95", "_high95"):
                expected[(f"gpuledger_forecast{suffix}_usd", labels)] = month_end
        refreshed = got.pop(("gpuledger_budget_last_refresh_timestamp_seconds", ()))
        assert refreshed == AS_OF_MS / 1000
        assert got.pop(("gpuledger_budget_refresh_failures_total", ())) == 0
        got.pop(("gpuledger_budget_refresh_failures_created", ()), None)
        assert got == expected
    finally:
        worker.stop()
        await asyncio.wait_for(run, timeout=60)


async def test_a_failed_refresh_is_counted_and_not_fatal(chdb_dsn: str) -> None:
    # A database that does not exist: every forecast query fails in the engine.
    missing = ClickHouseStore(chdb_dsn, database="t_no_such_database")
    registry = CollectorRegistry()
    gauges = BudgetGauges(
        missing, BUDGETS, WorkerMetrics(registry), interval_s=0.05, clock_ms=lambda: AS_OF_MS
    )
    stopping = asyncio.Event()
    loop = asyncio.create_task(gauges.run(stopping))
    for _ in range(100):
        await asyncio.sleep(0.05)
        if gauges.failures >= 2:
            break
    stopping.set()
    await asyncio.wait_for(loop, timeout=10)  # it ends when asked, not before
    assert gauges.failures >= 2 and gauges.refreshes == 0
    assert registry.get_sample_value("gpuledger_budget_refresh_failures_total") == gauges.failures
    assert (
        registry.get_sample_value("gpuledger_budget_usd", {"dimension": "team", "owner": "search"})
        is None
    )
    missing.close()

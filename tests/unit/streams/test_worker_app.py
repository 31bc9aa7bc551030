"""`supervise`: the worker's loops as one task group (no broker needed)."""

from __future__ import annotations

import asyncio

import pytest

from runtime.errors import StoreError
from runtime.kafka import KafkaSettings
from streams.pricing import EXAMPLE_PRICE_BOOK, load_price_book
from streams.worker.app import Worker, WorkerConfig, supervise


async def _until(stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        await asyncio.sleep(0.01)


async def test_a_loop_that_raises_stops_the_others_and_its_error_propagates() -> None:
    stopping = asyncio.Event()
    cancelled = asyncio.Event()

    async def healthy() -> None:
        try:
            await _until(stopping)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def dies() -> None:
        await asyncio.sleep(0.05)
        raise ValueError("broken loop")

    with pytest.raises(ValueError, match="broken loop"):
        await asyncio.wait_for(supervise({"a": healthy(), "b": dies()}, stopping, 5), 5)
    assert cancelled.is_set()


async def test_a_loop_that_returns_before_the_stop_is_an_error() -> None:
    stopping = asyncio.Event()

    async def returns() -> None:
        await asyncio.sleep(0.01)

    with pytest.raises(RuntimeError, match="quitter loop ended"):
        await asyncio.wait_for(supervise({"quitter": returns()}, stopping, 5), 5)


async def test_a_stop_lets_loops_finish_and_cancels_those_that_do_not() -> None:
    stopping = asyncio.Event()
    finished: list[str] = []

    async def polite() -> None:
        await _until(stopping)
        finished.append("polite")

    async def stubborn() -> None:
        await asyncio.sleep(3600)

    asyncio.get_running_loop().call_later(0.05, stopping.set)
    began = asyncio.get_running_loop().time()
    await asyncio.wait_for(supervise({"a": polite(), "b": stubborn()}, stopping, 0.2), 5)
    assert finished == ["polite"]
    assert asyncio.get_running_loop().time() - began < 2


class _UnreachableStore:
    """A ClickHouse that refuses `failures` times, as an unreachable server does, then works."""

    def __init__(self, failures: int, *, retriable: bool = True) -> None:
        self.failures = failures
        self.retriable = retriable
        self.calls = 0

    def create_schema(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise StoreError("connection refused", retriable=self.retriable)


def _worker(store: _UnreachableStore) -> Worker:
    config = WorkerConfig(kafka=KafkaSettings(), clickhouse_dsn="http://127.0.0.1:1/db")
    return Worker(config, load_price_book(EXAMPLE_PRICE_BOOK), store=store)  # type: ignore[arg-type]


async def test_a_worker_started_during_a_clickhouse_outage_waits_for_it() -> None:
    store = _UnreachableStore(failures=2)
    assert await asyncio.wait_for(_worker(store)._create_schema(), 5) is True
    assert store.calls == 3


async def test_a_permanent_schema_error_ends_the_start_and_a_stop_ends_the_wait() -> None:
    with pytest.raises(StoreError):
        await _worker(_UnreachableStore(failures=1, retriable=False))._create_schema()
    waiting = _worker(_UnreachableStore(failures=10**6))
    task = asyncio.create_task(waiting._create_schema())
    await asyncio.sleep(0.3)
    waiting.stop()
    assert await asyncio.wait_for(task, 5) is False

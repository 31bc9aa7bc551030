"""The sinks' failure policy on the real engines: ClickHouse's refusals classified from the
errors chDB raises, a batch over the partitions limit, a dead letter over the broker's size
limit, /healthz during an outage, and a rebalance while ClickHouse is down."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
from typing import Any

import aiohttp
import orjson
import pytest
from clickhouse_connect.driver.exceptions import OperationalError
from row_builders import cost_row
from test_worker_e2e import (
    assert_matches_core,
    broker,  # noqa: F401 - fixture
    make_worker,
    read_topic,
    run_worker,
    stored,
)
from worker_scenario import comparable, expected_rows, gpu_samples, publish, publish_scenario

from gpuledger.embedded_broker import free_port
from runtime.errors import StoreError
from schemas.events import DEAD_LETTER_TOPIC, GPU_SAMPLES_TOPIC, CloudEvent, GpuSample, make_event
from streams.store import ClickHouseStore
from streams.worker.app import Worker

REFUSED = "Error HTTPConnectionPool(host='clickhouse', port=8123): Connection refused"


def _month_ms(index: int, second: int = 30) -> int:
    year, month = 2015 + index // 12, index % 12 + 1
    moment = datetime.datetime(year, month, 1, 0, 0, second, tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1000)


def test_chdb_refusals_are_not_retriable(store: ClickHouseStore) -> None:
    """The texts and codes chDB gives, provoked: none of these passes on a retry."""
    with pytest.raises(StoreError, match="Too many partitions for single INSERT block") as many:
        store.insert_rows([cost_row(_month_ms(i, 0)) for i in range(101)])
    with pytest.raises(StoreError, match="could not convert string to float") as mismatch:
        store.insert_rows([cost_row(_month_ms(0, 0), device_seconds="abc")])
    with pytest.raises(StoreError, match="Unable to create native array") as negative:
        store.insert_rows([cost_row(_month_ms(0, 0), version=-1)])
    with pytest.raises(StoreError, match="Unrecognized column") as unknown_column:
        store._insert("gpu_cost_windows", ["no_such_column"], [(1,)], {})
    with pytest.raises(StoreError, match=r"Syntax error") as syntax:
        store.command("SELEC 1")
    for refused in (many, mismatch, negative, unknown_column, syntax):
        assert refused.value.retriable is False
    store.insert_rows([cost_row(_month_ms(i, 0)) for i in range(100)])  # at the limit: stored


def _monthly_samples(months: int) -> list[CloudEvent[GpuSample]]:
    """One sample of one device on the first day of each of `months` months."""
    base = gpu_samples()[0].data
    return [
        make_event(base, event_id=f"monthly-{i}", source="agent/n1", time_ms=_month_ms(i))
        for i in range(months)
    ]


@pytest.mark.kafka
async def test_samples_in_more_months_than_the_partitions_limit_are_stored(
    broker: str,  # noqa: F811
    store: ClickHouseStore,
) -> None:
    """ClickHouse refuses an insert block spanning more than 100 partitions (months): the
    sink inserts the batch one partition at a time instead of retrying it forever."""
    samples = _monthly_samples(130)
    await publish(broker, GPU_SAMPLES_TOPIC, samples, lambda ev: ev.data.device_uuid)
    client = store._client
    real_insert = client.insert
    refusals: list[str] = []

    def watched_insert(*args: Any, **kwargs: Any) -> Any:
        try:
            return real_insert(*args, **kwargs)
        except Exception as exc:
            refusals.append(str(exc))
            raise

    client.insert = watched_insert
    worker = make_worker(broker, store)
    try:
        await run_worker(worker, timeout_s=60)  # before: the same batch retried forever
    finally:
        client.insert = real_insert
    assert refusals and all("Too many partitions" in r for r in refusals)
    cost, _, _ = stored(store)
    want, _, _ = expected_rows(samples, [], [])
    assert len({r.window_start_ms for r in cost}) == 130
    assert comparable(cost) == comparable(want)
    assert await read_topic(broker, DEAD_LETTER_TOPIC) == []
    assert worker.unhealthy_sinks() == {}


@pytest.mark.kafka
async def test_a_dead_letter_over_the_brokers_size_limit_is_sent_without_the_bytes(
    broker: str,  # noqa: F811
    store: ClickHouseStore,
) -> None:
    """A 900 kB garbage sample fits the broker; its dead letter (base64) does not."""
    await publish_scenario(broker)
    await publish_raw_keyed(broker, GPU_SAMPLES_TOPIC, b"{" * 900_000)
    await run_worker(make_worker(broker, store), timeout_s=60)  # before: retried forever
    letters = [(k, orjson.loads(v)) for k, v in await read_topic(broker, DEAD_LETTER_TOPIC)]
    [(key, letter)] = letters
    assert key is not None and key.startswith(f"{GPU_SAMPLES_TOPIC}|".encode())
    assert letter["topic"] == GPU_SAMPLES_TOPIC and letter["value_base64"] is None
    assert "original bytes omitted" in letter["detail"]
    assert_matches_core(store)


async def publish_raw_keyed(bootstrap: str, topic: str, value: bytes) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=2_000_000)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"GPU-h100-a")
    finally:
        await producer.stop()


async def _healthz(session: aiohttp.ClientSession, port: int) -> tuple[int, dict[str, Any]]:
    try:
        async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
            return response.status, await response.json()
    except aiohttp.ClientError:
        return 0, {}


async def _wait_for_status(port: int, status: int, within_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            got, body = await _healthz(session, port)
            if got == status:
                return body
            await asyncio.sleep(0.1)
    raise AssertionError(f"/healthz did not answer {status} within {within_s} s")


@pytest.mark.kafka
async def test_healthz_is_unhealthy_after_consecutive_failures_and_ok_again_after(
    broker: str,  # noqa: F811
    store: ClickHouseStore,
) -> None:
    await publish_scenario(broker)
    client = store._client
    real_insert = client.insert
    down = {"now": True}

    def flaky_insert(*args: Any, **kwargs: Any) -> Any:
        if down["now"]:
            raise OperationalError(REFUSED)
        return real_insert(*args, **kwargs)

    client.insert = flaky_insert
    port = free_port()
    worker = make_worker(broker, store, unhealthy_after_failures=3)
    worker.config = dataclasses.replace(worker.config, http_port=port)
    task = asyncio.create_task(run_worker(worker, timeout_s=120))
    try:
        body = await _wait_for_status(port, 503, 30)
        assert body["status"] == "unhealthy" and "open_windows" in body
        clickhouse = body["sinks"]["clickhouse"]
        assert clickhouse["consecutive_failures"] >= 3
        assert "Connection refused" in clickhouse["last_error"]
        assert body["reason"].startswith("clickhouse: ")
        down["now"] = False
        body = await _wait_for_status(port, 200, 60)
        assert set(body) == {"status", "open_windows"} and body["status"] == "ok"
        await task
    finally:
        client.insert = real_insert
        worker.stop()
        await asyncio.gather(task, return_exceptions=True)
    assert_matches_core(store)


def _shared(first: Worker, second: Worker) -> bool:
    """Whether both workers are members of both groups' current generation: each stage of each
    holds partitions, and no partition is held by both."""
    if len(first.runners) != 2 or len(second.runners) != 2:
        return False
    for mine, theirs in zip(first.runners, second.runners, strict=True):
        a, b = mine.consumer.assignment(), theirs.consumer.assignment()
        if not a or not b or a & b:
            return False
    return True


@pytest.mark.kafka
async def test_a_rebalance_during_a_clickhouse_outage_does_not_stall_the_group(
    broker: str,  # noqa: F811
    store: ClickHouseStore,
) -> None:
    """ClickHouse goes down at the first insert; a second worker joins while it is down. The
    first worker's revoke must not wait for the outage: the second gets its partitions while
    ClickHouse is still down, both finish once it is back, and the rows are the core's."""
    await publish_scenario(broker)
    loop = asyncio.get_running_loop()
    client = store._client
    real_insert = client.insert
    state: dict[str, Any] = {"down": None, "failed": 0}
    outage = asyncio.Event()

    def flaky_insert(*args: Any, **kwargs: Any) -> Any:
        if state["down"] is None:
            state["down"] = True
            loop.call_soon_threadsafe(outage.set)
        if state["down"]:
            state["failed"] += 1
            raise OperationalError(REFUSED)
        return real_insert(*args, **kwargs)

    client.insert = flaky_insert
    first = make_worker(broker, store, exit_when_idle_s=4.0)
    second = make_worker(broker, store, exit_when_idle_s=4.0)
    tasks = [asyncio.create_task(run_worker(first, timeout_s=150))]
    try:
        await asyncio.wait_for(outage.wait(), 60)
        while state["failed"] < 2:  # the first worker retries its write
            await asyncio.sleep(0.05)
        tasks.append(asyncio.create_task(run_worker(second, timeout_s=150)))
        # Before, the first worker's revoke waited for the outage to end: the group stalled
        # until the broker dropped that worker for its missed heartbeats.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _shared(first, second):
            await asyncio.sleep(0.1)
        joined_during_outage = _shared(first, second)
        state["down"] = False  # ClickHouse is back
        began = time.monotonic()
        await asyncio.gather(*tasks)
        finished_in_s = time.monotonic() - began
    finally:
        client.insert = real_insert
        first.stop()
        second.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert joined_during_outage
    assert state["failed"] > 0
    assert finished_in_s < 60
    assert first.runners[0].records > 0 and second.runners[0].records > 0
    assert_matches_core(store)

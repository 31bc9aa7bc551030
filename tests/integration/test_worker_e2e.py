"""The worker end to end on a real broker and the real ClickHouse engine.

Each test gets a broker of its own (topic names are fixed by the spec), the session's chDB
folder with a database of its own, and checks every row against the allocation core.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import orjson
import pytest
from kafka_broker import DEFAULT_LIBS_DIR, KafkaBroker, fetch_kafka_libs
from prometheus_client import CollectorRegistry
from worker_scenario import (
    comparable,
    expected_rows,
    gpu_samples,
    pod_events,
    publish,
    publish_raw,
    publish_scenario,
    read_topic,
    token_events,
)

from gpuledger.embedded_broker import EmbeddedBroker
from runtime.kafka import KafkaSettings
from schemas.events import (
    COST_WINDOWS_TOPIC,
    DEAD_LETTER_TOPIC,
    GPU_SAMPLES_TOPIC,
    PODS_TOPIC,
    TOKENS_TOPIC,
)
from streams.pricing import EXAMPLE_PRICE_BOOK, load_price_book
from streams.rows import CostRow, TokenCostRow, TokenRow
from streams.store import ClickHouseStore
from streams.worker.app import Worker, WorkerConfig
from streams.worker.device_stage import StreamSettings

pytestmark = pytest.mark.kafka


@pytest.fixture
def broker() -> Iterator[str]:
    if not DEFAULT_LIBS_DIR.exists():
        fetch_kafka_libs()
    with KafkaBroker(DEFAULT_LIBS_DIR) as kafka:
        yield kafka.bootstrap


def make_worker(bootstrap: str, store: ClickHouseStore, **overrides: Any) -> Worker:
    stream = StreamSettings(idle_flush_s=overrides.pop("idle_flush_s", 2.0))
    config = WorkerConfig(
        kafka=KafkaSettings(bootstrap=bootstrap),
        clickhouse_dsn="unused",
        stream=stream,
        partitions=overrides.pop("partitions", 2),
        http_port=0,
        exit_when_idle_s=overrides.pop("exit_when_idle_s", 3.0),
        flush_interval_s=0.3,
        **overrides,
    )
    return Worker(
        config, load_price_book(EXAMPLE_PRICE_BOOK), store=store, registry=CollectorRegistry()
    )


async def run_worker(worker: Worker, timeout_s: float = 90) -> None:
    await asyncio.wait_for(worker.run(), timeout=timeout_s)


def stored(store: ClickHouseStore) -> tuple[list[CostRow], list[TokenRow], list[TokenCostRow]]:
    def read(row_type: Any) -> list[Any]:
        out = []
        for d in store.query_dicts(f"SELECT * FROM {store.database}.{row_type.TABLE} FINAL"):
            d["window_start_ms"] = int(d.pop("window_start").timestamp() * 1000)
            d["window_end_ms"] = int(d.pop("window_end").timestamp() * 1000)
            out.append(row_type(**d))
        return out

    return read(CostRow), read(TokenRow), read(TokenCostRow)


def total_cost(rows: list[CostRow]) -> Decimal:
    return sum((r.cost_usd for r in rows), Decimal(0))


def assert_matches_core(store: ClickHouseStore) -> None:
    cost, tokens, cpt = stored(store)
    want_cost, want_tokens, want_cpt = expected_rows(gpu_samples(), pod_events(), token_events())
    assert comparable(cost) == comparable(want_cost)
    assert comparable(tokens) == comparable(want_tokens)
    assert comparable(cpt) == comparable(want_cpt)


async def test_scenario_rows_match_the_allocation_core(broker: str, store: ClickHouseStore) -> None:
    await publish_scenario(broker)
    await run_worker(make_worker(broker, store))
    assert_matches_core(store)
    cost, _, cpt = stored(store)
    teams = {r.team for r in cost}
    assert {"search", "ads", "research", "__untagged__", "__host__", "platform"} <= teams
    assert any(r.mig_profile == "1g.10gb" for r in cost)
    assert {r.model for r in cpt} == {"llama-3-70b", "mistral-7b", "qwen2-7b"}

    # The billing topic carries every row; the highest version per key equals ClickHouse.
    latest: dict[bytes, dict[str, Any]] = {}
    for key, value in await read_topic(broker, COST_WINDOWS_TOPIC):
        doc = orjson.loads(value)
        assert key is not None
        if key not in latest or doc["version"] > latest[key]["version"]:
            latest[key] = doc
    assert sum(Decimal(d["cost_usd"]) for d in latest.values()) == total_cost(cost)
    assert len(latest) == len(cost)


async def test_replays_and_duplicates_change_nothing(broker: str, store: ClickHouseStore) -> None:
    await publish_scenario(broker)
    await publish(broker, GPU_SAMPLES_TOPIC, gpu_samples()[::3], lambda ev: ev.data.device_uuid)
    await publish(broker, TOKENS_TOPIC, token_events()[::2], lambda ev: ev.data.pod_uid)
    worker = make_worker(broker, store)
    await run_worker(worker)
    assert_matches_core(store)
    duplicates = {"topic": GPU_SAMPLES_TOPIC}
    assert worker.registry.get_sample_value("gpuledger_events_duplicate_total", duplicates) == 60
    # A second worker group replaying the whole history writes the same final rows.
    before = stored(store)
    await run_worker(make_worker(broker, store, group_id="replay"))
    assert comparable(stored(store)[0]) == comparable(before[0])
    assert total_cost(stored(store)[0]) == total_cost(before[0])


async def test_pod_metadata_arriving_late_re_emits_with_labels(
    broker: str, store: ClickHouseStore
) -> None:
    await publish_scenario(broker, include_late_pod=False)
    worker = make_worker(broker, store, exit_when_idle_s=None)
    task = asyncio.create_task(run_worker(worker))
    await wait_for(lambda: any(r.pod_uid == "uid-late" for r in stored(store)[0]))
    cost, _, _ = stored(store)
    assert {r.team for r in cost if r.pod_uid == "uid-late"} == {"__untagged__"}
    late = [ev for ev in pod_events() if ev.data.uid == "uid-late"]
    await publish(broker, PODS_TOPIC, late, lambda ev: ev.data.uid)
    want = [comparable(t) for t in expected_rows(gpu_samples(), pod_events(), token_events())]
    await wait_for(lambda: [comparable(t) for t in stored(store)] == want)
    assert {r.team for r in stored(store)[0] if r.pod_uid == "uid-late"} == {"research"}
    worker.stop()
    await task
    assert_matches_core(store)


async def test_garbage_goes_to_the_dead_letter_topic_once(
    broker: str, store: ClickHouseStore
) -> None:
    garbage = [
        b"not json",
        b'{"specversion":"1.0"}',
        b"\xff\x00",
        orjson.dumps({**orjson.loads(b'{"a":1}')}),
    ]
    for topic in (GPU_SAMPLES_TOPIC, TOKENS_TOPIC, PODS_TOPIC):
        await publish_raw(broker, topic, garbage)
    await publish_scenario(broker)
    await run_worker(make_worker(broker, store))
    assert_matches_core(store)
    await run_worker(make_worker(broker, store, group_id="again"))  # replays the garbage too
    letters = await read_topic(broker, DEAD_LETTER_TOPIC)
    keys = [k for k, _ in letters]
    assert len(keys) == len(set(keys)) == 12
    doc = orjson.loads(letters[0][1])
    assert doc["reason"] in {"invalid_json", "missing_field"}
    assert {"topic", "partition", "offset", "value_base64", "detail"} <= doc.keys()


async def wait_for(predicate: Any, timeout_s: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.5)
    raise AssertionError("rows never reached the expected state")


@pytest.fixture
async def tansu() -> AsyncIterator[str]:
    broker = EmbeddedBroker()
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


async def test_worker_runs_on_the_embedded_broker(tansu: str, store: ClickHouseStore) -> None:
    await publish_scenario(tansu)
    await run_worker(make_worker(tansu, store))
    assert_matches_core(store)

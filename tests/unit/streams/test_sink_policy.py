"""The sinks' failure policy without a broker or a server: which errors are retried, how a
batch ClickHouse refuses is split and its refused rows dead-lettered, messages too large for
the broker, the health /healthz reports, and a revoke during an outage."""

from __future__ import annotations

import asyncio
import base64
import datetime
import time
import types
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, RecordTooLargeError
from clickhouse_connect.driver.exceptions import (
    DatabaseError,
    DataError,
    OperationalError,
    ProgrammingError,
)
from prometheus_client import CollectorRegistry
from row_builders import cost_row
from test_worker_runner import FakeConsumer, FakeStage

from gpuledger.embedded_broker import free_port
from runtime.errors import StoreError
from schemas.events import DEAD_LETTER_TOPIC
from streams.metrics import WorkerMetrics
from streams.rows import TokenRow
from streams.store import _convert as convert
from streams.store import ddl_statements, is_retriable
from streams.worker import outbox as outbox_module
from streams.worker import sinks as sinks_module
from streams.worker.http import HttpEndpoint
from streams.worker.outbox import (
    MESSAGE_TOO_LARGE,
    UNSTORABLE,
    Outbox,
    dead_letter_message,
    describe,
)
from streams.worker.runner import StageRunner
from streams.worker.sinks import MAX_SPLITS, Sinks, month_of

PARTITIONS_REFUSED = (
    "Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100). "
    "The limit is controlled by 'max_partitions_per_insert_block' setting. (TOO_MANY_PARTS)"
)
PARTS_BEHIND = (
    "Code: 252. DB::Exception: Too many parts (3001 with average size of 1.2 MiB) in table "
    "'gpuledger.gpu_cost_windows'. Merges are processing significantly slower than inserts. "
    "(TOO_MANY_PARTS)"
)
REFUSED_CONNECTION = "Error HTTPConnectionPool(host='ch', port=8123): Connection refused"


def _month_start_ms(index: int) -> int:
    moment = datetime.datetime(2015 + index // 12, index % 12 + 1, 1, tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1000)


# --- classification where ClickHouse errors enter ----------------------------------------------


@pytest.mark.parametrize(
    ("exc", "retriable"),
    [
        (OperationalError(REFUSED_CONNECTION), True),
        (OperationalError("Error HTTPConnectionPool: Read timed out. (read timeout=300)"), True),
        (DatabaseError("HTTP driver received HTTP status 503, server response: busy"), True),
        (DatabaseError(PARTS_BEHIND, code=252), True),  # merges behind: later it passes
        (DatabaseError("Code: 159. DB::Exception: Timeout exceeded (TIMEOUT_EXCEEDED)"), True),
        (DatabaseError("Code: 241. DB::Exception: Memory limit exceeded", code=241), True),
        (DatabaseError(PARTITIONS_REFUSED, code=252), False),
        (DatabaseError(PARTITIONS_REFUSED), False),  # the code read from the text
        (DatabaseError("Code: 53. DB::Exception: Type mismatch (TYPE_MISMATCH)", code=53), False),
        (DatabaseError("Code: 62. DB::Exception: Syntax error (SYNTAX_ERROR)", code=62), False),
        (
            DatabaseError("Code: 16. DB::Exception: No such column x (NO_SUCH_COLUMN_IN_TABLE)"),
            False,
        ),
        (ProgrammingError("Unrecognized column 'nope' in table p.gpu_cost_windows"), False),
        (DataError("Unable to create native array for column `version`: error"), False),
        (ValueError("could not convert string to float: 'abc'"), False),  # chDB, bare
        (OverflowError("int too big to convert"), False),
        (ConnectionResetError("reset by peer"), True),
    ],
)
def test_store_errors_say_whether_a_retry_can_pass(exc: Exception, retriable: bool) -> None:
    assert is_retriable(exc) is retriable
    converted = convert(exc, "insert into gpu_cost_windows failed")
    assert isinstance(converted, StoreError) and converted.retriable is retriable


def test_broker_errors_for_one_message_are_permanent() -> None:
    assert not sinks_module.is_retriable(MessageSizeTooLargeError())
    assert not sinks_module.is_retriable(RecordTooLargeError())
    assert sinks_module.is_retriable(KafkaConnectionError())
    assert not sinks_module.is_retriable(StoreError("refused", retriable=False))
    assert sinks_module.is_retriable(StoreError("down", retriable=True))


def test_month_of_is_the_tables_partition_key() -> None:
    for table in ("gpu_cost_windows", "token_windows", "cost_per_token_windows"):
        ddl = next(s for s in ddl_statements("db") if f"db.{table}\n" in s)
        assert "PARTITION BY toYYYYMM(window_start)" in ddl
    assert month_of(cost_row(_month_start_ms(0))) == 201501
    assert month_of(cost_row(_month_start_ms(13) - 1)) == 201601  # the last ms of January


def test_errors_are_described_without_credentials() -> None:
    exc = OperationalError("Error http://gpuledger:hunter2@ch:8123/?password=hunter2 refused")
    text = describe(exc)
    assert "hunter2" not in text and "OperationalError" in text and "refused" in text
    schemeless = describe(OperationalError("cannot reach gpuledger:Passw0rd@127.0.0.1:18123"))
    assert "Passw0rd" not in schemeless and "127.0.0.1:18123" in schemeless


# --- fakes --------------------------------------------------------------------------------------


class FakeStore:
    """Refuses what ClickHouse would: more than `limit` months in one block, and rows
    `refuse` picks (as a type mismatch); fails `down` calls as a connection refused."""

    def __init__(self, *, refuse: Any = None, down: int = 0, limit: int = 100) -> None:
        self.refuse = refuse or (lambda row: False)
        self.down = down
        self.limit = limit
        self.stored: list[Any] = []
        self.calls: list[tuple[int, str | None]] = []

    def insert_rows(self, rows: list[Any], *, dedup_token: str | None = None) -> int:
        self.calls.append((len(rows), dedup_token))
        if self.down:
            self.down -= 1
            raise convert(OperationalError(REFUSED_CONNECTION), "insert failed")
        months = {time.gmtime(r.window_start_ms // 1000)[:2] for r in rows}
        if len(months) > self.limit:
            raise convert(DatabaseError(PARTITIONS_REFUSED, code=252), "insert failed")
        if any(self.refuse(r) for r in rows):
            raise convert(ValueError("could not convert string to float: 'abc'"), "insert failed")
        self.stored += rows
        return len(rows)


class FakeBatch:
    def __init__(self, limit: int = 16_384) -> None:
        self.records: list[tuple[bytes, bytes]] = []
        self.size = 0
        self.limit = limit

    def append(self, *, key: bytes, value: bytes, timestamp: None) -> object | None:
        size = len(key) + len(value) + 20
        if self.records and self.size + size > self.limit:
            return None
        self.records.append((key, value))
        self.size += size
        return object()


class FakeProducer:
    """Refuses a batch over `max_bytes` as the broker does; fails `down` sends."""

    def __init__(self, max_bytes: int = 1_000_000, down: int = 0) -> None:
        self.max_bytes = max_bytes
        self.down = down
        self.delivered: list[tuple[str, int, bytes, bytes]] = []

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> Any:
        future = asyncio.get_running_loop().create_future()
        if self.down:
            self.down -= 1
            future.set_exception(KafkaConnectionError("broker down"))
        elif batch.size > self.max_bytes:
            future.set_exception(MessageSizeTooLargeError())
        else:
            self.delivered += [(topic, partition, k, v) for k, v in batch.records]
            future.set_result(None)
        return future

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1}


def make_sinks(
    store: FakeStore | None = None, producer: FakeProducer | None = None, **kwargs: Any
) -> tuple[Sinks, FakeStore, FakeProducer, CollectorRegistry]:
    store = store or FakeStore()
    producer = producer or FakeProducer()
    registry = CollectorRegistry()
    sinks = Sinks(store, producer, WorkerMetrics(registry), asyncio.Event(), **kwargs)  # type: ignore[arg-type]
    return sinks, store, producer, registry


def letters(producer: FakeProducer) -> list[tuple[bytes, dict[str, Any]]]:
    return [(k, orjson.loads(v)) for t, _, k, v in producer.delivered if t == DEAD_LETTER_TOPIC]


# --- ClickHouse: split, then dead-letter --------------------------------------------------------


async def test_a_batch_over_the_partitions_limit_is_inserted_one_insert_per_partition() -> None:
    sinks, store, producer, _ = make_sinks()
    rows = [cost_row(_month_start_ms(i)) for i in range(101)]
    assert await asyncio.wait_for(sinks.insert(rows, "devices"), 5)
    assert sorted(store.stored, key=lambda r: r.window_start_ms) == rows
    assert store.calls[0][0] == 101 and len(store.calls) == 102  # refused, then 101 parts
    tokens = [token for _, token in store.calls[1:]]
    assert len(set(tokens)) == 101  # a token per part
    assert letters(producer) == []
    assert sinks.unhealthy() == {} and not sinks.failing("clickhouse")


async def test_rows_clickhouse_refuses_are_dead_lettered_and_the_others_stored() -> None:
    store = FakeStore(refuse=lambda row: getattr(row, "device_uuid", "") == "GPU-bad")
    sinks, store, producer, registry = make_sinks(store)
    start = _month_start_ms(0)
    rows = [cost_row(start + i * 60_000) for i in range(300)]
    bad = cost_row(start + 77 * 60_000, device="GPU-bad", version=4)
    rows.insert(150, bad)
    rows.append(
        TokenRow(start, start + 60_000, "c1", "ns", "p", "uid-p", "m", 1, 2, 1, 0, 0.1, 0.2, 1)
    )  # type: ignore[arg-type]
    assert await asyncio.wait_for(sinks.insert(rows, "devices"), 5)
    assert len(store.stored) == len(rows) - 1 and bad not in store.stored
    assert len(store.calls) < 40  # halves of the refused part, not a row at a time
    [(key, letter)] = letters(producer)
    assert key == f"unstorable|gpu_cost_windows|{bad.key}|4".encode()
    assert letter["reason"] == UNSTORABLE and letter["sink"] == "clickhouse"
    assert letter["topic"] == "gpu_cost_windows" and letter["partition"] is None
    assert base64.b64decode(letter["key_base64"]).decode() == bad.key
    assert orjson.loads(base64.b64decode(letter["value_base64"]))["device_uuid"] == "GPU-bad"
    assert "could not convert string to float" in letter["detail"]
    labels = {"topic": "gpu_cost_windows", "reason": UNSTORABLE}
    assert registry.get_sample_value("gpuledger_dead_letters_total", labels) == 1


async def test_a_batch_no_row_of_which_fits_is_dead_lettered_in_bounded_attempts() -> None:
    store = FakeStore(refuse=lambda row: True)  # e.g. the table's columns changed under us
    sinks, store, producer, _ = make_sinks(store, unhealthy_after=5)
    rows = [cost_row(_month_start_ms(i % 3) + i * 60_000) for i in range(5000)]
    began = time.monotonic()
    assert await asyncio.wait_for(sinks.insert(rows, "devices"), 10)
    assert time.monotonic() - began < 5
    assert len(store.calls) <= 1 + 3 + 2 * MAX_SPLITS  # never an endless retry
    assert store.stored == [] and len(letters(producer)) == 5000
    assert all(len(v) < 10_000 for _, _, _, v in producer.delivered)
    assert "clickhouse" in sinks.unhealthy()  # every attempt failed


# --- transient failures: retried, back-pressure, health ----------------------------------------


async def test_transient_failures_are_retried_with_backoff_and_call_on_retry() -> None:
    sinks, store, _, registry = make_sinks(FakeStore(down=3))
    stalls: list[float] = []
    began = time.monotonic()
    rows = [cost_row(_month_start_ms(0))]
    assert await sinks.insert(rows, "devices", on_retry=lambda: stalls.append(time.monotonic()))
    assert len(stalls) == 3 and store.stored == rows
    assert time.monotonic() - began >= 0.2 + 0.4 + 0.8 - 0.05  # backoff doubles
    assert len({token for _, token in store.calls}) == 1  # one deduplication token
    failures = registry.get_sample_value("gpuledger_sink_failures_total", {"sink": "clickhouse"})
    assert failures == 3


async def test_an_impatient_write_makes_one_attempt() -> None:
    sinks, store, producer, _ = make_sinks(FakeStore(down=1), FakeProducer(down=1))
    assert not await sinks.insert([cost_row(0)], "x", patient=False)
    assert not await sinks.produce([("t", b"k", b"v", 0)], patient=False)
    assert len(store.calls) == 1 and producer.delivered == []


async def test_consecutive_failures_make_a_sink_unhealthy_until_a_write_succeeds() -> None:
    sinks, _, _, _ = make_sinks(FakeStore(down=3), unhealthy_after=3)
    for _ in range(2):
        assert not await sinks.insert([cost_row(0)], "x", patient=False)
    assert sinks.unhealthy() == {}
    assert not await sinks.insert([cost_row(0)], "x", patient=False)
    failing = sinks.unhealthy()
    assert list(failing) == ["clickhouse"]
    assert failing["clickhouse"]["consecutive_failures"] == 3
    assert "Connection refused" in failing["clickhouse"]["last_error"]
    assert failing["clickhouse"]["failing_since"].endswith("Z")
    assert await sinks.insert([cost_row(0)], "x", patient=False)
    assert sinks.unhealthy() == {}


# --- Kafka: messages over the broker's limit ---------------------------------------------------


async def test_a_message_over_the_brokers_limit_is_dead_lettered_and_the_rest_delivered() -> None:
    sinks, _, producer, registry = make_sinks(producer=FakeProducer(max_bytes=100_000))
    big = ("gpuledger.cost-windows", b"key-big", b"x" * 200_000, 1)
    small = [("gpuledger.cost-windows", b"k%d" % i, b"v", 1) for i in range(5)]
    assert await asyncio.wait_for(sinks.produce([small[0], big, *small[1:]]), 5)
    delivered = [(t, k) for t, _, k, _ in producer.delivered if t != DEAD_LETTER_TOPIC]
    assert delivered == [(t, k) for t, k, _, _ in small]
    [(key, letter)] = letters(producer)
    assert key == b"message_too_large|gpuledger.cost-windows|key-big"
    assert letter["reason"] == MESSAGE_TOO_LARGE and letter["partition"] == 1
    assert letter["value_base64"] is None and "200000-byte" in letter["detail"]
    labels = {"topic": "gpuledger.cost-windows", "reason": MESSAGE_TOO_LARGE}
    assert registry.get_sample_value("gpuledger_dead_letters_total", labels) == 1
    assert sinks.unhealthy() == {}


async def test_a_dead_letter_over_the_limit_goes_again_without_the_original_bytes() -> None:
    sinks, _, producer, _ = make_sinks(producer=FakeProducer(max_bytes=100_000))
    huge_input = b"{" * 90_000  # under the limit as an input, over it base64-encoded
    letter = dead_letter_message(
        "gpuledger.gpu-samples", 2, 7, b"k", huge_input, "invalid_json", "bad " * 2000, 0
    )
    assert await sinks.produce([letter])
    [(key, body)] = letters(producer)
    assert key == b"gpuledger.gpu-samples|2|7"  # the same key: a replay skips the input
    assert body["reason"] == "invalid_json" and body["value_base64"] is None
    assert body["offset"] == 7 and "original bytes omitted" in body["detail"]
    assert len(body["detail"]) <= outbox_module.DETAIL_CHARS


# --- /healthz ------------------------------------------------------------------------------------


class FakeWorker:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.store: Any = types.SimpleNamespace(embedded=False)  # a server's: no reads
        self.stopping = asyncio.Event()
        self.open_windows = 3
        self.failing: dict[str, dict[str, Any]] = {}

    def unhealthy_sinks(self) -> dict[str, dict[str, Any]]:
        return self.failing


async def test_healthz_says_which_sink_fails_and_why_then_ok_again() -> None:
    worker = FakeWorker()
    endpoint = HttpEndpoint(worker, "127.0.0.1", free_port())  # type: ignore[arg-type]
    await endpoint.start()
    try:
        async with aiohttp.ClientSession() as session:

            async def healthz() -> tuple[int, dict[str, Any]]:
                async with session.get(f"{endpoint.url}/healthz") as response:
                    return response.status, await response.json()

            assert await healthz() == (200, {"status": "ok", "open_windows": 3})
            sinks, _, _, _ = make_sinks(FakeStore(down=9), unhealthy_after=2)
            for _ in range(2):
                await sinks.insert([cost_row(0)], "x", patient=False)
            worker.failing = sinks.unhealthy()
            status, body = await healthz()
            assert status == 503 and body["status"] == "unhealthy"
            assert body["open_windows"] == 3
            assert body["sinks"]["clickhouse"]["consecutive_failures"] == 2
            assert "Connection refused" in body["sinks"]["clickhouse"]["last_error"]
            assert body["reason"].startswith("clickhouse: 2 failed writes in a row")
            worker.failing = {}
            assert await healthz() == (200, {"status": "ok", "open_windows": 3})
    finally:
        await endpoint.stop()


# --- a revoke during an outage ------------------------------------------------------------------

TOPIC = "gpuledger.gpu-samples"


class PausingConsumer(FakeConsumer):
    """The runner tests' consumer, with pause and resume (logged) and a copied assignment."""

    def __init__(self, log: list[Any], batches: list[dict[TopicPartition, list[Any]]]) -> None:
        super().__init__(log, batches)
        self.paused: set[TopicPartition] = set()

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *tps: TopicPartition) -> None:
        self.paused |= set(tps)
        self.log.append(("pause", set(tps)))

    def resume(self, *tps: TopicPartition) -> None:
        self.paused -= set(tps)
        self.log.append(("resume", set(tps)))


class RowStage(FakeStage):
    """The runner tests' stage, turning each record into a cost row only."""

    async def handle(
        self, tp: TopicPartition, records: list[Any], now_s: float, out: Outbox
    ) -> None:
        for msg in records:
            out.rows.append(cost_row(_month_start_ms(0) + msg.offset * 60_000))
            self.next[(tp.topic, tp.partition)] = msg.offset + 1


async def test_a_revoke_during_an_outage_does_not_wait_for_it_nor_commit_the_lost_input() -> None:
    log: list[Any] = []
    tp0, tp1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
    record = ConsumerRecord(TOPIC, 0, 4, 0, 0, b"k", b"v", None, 1, 1, ())
    consumer = PausingConsumer(log, [{tp0: [record]}])
    consumer.assigned = {tp0, tp1}
    store = FakeStore(down=10**9)  # down until the test says otherwise
    sinks, _, _, _ = make_sinks(store)
    stage = RowStage(log)
    runner = StageRunner(
        "devices",
        consumer,  # type: ignore[arg-type]
        stage,
        sinks,
        sinks.metrics,
        flush_interval_s=0,
        max_outbox=1000,
    )
    runner.on_assigned({tp0, tp1})
    stopping = asyncio.Event()
    task = asyncio.create_task(runner.run(stopping))
    while not runner.stalled:
        await asyncio.sleep(0.01)
    assert consumer.paused == {tp0, tp1} and runner.quiet_for_s() == 0

    began = time.monotonic()
    await asyncio.wait_for(runner.on_revoked({tp0, tp1}), 1)  # the rebalance goes on
    assert time.monotonic() - began < 0.5
    consumer.assigned, consumer.paused = {tp1}, set()  # a new assignment: nothing paused
    runner.on_assigned({tp1})
    assert tp1 in consumer.paused  # still no output can be written

    store.down = 0  # ClickHouse is back
    while runner.stalled:
        await asyncio.sleep(0.05)
    stopping.set()
    await task
    assert len(store.stored) == 1  # the pending row is written, later
    assert ("revoke", {(TOPIC, 0), (TOPIC, 1)}) in log
    assert not [step for step in log if step[0] == "commit" and tp0 in step[1]]
    assert ("resume", {tp1}) in log and consumer.paused == set()

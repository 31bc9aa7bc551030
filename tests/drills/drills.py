"""Fault drills: real workers disturbed over the good events of tests/worker_scenario.py, each
checked against an undisturbed run over the same events.

Every drill gets an Apache Kafka broker of its own (topic names are fixed by the contract) and
the real ClickHouse engine (chDB): in-process workers write to a database of their own in the
given folder, `gpuledger worker` subprocesses to a folder of their own. A drill returns a
`DrillResult`: the per-team totals of `gpu_cost_windows` and `cost_per_token_windows` (FINAL,
exact Decimal) beside the undisturbed run's, the rows lost or counted twice, the dead letters of
each bad input it sent (each must be dead-lettered exactly once, with its reason), whether every
worker stayed alive until told to stop (or exited cleanly), and how long it took.

`run_drills.py` runs them all and prints one table; tests/integration/test_fault_drills.py runs
each as a test with short durations. Callers put tests/ on `sys.path` first (pytest does; the
script does it itself), as for every module of tests/.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from kafka_broker import DEFAULT_LIBS_DIR, KAFKA_VERSION, KafkaBroker, KafkaBrokerError
from prometheus_client import CollectorRegistry
from worker_scenario import T0, expected_rows, gpu_samples, pod_events, read_topic, token_events

from gpuledger.embedded_broker import free_port
from runtime.kafka import KafkaSettings, default_topics, ensure_topics, partition_counts
from schemas.events import (
    DEAD_LETTER_TOPIC,
    GPU_SAMPLES_TOPIC,
    PODS_TOPIC,
    TOKENS_TOPIC,
    CloudEvent,
    GpuSample,
    PodInfo,
    TokenDelta,
    encode_event,
    event_to_dict,
    make_event,
)
from streams.pricing import EXAMPLE_PRICE_BOOK, load_price_book
from streams.store import ClickHouseStore
from streams.worker.app import Worker, WorkerConfig
from streams.worker.device_stage import StreamSettings

log = logging.getLogger("gpuledger.drills")

REPO = Path(__file__).resolve().parents[2]
PARTITIONS = 2  # of every topic a drill creates, and of the workers' internal topics
GROUP = "gpuledger-worker"
IDLE_FLUSH_S = 2.0
FLUSH_INTERVAL_S = 0.3
GRACE_MS = 10_000  # the worker's default grace
SPLIT_MS = T0 + 90_000  # mid-run disturbances come here: the middle of the second window
COST_TABLE = "gpu_cost_windows"
TOKEN_COST_TABLE = "cost_per_token_windows"
TOKEN_TABLE = "token_windows"


# ------------------------------------------------------------------ settings


@dataclass(frozen=True)
class DrillSettings:
    clickhouse_down_s: float = 60.0
    broker_down_s: float = 10.0  # between the broker's exit and its restart
    converge_s: float = 90.0  # after its disturbance, how long a drill waits for the baseline
    settle_s: float = 6.0  # rows unchanged this long, every worker idle: they are final
    worker_timeout_s: float = 150.0  # a bounded run, a stop, a process
    bounded_idle_s: float = 3.0  # a bounded run stops after this much silence

    @property
    def drill_timeout_s(self) -> float:
        return self.clickhouse_down_s + self.broker_down_s + 2 * self.converge_s + 240


FULL = DrillSettings()
QUICK = DrillSettings(
    clickhouse_down_s=5.0, broker_down_s=1.0, converge_s=45.0, settle_s=5.0, worker_timeout_s=90.0
)


class BrokerPool:
    """Fresh brokers for the drills, the next one started while the current drill runs (a
    broker takes seconds to start). Whoever takes a broker stops it; `close` stops the spare."""

    def __init__(self, libs_dir: Path, *, ahead: bool = True) -> None:
        self.libs_dir = libs_dir
        self.ahead = ahead
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="broker")
        self._next: concurrent.futures.Future[DrillBroker] | None = None
        self._closed = False
        atexit.register(self.close)  # no broker outlives an interrupted run

    def take(self) -> DrillBroker:
        """A started broker (blocking: call it off the event loop)."""
        future, self._next = self._next, None
        broker: DrillBroker | None = None
        if future is not None:
            try:
                broker = future.result(timeout=180)
            except Exception as exc:
                log.warning("a broker started ahead failed (%s); starting another", exc)
        if broker is None:
            broker = self._start()
        if self.ahead and not self._closed:
            self._next = self._executor.submit(self._start)
        return broker

    def _start(self) -> DrillBroker:
        broker = DrillBroker(self.libs_dir)
        broker.start()
        return broker

    def close(self) -> None:
        self._closed = True
        future, self._next = self._next, None
        if future is not None:
            with contextlib.suppress(Exception):
                future.result(timeout=180).stop()
        self._executor.shutdown(wait=True)
        atexit.unregister(self.close)


class DrillEnv:
    """Where drills run: `chdb_dsn` (in-process workers get a database of their own in this
    chDB folder), `work_dir` (subprocess workers' folders and logs), the durations, and the
    brokers. `close()` when done."""

    def __init__(
        self,
        chdb_dsn: str,
        work_dir: Path,
        settings: DrillSettings = FULL,
        libs_dir: Path = DEFAULT_LIBS_DIR,
    ) -> None:
        self.chdb_dsn = chdb_dsn
        self.work_dir = work_dir
        self.settings = settings
        self.libs_dir = libs_dir
        self.brokers = BrokerPool(libs_dir)

    def check(self) -> None:
        if not (self.libs_dir / f"kafka_2.13-{KAFKA_VERSION}.jar").exists():
            raise KafkaBrokerError(f"no Kafka jars in {self.libs_dir}; run .ci/fetch-kafka")

    def close(self) -> None:
        self.brokers.close()


# ------------------------------------------------------------------ the ledger ClickHouse holds

Amounts = tuple[str, Decimal, int, int]  # team, cost_usd, prompt tokens, completion tokens
RowKey = tuple[str, tuple[Any, ...]]  # table, the row's key


@dataclass(frozen=True)
class Ledger:
    """What ClickHouse holds, read with FINAL: per-team totals, and every row's amounts by key."""

    cost_by_team: dict[str, Decimal]
    token_cost_by_team: dict[str, Decimal]
    rows: dict[RowKey, Amounts]

    def has_row(self, table: str, window_start_ms: int, *key: str) -> bool:
        return any(
            t == table and k[0] == window_start_ms and k[1 : 1 + len(key)] == key
            for t, k in self.rows
        )

    def teams_of(self, table: str, pod_uid: str) -> set[str]:
        slot = 2 if table == COST_TABLE else 1
        return {a[0] for (t, k), a in self.rows.items() if t == table and k[slot] == pod_uid}


LEDGER_SQL = {
    "cost_by_team": f"SELECT team, toString(sum(cost_usd)) FROM {{db}}.{COST_TABLE} FINAL "
    "GROUP BY team",
    "token_cost_by_team": f"SELECT team, toString(sum(cost_usd)) FROM {{db}}.{TOKEN_COST_TABLE} "
    "FINAL GROUP BY team",
    COST_TABLE: "SELECT toUnixTimestamp64Milli(window_start), device_uuid, pod_uid, team, "
    f"toString(cost_usd), 0, 0 FROM {{db}}.{COST_TABLE} FINAL",
    TOKEN_COST_TABLE: "SELECT toUnixTimestamp64Milli(window_start), pod_uid, model, team, "
    f"toString(cost_usd), prompt_tokens, completion_tokens FROM {{db}}.{TOKEN_COST_TABLE} FINAL",
    TOKEN_TABLE: "SELECT toUnixTimestamp64Milli(window_start), pod_uid, model, '', '0', "
    f"prompt_tokens, completion_tokens FROM {{db}}.{TOKEN_TABLE} FINAL",
}


def ledger_from(results: dict[str, Sequence[Sequence[Any]]]) -> Ledger:
    rows: dict[RowKey, Amounts] = {}
    for table in (COST_TABLE, TOKEN_COST_TABLE, TOKEN_TABLE):
        for start, a, b, team, cost, prompt, completion in results[table]:
            rows[(table, (int(start), a, b))] = (
                team,
                Decimal(cost),
                int(prompt),
                int(completion),
            )
    return Ledger(
        {team: Decimal(total) for team, total in results["cost_by_team"]},
        {team: Decimal(total) for team, total in results["token_cost_by_team"]},
        rows,
    )


def read_ledger(store: ClickHouseStore) -> Ledger:
    return ledger_from(
        {name: store.query_rows(sql.format(db=store.database)) for name, sql in LEDGER_SQL.items()}
    )


_READ_FOLDER = """
import sys, orjson
from streams.store import ClickHouseStore
store = ClickHouseStore(sys.argv[1])
queries = orjson.loads(sys.argv[2])
out = {n: [list(r) for r in store.query_rows(q.format(db=store.database))]
       for n, q in queries.items()}
sys.stdout.buffer.write(orjson.dumps(out, default=str))
"""


def read_folder_ledger(folder: Path, timeout_s: float = 120) -> Ledger:
    """The ledger of a chDB folder, read by a subprocess (this one may hold another folder)."""
    out = subprocess.run(
        [sys.executable, "-c", _READ_FOLDER, f"chdb://{folder}", orjson.dumps(LEDGER_SQL)],
        check=True,
        capture_output=True,
        timeout=timeout_s,
        cwd=REPO,
    )
    return ledger_from(orjson.loads(out.stdout))


def oracle_ledger() -> Ledger:
    """What the allocation core computes from the good events (tests/worker_scenario.py)."""
    cost, tokens, token_cost = expected_rows(gpu_samples(), pod_events(), token_events())
    rows: dict[RowKey, Amounts] = {}
    cost_by_team: dict[str, Decimal] = {}
    token_cost_by_team: dict[str, Decimal] = {}
    for r in cost:
        rows[(COST_TABLE, (r.window_start_ms, r.device_uuid, r.pod_uid))] = (
            r.team,
            r.cost_usd,
            0,
            0,
        )
        cost_by_team[r.team] = cost_by_team.get(r.team, Decimal(0)) + r.cost_usd
    for t in token_cost:
        rows[(TOKEN_COST_TABLE, (t.window_start_ms, t.pod_uid, t.model))] = (
            t.team,
            t.cost_usd,
            t.prompt_tokens,
            t.completion_tokens,
        )
        token_cost_by_team[t.team] = token_cost_by_team.get(t.team, Decimal(0)) + t.cost_usd
    for w in tokens:
        rows[(TOKEN_TABLE, (w.window_start_ms, w.pod_uid, w.model))] = (
            "",
            Decimal(0),
            w.prompt_tokens,
            w.completion_tokens,
        )
    return Ledger(cost_by_team, token_cost_by_team, rows)


@dataclass(frozen=True)
class Diff:
    """Rows of the expected ledger missing or smaller (lost), rows not expected or larger
    (counted twice), rows with the expected amounts under another owner (changed)."""

    lost_rows: int = 0
    lost_usd: Decimal = Decimal(0)
    double_rows: int = 0
    double_usd: Decimal = Decimal(0)
    changed_rows: int = 0


def diff(expected: Ledger, actual: Ledger) -> Diff:
    lost = double = changed = 0
    lost_usd = double_usd = Decimal(0)
    for key, want in expected.rows.items():
        got = actual.rows.get(key)
        money = key[0] == COST_TABLE
        if got is None:
            lost += 1
            lost_usd += want[1] if money else 0
            continue
        if got == want:
            continue
        lower = any(g < w for g, w in zip(got[1:], want[1:], strict=True))
        higher = any(g > w for g, w in zip(got[1:], want[1:], strict=True))
        lost += lower
        double += higher
        if money:
            lost_usd += max(want[1] - got[1], Decimal(0))
            double_usd += max(got[1] - want[1], Decimal(0))
        changed += not lower and not higher
    for key, got in actual.rows.items():
        if key not in expected.rows:
            double += 1
            double_usd += got[1] if key[0] == COST_TABLE else 0
    return Diff(lost, lost_usd, double, double_usd, changed)


def total_differences(expected: Ledger, actual: Ledger) -> list[str]:
    out = []
    for label, want, got in (
        (COST_TABLE, expected.cost_by_team, actual.cost_by_team),
        (TOKEN_COST_TABLE, expected.token_cost_by_team, actual.token_cost_by_team),
    ):
        for team in sorted(want.keys() | got.keys()):
            w, g = want.get(team, Decimal(0)), got.get(team, Decimal(0))
            if team not in want or team not in got or w != g:
                out.append(f"{label} {team}: {g} (expected {w})")
    return out


# ------------------------------------------------------------------ bad inputs and dead letters


@dataclass(frozen=True)
class BadInput:
    """One record a drill sent that must be dead-lettered exactly once, for one of `reasons`."""

    label: str
    topic: str
    partition: int
    offset: int
    reasons: frozenset[str]

    @property
    def key(self) -> str:
        return f"{self.topic}|{self.partition}|{self.offset}"


def dead_letter_problems(
    expected: Sequence[BadInput], letters: Sequence[dict[str, Any]]
) -> list[str]:
    by_key: dict[str, list[str]] = {}
    for doc in letters:
        by_key.setdefault(f"{doc['topic']}|{doc['partition']}|{doc['offset']}", []).append(
            doc["reason"]
        )
    problems = []
    for bad in expected:
        got = by_key.pop(bad.key, [])
        if len(got) != 1:
            problems.append(f"{bad.label} ({bad.topic}): dead-lettered {len(got)} times")
        elif got[0] not in bad.reasons:
            want = "|".join(sorted(bad.reasons))
            problems.append(f"{bad.label} ({bad.topic}): reason {got[0]}, expected {want}")
    for key, reasons in by_key.items():
        problems.append(f"unexpected dead letter {key}: {', '.join(reasons)}")
    return problems


# ------------------------------------------------------------------ the result


@dataclass
class DrillResult:
    name: str
    expected: Ledger
    ledger: Ledger | None
    bad_inputs: list[BadInput]
    letters: list[dict[str, Any]] | None
    alive: list[tuple[str, bool]]
    checks: list[tuple[str, bool]]
    notes: list[str]
    error: str | None
    elapsed_s: float

    @property
    def cost_by_team(self) -> dict[str, Decimal]:
        return self.ledger.cost_by_team if self.ledger else {}

    @property
    def token_cost_by_team(self) -> dict[str, Decimal]:
        return self.ledger.token_cost_by_team if self.ledger else {}

    @property
    def totals_equal(self) -> bool:
        return (
            self.ledger is not None
            and self.ledger.cost_by_team == self.expected.cost_by_team
            and self.ledger.token_cost_by_team == self.expected.token_cost_by_team
        )

    @property
    def diff(self) -> Diff | None:
        return diff(self.expected, self.ledger) if self.ledger is not None else None

    @property
    def dead_letters_expected(self) -> int:
        return len(self.bad_inputs)

    @property
    def dead_letters_actual(self) -> int:
        return len(self.letters or [])

    @property
    def dead_letters_by_reason(self) -> dict[str, int]:
        return dict(Counter(doc["reason"] for doc in self.letters or []))

    @property
    def expected_dead_letters_by_reason(self) -> dict[str, int]:
        return dict(Counter("|".join(sorted(b.reasons)) for b in self.bad_inputs))

    @property
    def dead_letter_problems(self) -> list[str]:
        if self.letters is None:
            return ["the dead-letter topic could not be read"]
        return dead_letter_problems(self.bad_inputs, self.letters)

    @property
    def workers_alive(self) -> bool:
        return bool(self.alive) and all(ok for _, ok in self.alive)

    def failures(self) -> list[str]:
        out = []
        if self.error:
            out.append(f"error: {self.error}")
        if self.ledger is None:
            out.append("ClickHouse could not be read")
        else:
            out += [f"totals differ: {d}" for d in total_differences(self.expected, self.ledger)]
            d = diff(self.expected, self.ledger)
            if d.lost_rows:
                out.append(f"{d.lost_rows} rows lost (USD {d.lost_usd})")
            if d.double_rows:
                out.append(f"{d.double_rows} rows counted twice (USD {d.double_usd})")
            if d.changed_rows:
                out.append(f"{d.changed_rows} rows with another owner")
        out += self.dead_letter_problems
        out += [f"worker not alive: {what}" for what, ok in self.alive if not ok]
        if not self.alive:
            out.append("no worker ran")
        out += [f"check failed: {what}" for what, ok in self.checks if not ok]
        return out

    @property
    def ok(self) -> bool:
        return not self.failures()

    def report(self) -> str:
        lines = [f"{self.name}: {'ok' if self.ok else 'FAILED'} in {self.elapsed_s:.0f} s"]
        lines += [f"  - {f}" for f in self.failures()]
        lines += [f"  check: {what}: {'ok' if ok else 'FAILED'}" for what, ok in self.checks]
        lines += [f"  worker: {what}: {'ok' if ok else 'FAILED'}" for what, ok in self.alive]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  dead letters by reason: {self.dead_letters_by_reason}")
        lines.append(f"  cost by team: {self.cost_by_team}")
        return "\n".join(lines)


# ------------------------------------------------------------------ Kafka


class DrillBroker(KafkaBroker):
    """The test broker, which a drill can also restart in place: same ports, same data."""

    restarts = 0

    def restart(self, down_s: float = 0.0, attempts: int = 10) -> None:
        """Stop the broker process (SIGTERM, an orderly shutdown), wait `down_s`, start it
        again on the same ports and log directory, and wait until clients can use it."""
        process = self._process
        if process is None:
            raise KafkaBrokerError("broker is not running")
        config = self._work_dir() / "server.properties"
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=self.stop_timeout_s)
        self._process = None
        time.sleep(down_s)
        for attempt in range(1, attempts + 1):
            with self.process_log.open("ab") as out:
                self._process = subprocess.Popen(
                    self._java_command("kafka.Kafka", str(config)),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self._work_dir(),
                )
            try:
                self._wait_until_ready()
                self.restarts += 1
                return
            except KafkaBrokerError as error:
                self._kill()
                if attempt == attempts or "Address already in use" not in str(error):
                    raise
                time.sleep(1.0)  # the old process's listening port is not free yet

    def stop(self) -> None:
        """Throw the broker away: nothing reads its data again, so no orderly shutdown."""
        self._kill()
        super().stop()

    def _kill(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=self.stop_timeout_s)
        self._process = None


@dataclass(frozen=True)
class Record:
    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None = None


def record_of(event: CloudEvent[Any]) -> Record:
    data = event.data
    if isinstance(data, GpuSample):
        return Record(GPU_SAMPLES_TOPIC, data.device_uuid.encode(), encode_event(event))
    if isinstance(data, TokenDelta):
        return Record(TOKENS_TOPIC, data.pod_uid.encode(), encode_event(event))
    if isinstance(data, PodInfo):
        return Record(PODS_TOPIC, data.uid.encode(), encode_event(event))
    raise TypeError(f"no topic for {type(data).__name__}")


async def send(
    bootstrap: str, records: Sequence[Record], *, chunk: int = 0, pause_s: float = 0.0
) -> list[Any]:
    """Produce `records` in order (acks=all), `chunk` at a time with `pause_s` between chunks;
    returns each record's metadata (topic, partition, offset)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    await producer.start()
    try:
        out: list[Any] = []
        step = chunk or max(len(records), 1)
        for i in range(0, len(records), step):
            futures = [
                await producer.send(r.topic, r.value, key=r.key, partition=r.partition)
                for r in records[i : i + step]
            ]
            out += await asyncio.wait_for(asyncio.gather(*futures), timeout=60)
            if pause_s and i + step < len(records):
                await asyncio.sleep(pause_s)
        return out
    finally:
        await producer.stop()


async def send_events(bootstrap: str, events: Iterable[CloudEvent[Any]], **kwargs: Any) -> None:
    await send(bootstrap, [record_of(ev) for ev in events], **kwargs)


async def prepare_topics(bootstrap: str) -> None:
    await ensure_topics(KafkaSettings(bootstrap=bootstrap), default_topics(PARTITIONS))


async def read_dead_letters(bootstrap: str) -> list[dict[str, Any]]:
    return [orjson.loads(value) for _, value in await read_topic(bootstrap, DEAD_LETTER_TOPIC)]


async def internal_topics(bootstrap: str, group_id: str = GROUP) -> list[str]:
    """The topics a worker of `group_id` created for itself (`<group>.…`)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return sorted(t for t in await admin.list_topics() if t.startswith(f"{group_id}."))
    finally:
        await admin.close()


# ------------------------------------------------------------------ ClickHouse outage


def unreachable_error() -> Exception:
    """The exception clickhouse-connect raises when the server refuses connections: made by
    asking a port nobody listens on."""
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import OperationalError

    try:
        clickhouse_connect.get_client(
            host="127.0.0.1", port=free_port(), connect_timeout=1, query_retries=0
        )
    except OperationalError as exc:
        return exc
    except Exception as exc:  # pragma: no cover - another client version
        log.warning("an unreachable ClickHouse raised %r; using OperationalError", exc)
    return OperationalError(
        "Error HTTPConnectionPool(host='127.0.0.1', port=8123): Max retries exceeded "
        "(Caused by NewConnectionError('Failed to establish a new connection: "
        "[Errno 111] Connection refused')) executing HTTP request attempt 1"
    )


class ClickHouseOutage:
    """While entered, every call of `store`'s clickhouse-connect client (insert, query,
    command) raises what clickhouse-connect raises for a server that refuses connections."""

    METHODS = ("insert", "query", "command", "raw_query", "raw_insert", "query_arrow")
    _MISSING = object()

    def __init__(self, store: ClickHouseStore) -> None:
        self.client = store._client
        self.error = unreachable_error()
        self.refused = 0
        self._saved: dict[str, Any] = {}

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        self.refused += 1
        raise type(self.error)(*self.error.args)

    def __enter__(self) -> ClickHouseOutage:
        for name in self.METHODS:
            if hasattr(self.client, name):
                self._saved[name] = vars(self.client).get(name, self._MISSING)
                setattr(self.client, name, self._refuse)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, saved in self._saved.items():
            if saved is self._MISSING:
                delattr(self.client, name)
            else:
                setattr(self.client, name, saved)
        self._saved.clear()


# ------------------------------------------------------------------ workers


def make_worker(
    bootstrap: str,
    store: ClickHouseStore,
    *,
    exit_when_idle_s: float | None = None,
    group_id: str = GROUP,
) -> Worker:
    config = WorkerConfig(
        kafka=KafkaSettings(bootstrap=bootstrap),
        clickhouse_dsn="unused",
        stream=StreamSettings(idle_flush_s=IDLE_FLUSH_S),
        group_id=group_id,
        partitions=PARTITIONS,
        flush_interval_s=FLUSH_INTERVAL_S,
        http_port=0,
        exit_when_idle_s=exit_when_idle_s,
    )
    return Worker(
        config, load_price_book(EXAMPLE_PRICE_BOOK), store=store, registry=CollectorRegistry()
    )


def metric(worker: Worker, name: str, **labels: str) -> float:
    total = 0.0
    for family in worker.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) < 400 else text[:400] + "…"


class Running:
    """An in-process worker running as a task. `ok` says whether it stayed alive until told
    to stop and then stopped cleanly (a bounded run: whether it ended cleanly)."""

    def __init__(self, label: str, worker: Worker, *, bounded: bool) -> None:
        self.label = label
        self.worker = worker
        self.bounded = bounded
        self.task = asyncio.create_task(worker.run(), name=label)
        self.ok: bool | None = None
        self.problem: str | None = None

    @property
    def alive(self) -> bool:
        return not self.task.done()

    @property
    def busy(self) -> bool:
        """Handling a batch, or writing (a sink retrying through an outage counts)."""
        return any(
            r.lock.locked() or _locked(getattr(r, "writing", None)) or getattr(r, "stalled", False)
            for r in self.worker.runners
        )

    def unhealthy(self) -> dict[str, Any]:
        """The sinks the worker's /healthz names as failing (none where it has no such view)."""
        view = getattr(self.worker, "unhealthy_sinks", None)
        return dict(view()) if view is not None else {}

    def records(self, stage: int) -> int:
        runners = self.worker.runners
        return runners[stage].records if len(runners) > stage else 0

    def sample_partitions(self) -> set[int]:
        runners = self.worker.runners
        if not runners:
            return set()
        return {tp.partition for tp in runners[0].consumer.assignment()}

    async def stop(self, timeout_s: float, *, while_failing: bool = False) -> bool:
        """Tell it to stop; True if it was alive and healthy until then (`while_failing`: a
        stop during an outage, when its sinks are failing) and stopped cleanly."""
        if self.ok is None:
            alive = self.alive
            unhealthy = self.unhealthy() if alive and not while_failing else {}
            if unhealthy:
                self.problem = f"alive, but /healthz would say unhealthy: {unhealthy}"
            self.worker.stop()
            clean = await self._ended(timeout_s)
            self.ok = clean and (alive or self.bounded) and not unhealthy
            if clean and not alive and not self.bounded:
                self.problem = "it had stopped before it was told to"
        return self.ok

    async def wait(self, timeout_s: float) -> bool:
        """A bounded run: True if it ended by itself, cleanly, within `timeout_s`."""
        if self.ok is None:
            self.ok = await self._ended(timeout_s)
        return self.ok

    async def _ended(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout_s)
        except TimeoutError:
            self.problem = f"did not end within {timeout_s:.0f} s"
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
            return False
        except Exception as exc:
            self.problem = describe(exc)
            return False
        return True

    def verdict(self) -> tuple[str, bool]:
        what = self.label
        if self.problem:
            what += f" ({self.problem})"
        elif self.bounded:
            what += " exited cleanly"
        else:
            what += " alive until told to stop, then stopped cleanly"
        return what, bool(self.ok)


def _locked(lock: asyncio.Lock | None) -> bool:
    return lock is not None and lock.locked()


def http_metric(port: int, name: str, label: str = "") -> float:
    """Sum of a metric's series (those whose labels contain `label`) on a worker's /metrics."""
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
    except OSError:
        return 0.0
    total = 0.0
    for line in body.decode().splitlines():
        if (line.startswith(name + "{") and label in line) or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ------------------------------------------------------------------ one drill's run


class DrillRun:
    """What one drill started (brokers, workers, processes, a database) and what it saw; its
    `finish` stops and reads everything, cleans up, and makes the result."""

    def __init__(self, name: str, env: DrillEnv, expected: Ledger) -> None:
        self.name = name
        self.env = env
        self.settings = env.settings
        self.expected = expected
        self.started = time.monotonic()
        self.brokers: list[DrillBroker] = []
        self.bootstrap = ""
        self.workers: list[Running] = []
        self.processes: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.alive: list[tuple[str, bool]] = []
        self.checks: list[tuple[str, bool]] = []
        self.notes: list[str] = []
        self.bad: list[BadInput] = []
        self.store: ClickHouseStore | None = None
        self.read: Callable[[], Ledger] | None = None
        self.ledger: Ledger | None = None
        self.error: str | None = None

    # --- what a drill starts

    async def broker(self) -> str:
        broker = await asyncio.to_thread(self.env.brokers.take)
        self.brokers.append(broker)
        self.bootstrap = broker.bootstrap
        await prepare_topics(self.bootstrap)
        return self.bootstrap

    def open_store(self) -> ClickHouseStore:
        database = f"drill_{uuid.uuid4().hex[:12]}"
        store = ClickHouseStore(self.env.chdb_dsn, database=database)
        self.store = store
        store.create_schema()
        self.read = lambda: read_ledger(store)
        return store

    def worker(self, label: str, *, bounded: bool = False, group_id: str = GROUP) -> Running:
        assert self.store is not None, "open_store() first"
        idle = self.settings.bounded_idle_s if bounded else None
        worker = make_worker(self.bootstrap, self.store, exit_when_idle_s=idle, group_id=group_id)
        running = Running(label, worker, bounded=bounded)
        self.workers.append(running)
        return running

    def spawn_worker(self, label: str, folder: Path, port: int, *extra: str) -> Any:
        log_path = self.env.work_dir / f"{folder.name}-{len(self.processes)}.log"
        with log_path.open("wb") as err:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gpuledger.cli",
                    "worker",
                    "--kafka",
                    self.bootstrap,
                    "--clickhouse",
                    f"chdb://{folder}",
                    "--metrics-port",
                    str(port),
                    "--partitions",
                    str(PARTITIONS),
                    "--idle-flush-s",
                    str(IDLE_FLUSH_S),
                    "--flush-interval-s",
                    str(FLUSH_INTERVAL_S),
                    "--log-level",
                    "WARNING",
                    *extra,
                ],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.processes.append((label, process, log_path))
        return process

    def check(self, what: str, ok: object) -> None:
        self.checks.append((what, bool(ok)))

    def expect_dead_letters(
        self, sent: Sequence[Any], labelled: Sequence[tuple[str, Iterable[str]]]
    ) -> None:
        for meta, (label, reasons) in zip(sent, labelled, strict=True):
            self.bad.append(
                BadInput(label, meta.topic, meta.partition, meta.offset, frozenset(reasons))
            )

    # --- waiting

    async def wait(
        self,
        predicate: Callable[[], bool],
        what: str,
        *,
        blocking: bool = False,
        timeout_s: float = 0,
    ) -> None:
        """Until `predicate()` holds (a `blocking` one runs off the event loop); TimeoutError
        after `timeout_s` (default `converge_s`)."""
        deadline = time.monotonic() + (timeout_s or self.settings.converge_s)
        while time.monotonic() < deadline:
            if await asyncio.to_thread(predicate) if blocking else predicate():
                return
            if self.workers and not any(w.alive for w in self.workers):
                raise RuntimeError(f"every worker ended while waiting for {what}")
            await asyncio.sleep(0.25)
        raise TimeoutError(f"waited {timeout_s or self.settings.converge_s:.0f} s for {what}")

    async def wait_ledger(self, predicate: Callable[[Ledger], bool], what: str) -> Ledger:
        seen: list[Ledger] = []

        def holds() -> bool:
            assert self.read is not None
            seen[:] = [self.read()]
            return predicate(seen[0])

        await self.wait(holds, what, blocking=True)
        return seen[0]

    async def converge(self, workers: Sequence[Running] | None = None) -> None:
        """Until ClickHouse holds the expected ledger and the workers counted every dead
        letter; or every worker ended; or nothing changed for `settle_s` with every worker
        idle; or `converge_s` passed. The result is judged after the workers stop."""
        assert self.read is not None
        watched = list(workers or [w for w in self.workers if w.alive])
        deadline = time.monotonic() + self.settings.converge_s
        last: Ledger | None = None
        since = time.monotonic()
        while True:
            ledger = await asyncio.to_thread(self.read)
            letters = sum(metric(w.worker, "gpuledger_dead_letters_total") for w in self.workers)
            now = time.monotonic()
            if ledger == self.expected and letters >= len(self.bad):
                return
            if not any(w.alive for w in watched):
                return
            if ledger != last:
                last, since = ledger, now
            elif now - since >= self.settings.settle_s and not any(w.busy for w in watched):
                self.notes.append(f"rows settled {now - since:.0f} s without the baseline")
                return
            if now >= deadline:
                self.notes.append(f"rows not at the baseline after {self.settings.converge_s} s")
                return
            await asyncio.sleep(0.5)

    # --- the end

    async def finish(self) -> DrillResult:
        timeout = self.settings.worker_timeout_s
        for running in self.workers:
            await running.stop(timeout)
            self.alive.append(running.verdict())
        for label, process, log_path in self.processes:
            if process.poll() is None:
                process.kill()
                await asyncio.to_thread(process.wait, 30)
                self.alive.append((f"{label} still running at the end, killed", False))
            if process.returncode not in (0, -signal.SIGKILL):
                tail = log_path.read_text(errors="replace")[-1500:]
                self.notes.append(f"{label} exited {process.returncode}: {tail}")
        letters: list[dict[str, Any]] | None = None
        if self.read is not None:
            try:
                self.ledger = await asyncio.wait_for(asyncio.to_thread(self.read), 180)
            except Exception as exc:
                self.notes.append(f"reading ClickHouse failed: {describe(exc)}")
        if self.bootstrap:
            try:
                letters = await asyncio.wait_for(read_dead_letters(self.bootstrap), 90)
            except Exception as exc:
                self.notes.append(f"reading the dead letters failed: {describe(exc)}")
        await asyncio.to_thread(self.cleanup)
        return DrillResult(
            self.name,
            self.expected,
            self.ledger,
            self.bad,
            letters,
            self.alive,
            self.checks,
            self.notes,
            self.error,
            time.monotonic() - self.started,
        )

    def cleanup(self) -> None:
        """Kill what is left; idempotent (also called if the drill itself is interrupted)."""
        for _, process, _ in self.processes:
            if process.poll() is None:
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=30)
        for broker in self.brokers:
            with contextlib.suppress(Exception):
                broker.stop()
        self.brokers.clear()
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.command(f"DROP DATABASE IF EXISTS {self.store.database}")
            self.store.close()
            self.store = None


Body = Callable[[DrillRun], Awaitable[None]]


async def run_drill(name: str, env: DrillEnv, expected: Ledger, body: Body) -> DrillResult:
    env.check()
    run = DrillRun(name, env, expected)
    try:
        try:
            await asyncio.wait_for(body(run), timeout=env.settings.drill_timeout_s)
        except Exception as exc:
            run.error = describe(exc)
            log.exception("drill %s", name)
        return await run.finish()
    finally:
        await asyncio.to_thread(run.cleanup)


# ------------------------------------------------------------------ the scenario's events


def good_events(
    *, include_late_pod: bool = True
) -> tuple[list[CloudEvent[PodInfo]], list[CloudEvent[Any]]]:
    """The scenario's pod events, and its samples and token deltas in event-time order (as a
    cluster sends them)."""
    stream: list[CloudEvent[Any]] = [*gpu_samples(), *token_events()]
    stream.sort(key=lambda ev: ev.time_ms)
    return pod_events(include_late=include_late_pod), stream


def split(stream: Sequence[CloudEvent[Any]]) -> tuple[list[CloudEvent[Any]], list[CloudEvent[Any]]]:
    return [e for e in stream if e.time_ms < SPLIT_MS], [e for e in stream if e.time_ms >= SPLIT_MS]


def first_window_written(ledger: Ledger) -> bool:
    return ledger.has_row(COST_TABLE, T0)


async def start_mid_run(run: DrillRun, *, include_late_pod: bool = True) -> list[CloudEvent[Any]]:
    """Broker, database, the pods and the first half of the stream, one worker that has
    written the first window's rows. Returns the rest of the stream."""
    bootstrap = await run.broker()
    run.open_store()
    pods, stream = good_events(include_late_pod=include_late_pod)
    first, rest = split(stream)
    await send_events(bootstrap, [*pods, *first])
    run.worker("worker")
    await run.wait_ledger(first_window_written, "the first window's rows")
    return rest


# ------------------------------------------------------------------ the baseline


@dataclass(frozen=True)
class Baseline:
    """An undisturbed worker run over the good events, and what the allocation core says."""

    ledger: Ledger
    oracle: Ledger
    elapsed_s: float

    @property
    def matches_oracle(self) -> bool:
        return self.ledger == self.oracle


async def compute_baseline(env: DrillEnv) -> Baseline:
    oracle = oracle_ledger()

    async def body(run: DrillRun) -> None:
        bootstrap = await run.broker()
        run.open_store()
        pods, stream = good_events()
        await send_events(bootstrap, [*pods, *stream])
        await run.worker("worker", bounded=True).wait(run.settings.worker_timeout_s)

    result = await run_drill("undisturbed", env, oracle, body)
    if result.ledger is None or result.error or not result.workers_alive:
        raise RuntimeError(f"the undisturbed run failed:\n{result.report()}")
    return Baseline(result.ledger, oracle, result.elapsed_s)


# ------------------------------------------------------------------ the drills


async def sigkill_mid_window(env: DrillEnv, baseline: Baseline) -> DrillResult:
    """`gpuledger worker` killed with SIGKILL while the second window is open, then started
    again on the same data: it replays from the committed offsets."""

    async def body(run: DrillRun) -> None:
        bootstrap = await run.broker()
        pods, stream = good_events()
        first, rest = split(stream)
        await send_events(bootstrap, [*pods, *first])
        folder = env.work_dir / f"sigkill-{uuid.uuid4().hex[:8]}"
        run.read = lambda: read_folder_ledger(folder)
        port = free_port()
        # Its silent inputs close no window for 30 s: the kill comes while windows are open.
        victim = run.spawn_worker("killed worker", folder, port, "--idle-flush-s", "30")
        need = len(pods) + len(first)
        await run.wait(
            lambda: (
                http_metric(port, "gpuledger_events_total") >= need
                and http_metric(port, "gpuledger_sink_batch_seconds_count", 'sink="clickhouse"')
                >= 1
            ),
            "the first worker to read the first half and write rows",
            blocking=True,
        )
        open_windows = http_metric(port, "gpuledger_open_windows")
        running = victim.poll() is None
        victim.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.wait, 30)
        run.check(f"killed while running, {open_windows:.0f} windows open", running)
        run.check("the kill came mid-window", open_windows > 0)
        await send_events(bootstrap, rest)
        survivor = run.spawn_worker(
            "restarted worker", folder, free_port(), "--exit-when-idle", "4"
        )
        try:
            code = await asyncio.to_thread(survivor.wait, run.settings.worker_timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        run.alive.append((f"restarted worker exited {code}", code == 0))

    return await run_drill("SIGKILL mid-window, restart", env, baseline.ledger, body)


async def broker_restart(env: DrillEnv, baseline: Baseline) -> DrillResult:
    """The Kafka broker stopped and started again (same port, same data) mid-run."""

    async def body(run: DrillRun) -> None:
        rest = await start_mid_run(run)
        broker = run.brokers[0]
        began = time.monotonic()
        await asyncio.to_thread(broker.restart, run.settings.broker_down_s)
        run.check(
            f"broker on port {broker.broker_port} restarted, {time.monotonic() - began:.0f} s "
            "without it",
            broker.restarts == 1,
        )
        await send_events(run.bootstrap, rest)
        await run.converge()
        worker = run.workers[0].worker
        failed = metric(worker, "gpuledger_sink_failures_total", sink="kafka")
        run.notes.append(f"Kafka writes the worker retried: {failed:.0f}")

    return await run_drill("Kafka broker restarted mid-run", env, baseline.ledger, body)


async def clickhouse_down(env: DrillEnv, baseline: Baseline) -> DrillResult:
    """Every ClickHouse call raises clickhouse-connect's connection error for N s mid-run."""
    down_s = env.settings.clickhouse_down_s

    async def body(run: DrillRun) -> None:
        rest = await start_mid_run(run)
        assert run.store is not None
        worker = run.workers[0]
        with ClickHouseOutage(run.store) as outage:
            began = time.monotonic()
            await send_events(run.bootstrap, rest)
            await asyncio.sleep(max(0.0, down_s - (time.monotonic() - began)))
            unhealthy = worker.unhealthy()
        run.notes.append(f"/healthz at the end of the outage: {unhealthy or 'ok'}")
        failures = metric(worker.worker, "gpuledger_sink_failures_total", sink="clickhouse")
        run.check(
            f"ClickHouse refused {outage.refused} calls ({type(outage.error).__name__}) for "
            f"{down_s:.0f} s; the worker counted {failures:.0f} failed writes",
            outage.refused > 0 and failures > 0,
        )
        await run.converge()

    return await run_drill(f"ClickHouse down {down_s:.0f} s", env, baseline.ledger, body)


async def rebalance_in_clickhouse_outage(env: DrillEnv, baseline: Baseline) -> DrillResult:
    """Two workers; during a ClickHouse outage one leaves (the group rebalances) while both
    hold output they could not write; the other takes over and replays what was not durable."""
    down_s = env.settings.clickhouse_down_s

    async def body(run: DrillRun) -> None:
        rest = await start_mid_run(run)
        assert run.store is not None
        a = run.workers[0]
        a.label = "worker A"
        b = run.worker("worker B")
        await run.wait(
            lambda: bool(a.sample_partitions()) and bool(b.sample_partitions()),
            "both workers to own sample partitions",
        )
        with ClickHouseOutage(run.store) as outage:
            began = time.monotonic()
            await send_events(run.bootstrap, rest)
            await asyncio.sleep(min(2.0, down_s / 3))  # both fetch, fold, and fail to write
            left = await a.stop(run.settings.worker_timeout_s, while_failing=True)
            left_after = time.monotonic() - began
            # The group rebalances while ClickHouse is still down, however long A took.
            await asyncio.sleep(max(down_s - left_after, 2.0))
            run.check(
                f"worker A left {left_after:.0f} s into the outage, which lasted "
                f"{time.monotonic() - began:.0f} s",
                left,
            )
        run.check(f"ClickHouse refused {outage.refused} calls for {down_s:.0f} s", outage.refused)
        await run.converge([b])
        run.check(
            f"worker B took over every sample partition ({sorted(b.sample_partitions())})",
            len(b.sample_partitions()) == PARTITIONS,
        )

    name = "two workers, rebalance in ClickHouse outage"
    return await run_drill(name, env, baseline.ledger, body)


SKEWS: tuple[tuple[str, Callable[[int], int], frozenset[str]], ...] = (
    ("+10 min", lambda now_ms: now_ms + 600_000, frozenset({"clock_skew"})),
    ("2099", lambda _: 4_070_908_800_000, frozenset({"clock_skew"})),  # 2099-01-01T00:00:00Z
    ("9999", lambda _: 253_402_300_799_000, frozenset({"clock_skew"})),  # 9999-12-31T23:59:59Z
    ("1970", lambda _: 1_000, frozenset({"clock_skew", "too_late"})),  # older than retention
)


def skewed_events(now_ms: int) -> list[tuple[str, CloudEvent[Any], frozenset[str]]]:
    """A node agent's GPU sample, a token scraper's delta and a pod watcher's event stamped by
    clocks set wrong. Only the event time is wrong: the Kafka record timestamp is the
    producer's (right) clock, since Kafka 4 refuses record timestamps more than an hour ahead."""
    sample = next(ev for ev in gpu_samples() if ev.data.device_uuid == "GPU-l40s")
    delta = token_events()[0]
    pod = pod_events()[0]
    out = []
    for label, when, reasons in SKEWS:
        time_ms = when(now_ms)
        for base, source in ((sample, "agent/n3"), (delta, "tokens"), (pod, "pods")):
            event = make_event(
                base.data, event_id=f"skew:{label}:{base.id}", source=source, time_ms=time_ms
            )
            out.append((f"{type(base.data).__name__} at {label}", event, reasons))
    return out


async def clock_skew(env: DrillEnv, baseline: Baseline) -> DrillResult:
    """Samples, token deltas and pod events from clocks at +10 min, 2099, 9999 and 1970,
    mid-run."""

    async def body(run: DrillRun) -> None:
        rest = await start_mid_run(run)
        skewed = skewed_events(int(time.time() * 1000))
        sent = await send(run.bootstrap, [record_of(ev) for _, ev, _ in skewed])
        run.expect_dead_letters(sent, [(label, reasons) for label, _, reasons in skewed])
        await send_events(run.bootstrap, rest)
        await run.converge()

    return await run_drill("clock skew +10 min/2099/9999/1970", env, baseline.ledger, body)


def _doc(event: CloudEvent[Any], **changes: Any) -> bytes:
    doc = event_to_dict(event)
    for path, value in changes.items():
        target = doc
        *parents, last = path.split("__")
        for part in parents:
            target = target[part]
        target[last] = value
    return orjson.dumps(doc)


def input_poison() -> list[tuple[Record, str, frozenset[str]]]:
    """Unusable records for each input topic, each with the reasons it may be dead-lettered for."""
    sample = gpu_samples()[0]
    delta = token_events()[0]
    pod = pod_events()[0]
    envelope = b'{"specversion":"1.0"}'
    one = frozenset
    out: list[tuple[Record, str, frozenset[str]]] = []
    samples: list[tuple[str, bytes | None, frozenset[str]]] = [
        ("not JSON", b"not json", one({"invalid_json"})),
        ("null value", None, one({"empty"})),
        ("zero-length value", b"", one({"empty", "invalid_json"})),
        ("binary", b"\xff\x00\xfe", one({"invalid_json"})),
        ("bare envelope", envelope, one({"missing_field"})),
        ("token delta", _doc(delta, id="poison:delta"), one({"wrong_topic"})),
        ("SM 250 %", _doc(sample, id="poison:sm", data__sm_util_pct=250.0), one({"out_of_range"})),
        (
            "unknown version",
            _doc(sample, id="poison:v9", type="io.gpuledger.gpu.sample.v9"),
            one({"unknown_version", "unknown_type"}),
        ),
    ]
    tokens: list[tuple[str, bytes | None, frozenset[str]]] = [
        ("not JSON", b"{not json", one({"invalid_json"})),
        ("null value", None, one({"empty"})),
        ("zero-length value", b"", one({"empty", "invalid_json"})),
        ("bare envelope", envelope, one({"missing_field"})),
        ("GPU sample", _doc(sample, id="poison:sample"), one({"wrong_topic"})),
        (
            "negative tokens",
            _doc(delta, id="poison:neg", data__prompt_tokens=-5),
            one({"out_of_range"}),
        ),
    ]
    pods: list[tuple[str, bytes | None, frozenset[str]]] = [
        ("not JSON", b"not json", one({"invalid_json"})),
        ("bare envelope", envelope, one({"missing_field"})),
        ("token delta", _doc(delta, id="poison:pod-delta"), one({"wrong_topic"})),
        ("no uid", _doc(pod, id="poison:pod-uid", data__uid=None), one({"wrong_type"})),
    ]
    for topic, key, items in (
        (GPU_SAMPLES_TOPIC, b"GPU-h100-a", samples),
        (TOKENS_TOPIC, b"uid-search", tokens),
        (PODS_TOPIC, None, pods),
    ):
        for i, (label, value, reasons) in enumerate(items):
            record_key = key if key is not None else f"poison-{i}".encode()
            out.append((Record(topic, record_key, value), label, reasons))
    return out


INTERNAL_POISON: tuple[tuple[str, bytes | None], ...] = (
    ("not JSON", b"not json"),
    ("zero-length value", b""),
    ("null value", None),
    ("JSON null", b"null"),
    ("unknown kind", b'{"kind":"bogus"}'),
    (
        "marker of wrong types",
        b'{"kind":"marker","source_partition":"zero","source_partitions":2,"end_ms":"never"}',
    ),
    (
        "pod cost of wrong types",
        b'{"kind":"partial","window_start_ms":"yesterday","device_uuid":7,'
        b'"pod_uid":"uid-search","cost_usd":1.5,"samples":"many","version":-1}',
    ),
)


def internal_poison(topics: dict[str, int]) -> list[tuple[Record, str, frozenset[str]]]:
    """Garbage on every partition of each internal topic (topic -> partitions)."""
    out = []
    for topic, partitions in topics.items():
        for i, (label, value) in enumerate(INTERNAL_POISON):
            partition = i % partitions
            record = Record(topic, b"poison", value, partition)
            out.append(
                (record, f"{label} (partition {partition})", frozenset({"invalid_internal"}))
            )
    return out


async def poison(env: DrillEnv, baseline: Baseline) -> DrillResult:
    """Garbage on every input topic and on the worker's internal topics mid-run; then a
    restart in the same group replays from the committed offsets."""

    async def body(run: DrillRun) -> None:
        rest = await start_mid_run(run)
        first = run.workers[0]
        names = await internal_topics(run.bootstrap)
        run.check(f"the worker's internal topics: {', '.join(names) or 'none'}", names)
        counts = (
            await partition_counts(KafkaSettings(bootstrap=run.bootstrap), names) if names else {}
        )
        bad = [*input_poison(), *internal_poison(counts)]
        sent = await send(run.bootstrap, [record for record, _, _ in bad])
        run.expect_dead_letters(sent, [(f"{label}", reasons) for _, label, reasons in bad])
        await send_events(run.bootstrap, rest)
        await run.converge()
        await first.stop(run.settings.worker_timeout_s)
        replay = run.worker("restarted worker", bounded=True)
        await replay.wait(run.settings.worker_timeout_s)
        run.notes.append(
            f"the restart re-read {replay.records(0)} sample and {replay.records(1)} "
            "token/internal records"
        )

    return await run_drill("poison on every input and internal topic", env, baseline.ledger, body)


def with_duplicates(
    stream: Sequence[CloudEvent[Any]], pods: Sequence[CloudEvent[PodInfo]], seed: int = 1
) -> tuple[list[CloudEvent[Any]], dict[str, int]]:
    """The stream with 1 % of each topic's events (at least one) sent again, each up to 60
    events later (often after its window closed); a pod event is sent again mid-stream."""
    rng = random.Random(seed)
    out = list(stream)
    resent: Counter[str] = Counter()
    samples = [i for i, ev in enumerate(stream) if isinstance(ev.data, GpuSample)]
    tokens = [i for i, ev in enumerate(stream) if isinstance(ev.data, TokenDelta)]
    inserts: list[tuple[int, CloudEvent[Any]]] = []
    for topic, indices in ((GPU_SAMPLES_TOPIC, samples), (TOKENS_TOPIC, tokens)):
        for i in rng.sample(indices, math.ceil(len(indices) / 100)):
            inserts.append((min(len(stream), i + rng.randint(1, 60)), stream[i]))
            resent[topic] += 1
    for _ in range(math.ceil(len(pods) / 100)):
        inserts.append((len(stream) // 2, rng.choice(list(pods))))
        resent[PODS_TOPIC] += 1
    for position, event in sorted(inserts, key=lambda item: item[0], reverse=True):
        out.insert(position, event)
    return out, dict(resent)


async def duplicates(env: DrillEnv, baseline: Baseline) -> DrillResult:
    """1 % of the events re-sent (same CloudEvent id), some after their window closed."""

    async def body(run: DrillRun) -> None:
        bootstrap = await run.broker()
        run.open_store()
        pods, stream = good_events()
        delivery, resent = with_duplicates(stream, pods)
        await send_events(bootstrap, pods)
        worker = run.worker("worker")
        await run.wait(lambda: bool(worker.sample_partitions()), "the worker's partitions")
        await send_events(bootstrap, delivery, chunk=10, pause_s=0.1)
        await run.converge()
        counted = {
            t: int(metric(worker.worker, "gpuledger_events_duplicate_total", topic=t))
            for t in resent
        }
        run.check(f"duplicates dropped: {counted} of {resent} re-sent", counted == resent)

    return await run_drill("1 % duplicate events", env, baseline.ledger, body)


def shuffled_within_grace(
    stream: Sequence[CloudEvent[Any]], seed: int = 7
) -> tuple[list[CloudEvent[Any]], int]:
    """Delivery order = event time plus a random delay under the grace: an event can come
    after others only if they are less than the grace newer. Returns it and how many events
    came after a newer one of the same topic and key."""
    rng = random.Random(seed)
    delivery = sorted(stream, key=lambda ev: ev.time_ms + rng.uniform(0, GRACE_MS - 1))
    newest: dict[tuple[str, bytes | None], int] = {}
    inversions = 0
    for ev in delivery:
        record = record_of(ev)
        key = (record.topic, record.key)
        inversions += ev.time_ms < newest.get(key, -1)
        newest[key] = max(newest.get(key, -1), ev.time_ms)
    return delivery, inversions


async def out_of_order(env: DrillEnv, baseline: Baseline) -> DrillResult:
    """Samples and token deltas delivered out of order, each within the grace."""

    async def body(run: DrillRun) -> None:
        bootstrap = await run.broker()
        run.open_store()
        pods, stream = good_events()
        delivery, inversions = shuffled_within_grace(stream)
        run.check(f"{inversions} events came after newer ones of their key", inversions > 0)
        await send_events(bootstrap, pods)
        worker = run.worker("worker")
        await run.wait(lambda: bool(worker.sample_partitions()), "the worker's partitions")
        await send_events(bootstrap, delivery, chunk=10, pause_s=0.1)
        await run.converge()
        late = metric(worker.worker, "gpuledger_events_late_total")
        run.notes.append(f"events the worker took as corrections (late): {late:.0f}")

    return await run_drill("out-of-order within grace", env, baseline.ledger, body)


async def late_pod_metadata(env: DrillEnv, baseline: Baseline) -> DrillResult:
    """A pod's metadata arrives after its first window closed (mid-run)."""

    async def body(run: DrillRun) -> None:
        bootstrap = await run.broker()
        run.open_store()
        pods, stream = good_events(include_late_pod=False)
        first, rest = split(stream)
        await send_events(bootstrap, [*pods, *first])
        run.worker("worker")
        ledger = await run.wait_ledger(
            lambda ledger: ledger.has_row(COST_TABLE, T0, "GPU-l40s"),
            "the late pod's device's first window",
        )
        teams = ledger.teams_of(COST_TABLE, "uid-late")
        run.notes.append(f"before its metadata, uid-late was billed to {sorted(teams)}")
        run.check(
            "uid-late's first window was written before its metadata arrived",
            ledger.has_row(COST_TABLE, T0, "GPU-l40s"),
        )
        late = [ev for ev in pod_events() if ev.data.uid == "uid-late"]
        await send_events(bootstrap, [*late, *rest])
        await run.converge()

    name = "pod metadata after its first window closed"
    return await run_drill(name, env, baseline.ledger, body)


@dataclass(frozen=True)
class Drill:
    slug: str
    run: Callable[[DrillEnv, Baseline], Awaitable[DrillResult]]
    needs: str = ""  # a feature it depends on, where one is still being built


DRILLS: tuple[Drill, ...] = (
    Drill("sigkill", sigkill_mid_window),
    Drill("broker_restart", broker_restart),
    Drill("clickhouse_down", clickhouse_down),
    Drill("clock_skew", clock_skew, "clock sanity: the clock_skew dead letter"),
    Drill("poison", poison, "typed internal topics with dead letters"),
    Drill("rebalance_in_outage", rebalance_in_clickhouse_outage, "the sink failure policy"),
    Drill("duplicates", duplicates),
    Drill("out_of_order", out_of_order),
    Drill("late_pod", late_pod_metadata, "first-known pod metadata"),
)


def drill(slug: str) -> Drill:
    return next(d for d in DRILLS if d.slug == slug)

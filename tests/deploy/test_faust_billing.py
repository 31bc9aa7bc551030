"""The faust billing example (deploy/examples/faust_billing.py) on the real Kafka broker: worker
output written as the worker writes it (ClickHouse first, then `cost-windows` messages routed
by device), the app SIGKILLed after it has read more than it committed, restarted, and its
per-team totals compared with ClickHouse's FINAL totals, exactly.

The scenario's rows come from the real allocation core (deploy_scenario): first versions, a
replay of a third of them (equal versions), corrections at version 2, and after those the
stale version-1 rows again. A restarted faust app re-reads everything after its last commit and
recovers the rest from its table's changelog, so summing messages would count rows twice."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner
from deploy_scenario import REPO, build

from streams.rows import CostRow, as_json
from streams.store import ClickHouseStore

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

EXAMPLE = REPO / "deploy" / "examples" / "faust_billing.py"
PARTITIONS = 3
WAIT_S = 60.0


@dataclass(frozen=True)
class Phases:
    before_kill: list[CostRow]  # read and committed before the kill
    at_kill: list[CostRow]  # read, not committed: read again after the restart
    after_kill: list[CostRow]  # written while the app is down
    final: list[CostRow]  # per key, the highest version

    @property
    def messages(self) -> list[CostRow]:
        return [*self.before_kill, *self.at_kill, *self.after_kill]


def phases() -> Phases:
    scenario = build()

    def cost_rows(batch: Sequence[object]) -> list[CostRow]:
        rows = [r for r in batch if isinstance(r, CostRow)]
        assert len(rows) == len(batch)
        return rows

    first, replay, corrections = (cost_rows(scenario.inserts[i]) for i in (0, 3, 4))
    assert corrections, "the scenario must correct some rows"
    by_key = {r.key: r for r in first}
    cut = len(first) * 3 // 4
    return Phases(
        before_kill=first[:cut],
        at_kill=[*first[cut:], *replay],
        after_kill=[
            *corrections,
            *(by_key[c.key] for c in corrections),  # stale: version 1 after version 2
            *corrections[:5],  # equal versions again
        ],
        final=list(scenario.final_costs),
    )


def final_totals(store: ClickHouseStore) -> dict[str, Decimal]:
    rows = store.query_rows(
        f"SELECT team, sum(cost_usd) FROM {store.database}.gpu_cost_windows FINAL"
        " GROUP BY team ORDER BY team"
    )
    return {str(team): Decimal(str(cost)) for team, cost in rows}


def naive_totals(rows: Sequence[CostRow]) -> dict[str, Decimal]:
    totals: dict[str, Decimal] = {}
    for r in rows:
        totals[r.team] = totals.get(r.team, Decimal(0)) + r.cost_usd
    return dict(sorted(totals.items()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class FaustApp:
    """The example as a subprocess: `python faust_billing.py worker`, logs to a file."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log(self) -> Path:
        return self.workdir / f"faust-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(EXAMPLE),
                    "worker",
                    "-l",
                    "info",
                    "--web-port",
                    str(self.port),
                ],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    async def wait_for(
        self, until: Callable[[dict[str, Any]], bool], what: str, timeout_s: float = WAIT_S
    ) -> dict[str, Any]:
        """Poll /totals/ until `until` holds; fail with the last answer and the log if not."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] | None = None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"faust exited {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    async with session.get(f"http://127.0.0.1:{self.port}/totals/") as resp:
                        if resp.status == 200:
                            last = await resp.json()
                except (aiohttp.ClientError, OSError, TimeoutError):
                    pass  # not listening yet
                if last is not None and until(last):
                    return last
                await asyncio.sleep(0.25)
        pytest.fail(f"timed out waiting for {what}; last answer {last}\n{self.log_tail()}")


def teams(answer: dict[str, Any]) -> dict[str, Decimal]:
    return {team: Decimal(cost) for team, cost in answer["teams"].items()}


async def committed_offsets(bootstrap: str, group: str, topic: str) -> int:
    """How many of `topic`'s messages the group has committed, all partitions together."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset > 0)


async def end_offsets(bootstrap: str, topic: str) -> dict[str, int]:
    """Partition (as the app's JSON names it) -> end offset, for partitions holding messages."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(PARTITIONS)])
    finally:
        await consumer.stop()
    return {str(tp.partition): offset for tp, offset in ends.items() if offset > 0}


@pytest.fixture
def faust_app(kafka_bootstrap: str, tmp_path: Path) -> Iterator[FaustApp]:
    run = uuid.uuid4().hex[:10]  # reruns on one broker share neither topic nor group
    env = {
        **os.environ,
        "GPULEDGER_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "GPULEDGER_BILLING_TOPIC": f"gpuledger.cost-windows.faust-{run}",
        "GPULEDGER_BILLING_APP_ID": f"faust-billing-{run}",
        "GPULEDGER_BILLING_APP_DATADIR": str(tmp_path / "data"),
        # No commit on the timer: offsets are committed only every BROKER_COMMIT_EVERY messages
        # (set by the test), so what the kill leaves uncommitted is known.
        "GPULEDGER_BILLING_BROKER_COMMIT_INTERVAL": "600",
        # The restarted worker gets the partitions once the killed one's session has expired.
        "GPULEDGER_BILLING_BROKER_SESSION_TIMEOUT": "8",
        "GPULEDGER_BILLING_BROKER_HEARTBEAT_INTERVAL": "1",
    }
    app = FaustApp(env, tmp_path)
    try:
        yield app
    finally:
        app.kill()


async def test_totals_survive_sigkill_and_match_clickhouse_final(
    kafka_bootstrap: str, store: ClickHouseStore, faust_app: FaustApp
) -> None:
    p = phases()
    # The comparison means something: summing every message is not what FINAL reads.
    assert naive_totals(p.messages) != naive_totals(p.final)
    topic = faust_app.env["GPULEDGER_BILLING_TOPIC"]
    group = faust_app.env["GPULEDGER_BILLING_APP_ID"]
    # One commit, on the first message after the first phase: the first phase is committed
    # (after the kill it exists only in the changelog), the second is not (it is read again).
    assert len(p.at_kill) < len(p.before_kill)
    faust_app.env["GPULEDGER_BILLING_BROKER_COMMIT_EVERY"] = str(len(p.before_kill))

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)]
        )
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    partitioner = DefaultPartitioner()

    async def write(rows: Sequence[CostRow]) -> dict[str, int]:
        """As the worker writes: ClickHouse, then Kafka (key = row key, partition = murmur2 of
        the device, so a row key stays on one partition); returns the topic's end offsets."""
        store.insert_rows(rows)
        partitions = sorted(await producer.partitions_for(topic))
        sent = [
            await producer.send(
                topic,
                orjson.dumps(as_json(r)),
                key=r.key.encode(),
                partition=partitioner(r.device_uuid.encode(), partitions, partitions),
            )
            for r in rows
        ]
        await asyncio.gather(*sent)
        return await end_offsets(kafka_bootstrap, topic)

    def caught_up(ends: dict[str, int]) -> Callable[[dict[str, Any]], bool]:
        return lambda answer: bool(answer["ready"]) and answer["read_up_to"] == ends

    try:
        ends = await write(p.before_kill)
        faust_app.start()
        answer = await faust_app.wait_for(caught_up(ends), "the first phase")
        assert teams(answer) == final_totals(store)

        ends = await write(p.at_kill)
        answer = await faust_app.wait_for(caught_up(ends), "the second phase")
        assert teams(answer) == final_totals(store)
        committed = await committed_offsets(kafka_bootstrap, group, topic)
        uncommitted = sum(ends.values()) - committed
        assert committed > 0, "the first phase must be committed before the kill"
        assert uncommitted > 0, "the kill must leave read but uncommitted messages"
        faust_app.kill()

        ends = await write(p.after_kill)
        want = final_totals(store)
        assert want == naive_totals(p.final)
        faust_app.start()
        answer = await faust_app.wait_for(caught_up(ends), "the restarted app to catch up")
    finally:
        await producer.stop()

    assert teams(answer) == want
    # It read again at least what the kill left uncommitted (faust may redeliver a few more
    # after its start-up seek): a table that added costs would count those twice.
    assert answer["events_seen"] - len(p.after_kill) >= uncommitted
    [(distinct,)] = store.query_rows(f"SELECT count() FROM {store.database}.gpu_cost_windows FINAL")
    assert answer["rows"] == distinct == len(p.final)

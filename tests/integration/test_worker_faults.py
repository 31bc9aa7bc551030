"""The worker under faults: ClickHouse down, two workers, late events, SIGKILL and restart.

Whatever happens, the final rows in ClickHouse equal what the allocation core computes from
the whole input, and nothing is lost or counted twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from clickhouse_connect.driver.exceptions import OperationalError
from test_worker_e2e import (
    assert_matches_core,
    broker,  # noqa: F401 - fixture
    make_worker,
    read_topic,
    run_worker,
    stored,
)
from worker_scenario import (
    PODS,
    T0,
    comparable,
    expected_rows,
    gpu_samples,
    pod_events,
    publish,
    publish_scenario,
    token_events,
)

from gpuledger.embedded_broker import free_port
from schemas.events import (
    DEAD_LETTER_TOPIC,
    GPU_SAMPLES_TOPIC,
    PODS_TOPIC,
    TOKEN_COST_WINDOWS_TOPIC,
    make_event,
)
from streams.rows import CostRow, TokenCostRow, TokenRow
from streams.store import ClickHouseStore
from streams.worker.app import WorkerConfig
from streams.worker.device_stage import DeviceStage

pytestmark = pytest.mark.kafka
REPO = Path(__file__).resolve().parents[2]


async def test_clickhouse_down_for_a_while_loses_nothing(
    broker: str,  # noqa: F811
    store: ClickHouseStore,
) -> None:
    await publish_scenario(broker)
    client = store._client
    real_insert = client.insert
    down_until = time.monotonic() + 4
    calls = {"failed": 0}

    def flaky_insert(*args: Any, **kwargs: Any) -> Any:
        if time.monotonic() < down_until:
            calls["failed"] += 1
            raise OperationalError("Error HTTPConnectionPool: Connection refused")
        return real_insert(*args, **kwargs)

    client.insert = flaky_insert
    worker = make_worker(broker, store)
    try:
        await run_worker(worker)
    finally:
        client.insert = real_insert
    assert calls["failed"] > 0
    failures = worker.registry.get_sample_value(
        "gpuledger_sink_failures_total", {"sink": "clickhouse"}
    )
    assert failures == calls["failed"]
    assert_matches_core(store)


async def test_two_workers_produce_the_rows_of_one(
    broker: str,  # noqa: F811
    store: ClickHouseStore,
) -> None:
    first = make_worker(broker, store, exit_when_idle_s=10.0)
    second = make_worker(broker, store, exit_when_idle_s=10.0)
    running = asyncio.gather(run_worker(first), run_worker(second))

    def both_own_sample_partitions() -> bool:
        return all(w.runners and w.runners[0].consumer.assignment() for w in (first, second))

    # Both in the group before the data: commits follow the open windows, so a worker that
    # joined once the other had read everything would be given nothing left to read.
    deadline = time.monotonic() + 60
    while not both_own_sample_partitions() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert both_own_sample_partitions()
    await publish_scenario(broker)
    await running
    assert first.runners[0].records > 0 and second.runners[0].records > 0
    assert_matches_core(store)


async def test_late_events_correct_rows_within_the_late_horizon_and_dead_letter_beyond(
    broker: str,  # noqa: F811
    store: ClickHouseStore,
) -> None:
    await publish_scenario(broker)
    await run_worker(make_worker(broker, store))
    before = {r.key: r for r in stored(store)[0]}

    # A restarted worker reads only what came after its commits: the late sample's closed
    # window comes back from its checkpoint, the 3 h old one (past the 1 h retention, within
    # the 4 h late horizon: a long agent outage) opens its window, the 5 h old one is too late.
    base = gpu_samples()[0]  # GPU-h100-a, first window
    late = make_event(base.data, event_id="late-1", source="agent/n1", time_ms=base.time_ms + 7)
    outage = make_event(
        base.data, event_id="buffered-1", source="agent/n1", time_ms=T0 - 3 * 3600_000
    )
    too_old = make_event(
        base.data, event_id="ancient-1", source="agent/n1", time_ms=T0 - 5 * 3600_000
    )
    await publish(
        broker, GPU_SAMPLES_TOPIC, [late, outage, too_old], lambda ev: ev.data.device_uuid
    )
    restarted = make_worker(broker, store)
    await run_worker(restarted)
    assert restarted.devices.held.positions()  # it read ...
    assert restarted.runners[0].records == 3  # ... the three new samples only

    cost, tokens, cpt = stored(store)
    want = expected_rows([*gpu_samples(), late, outage], pod_events(), token_events())
    assert comparable(cost) == comparable(want[0])
    assert comparable(tokens) == comparable(want[1])
    assert comparable(cpt) == comparable(want[2])
    corrected = [
        r for r in cost if r.device_uuid == base.data.device_uuid and r.window_start_ms == T0
    ]
    assert corrected and all(r.version > before[r.key].version for r in corrected)
    letters = [orjson.loads(v) for _, v in await read_topic(broker, DEAD_LETTER_TOPIC)]
    assert [(d["reason"], d["topic"]) for d in letters] == [("too_late", GPU_SAMPLES_TOPIC)]


async def test_a_relabel_that_arrives_while_the_worker_is_down_corrects_its_closed_windows(
    broker: str,  # noqa: F811
    store: ClickHouseStore,
) -> None:
    """Every window was closed, checkpointed and committed; then, with no worker running, the
    pod watcher publishes a relabel dated in the first window. The restarted worker reads no
    sample again (its commits are past them), yet re-emits every retained window that reads
    the new labels, with both stages: the pods it saw change since the pods position written
    with the last checkpoints name the windows to restore."""
    await publish_scenario(broker)
    await run_worker(make_worker(broker, store))
    before = {r.key: r for r in stored(store)[0]}
    assert {r.team for r in before.values() if r.pod_uid == "uid-search"} == {"search"}

    moved = msgspec.structs.replace(PODS["uid-search"], labels={"team": "ranking", "product": "s"})
    relabel = make_event(moved, event_id="pod:uid-search:2", source="pods", time_ms=T0 + 30_000)
    await publish(broker, PODS_TOPIC, [relabel], lambda ev: ev.data.uid)
    restarted = make_worker(broker, store)
    await run_worker(restarted)
    assert restarted.runners[0].records == 0  # no sample read again

    cost, tokens, cpt = stored(store)
    want = expected_rows(gpu_samples(), [*pod_events(), relabel], token_events())
    assert comparable(cost) == comparable(want[0])
    assert comparable(tokens) == comparable(want[1])
    assert comparable(cpt) == comparable(want[2])
    search = [r for r in cost if r.pod_uid == "uid-search"]
    assert search and {r.team for r in search} == {"ranking"}
    assert all(r.version > before[r.key].version for r in search)
    assert {r.team for r in cpt if r.pod_uid == "uid-search"} == {"ranking"}


async def test_a_loop_that_dies_stops_the_worker_with_its_error(
    broker: str,  # noqa: F811
    store: ClickHouseStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await publish_scenario(broker)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("stage one broke")

    monkeypatch.setattr(DeviceStage, "add_samples", broken)
    worker = make_worker(broker, store, exit_when_idle_s=None)  # only a stop or a failure ends it
    with pytest.raises(ZeroDivisionError, match="stage one broke"):
        await run_worker(worker, timeout_s=60)
    assert worker.stopping.is_set()


def _latest_versions(records: list[tuple[bytes | None, bytes]]) -> dict[bytes | None, int]:
    latest: dict[bytes | None, int] = {}
    for key, value in records:
        latest[key] = max(latest.get(key, -1), orjson.loads(value)["version"])
    return latest


async def test_an_upgrade_from_the_old_stage_two_group_re_emits_the_same_rows(
    broker: str,  # noqa: F811
    store: ClickHouseStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stage two's group was `<group>.pods`; after the upgrade `<group>.token-costs` has no
    committed offsets and reads its inputs from the start. Its windows come back from the
    checkpoints the old group wrote, so every input it re-reads is a duplicate: nothing is
    re-emitted, the stored rows stay the same."""
    await publish_scenario(broker)
    with monkeypatch.context() as old:
        old.setattr(WorkerConfig, "token_costs_group", property(lambda c: f"{c.group_id}.pods"))
        await run_worker(make_worker(broker, store))
    before = await read_topic(broker, TOKEN_COST_WINDOWS_TOPIC)
    rows_before = stored(store)
    assert await _groups(broker) == {"gpuledger-worker", "gpuledger-worker.pods"}

    upgraded = make_worker(broker, store)
    await run_worker(upgraded)
    after = await read_topic(broker, TOKEN_COST_WINDOWS_TOPIC)
    assert upgraded.runners[1].records >= len(token_events())  # read from the start
    assert upgraded.runners[1].stage.restorer.checkpoints.loaded > 0  # type: ignore[attr-defined]
    assert len(after) == len(before)  # nothing re-sent
    assert _latest_versions(after) == _latest_versions(before)
    assert [comparable(t) for t in stored(store)] == [comparable(t) for t in rows_before]
    assert_matches_core(store)
    assert await read_topic(broker, DEAD_LETTER_TOPIC) == []
    # The old group stays, unused, until the broker expires its offsets or it is deleted.
    assert await _groups(broker) == {
        "gpuledger-worker",
        "gpuledger-worker.pods",
        "gpuledger-worker.token-costs",
    }


async def _groups(bootstrap: str) -> set[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {group for group, _ in await admin.list_consumer_groups()}
    finally:
        await admin.close()


def _query_folder(folder: Path, sql: str) -> list[list[Any]]:
    """Read a chDB folder from a subprocess: this process may hold another folder."""
    code = (
        "import sys, orjson; from streams.store import ClickHouseStore;"
        f"s = ClickHouseStore('chdb://{folder}');"
        "sys.stdout.buffer.write(orjson.dumps(s.query_rows(sys.argv[1]), default=str))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, sql], check=True, capture_output=True, timeout=120, cwd=REPO
    )
    rows: list[list[Any]] = orjson.loads(out.stdout)
    return rows


def _metric(port: int, name: str) -> float:
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
    except OSError:
        return 0.0
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _worker_process(
    bootstrap: str, folder: Path, port: int, *extra: str
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpuledger.cli",
            "worker",
            "--kafka",
            bootstrap,
            "--clickhouse",
            f"chdb://{folder}",
            "--metrics-port",
            str(port),
            "--partitions",
            "2",
            "--idle-flush-s",
            "2",
            "--flush-interval-s",
            "0.3",
            "--log-level",
            "WARNING",
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_sigkill_mid_run_and_restart_gives_the_same_totals(
    broker: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    asyncio.run(publish_scenario(broker))
    folder = tmp_path / "ledger"
    port = free_port()
    victim = _worker_process(broker, folder, port)
    deadline = time.monotonic() + 90
    while _metric(port, "gpuledger_events_total") < 100 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert victim.poll() is None, victim.stderr.read().decode() if victim.stderr else ""
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    survivor = _worker_process(broker, folder, free_port(), "--exit-when-idle", "4")
    _, err = survivor.communicate(timeout=180)
    assert survivor.returncode == 0, err.decode()[-3000:]

    def read(row_type: Any) -> list[Any]:
        names = [f.name for f in dataclasses.fields(row_type)]
        cols = ", ".join(
            f"toUnixTimestamp64Milli({n.removesuffix('_ms')})" if n.endswith("_ms") else n
            for n in names
        )
        rows = _query_folder(folder, f"SELECT {cols} FROM gpuledger.{row_type.TABLE} FINAL")
        return [row_type(**dict(zip(names, _typed(row_type, r), strict=True))) for r in rows]

    want = expected_rows(gpu_samples(), pod_events(), token_events())
    assert comparable(read(CostRow)) == comparable(want[0])
    assert comparable(read(TokenRow)) == comparable(want[1])
    assert comparable(read(TokenCostRow)) == comparable(want[2])


def _typed(row_type: Any, values: list[Any]) -> list[Any]:
    """JSON brought Decimals back as strings and ints as ints; restore the dataclass types."""
    from decimal import Decimal

    out = []
    for f, value in zip(dataclasses.fields(row_type), values, strict=True):
        if value is not None and "Decimal" in str(f.type):
            value = Decimal(str(value))
        elif value is not None and f.type == "float":
            value = float(value)
        out.append(value)
    return out

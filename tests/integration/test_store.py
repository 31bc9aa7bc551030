"""ClickHouse store on the real engine (chDB): DDL, idempotent and versioned inserts."""

from __future__ import annotations

import contextlib
import dataclasses
from decimal import Decimal

import pytest

from runtime.errors import StoreError
from runtime.redaction import redact
from streams.rows import CostRow, TokenCostRow, TokenRow
from streams.store import ClickHouseStore, ddl_statements

T0 = 1_795_000_020_000


def cost_row(pod_uid: str = "pod-a", cost: str = "0.015", version: int = 1) -> CostRow:
    return CostRow(
        T0,
        T0 + 60_000,
        "c1",
        "n1",
        "GPU-1",
        "GPU-1",
        "NVIDIA H100 80GB HBM3",
        "",
        "search",
        "vllm-0",
        pod_uid,
        "search",
        "assistant",
        "CC-1",
        "usage",
        15.0,
        40.0,
        2e10,
        Decimal(cost),
        Decimal(0),
        Decimal("3.6"),
        "on_demand",
        version,
    )


def token_row(version: int = 1) -> TokenRow:
    return TokenRow(
        T0,
        T0 + 60_000,
        "c1",
        "search",
        "vllm-0",
        "pod-a",
        "llama",
        2000,
        1000,
        4,
        100,
        1.5,
        6.0,
        version,
    )


def token_cost_row(version: int = 1) -> TokenCostRow:
    return TokenCostRow(
        T0,
        T0 + 60_000,
        "c1",
        "search",
        "vllm-0",
        "pod-a",
        "search",
        "assistant",
        "CC-1",
        "llama",
        Decimal("0.045"),
        2000,
        1000,
        4,
        100,
        1.5,
        6.0,
        Decimal("15"),
        version,
    )


def totals(store: ClickHouseStore) -> tuple[int, Decimal]:
    rows = store.query_rows(
        f"SELECT count(), sum(cost_usd) FROM {store.database}.gpu_cost_windows FINAL"
    )
    return int(rows[0][0]), Decimal(rows[0][1])


def test_schema_creation_is_idempotent(store: ClickHouseStore) -> None:
    store.create_schema()
    tables = {r[0] for r in store.query_rows(f"SHOW TABLES FROM {store.database}")}
    assert {"gpu_cost_windows", "token_windows", "cost_per_token_windows"} <= tables
    columns = dict(
        store.query_rows(
            f"SELECT name, type FROM system.columns WHERE database = '{store.database}' "
            "AND table = 'gpu_cost_windows'"
        )
    )
    assert columns["cost_usd"] == "Decimal(38, 15)"
    assert columns["window_start"] == "DateTime64(3, 'UTC')"


def test_writing_the_same_rows_twice_leaves_one_per_key(store: ClickHouseStore) -> None:
    rows = [cost_row("pod-a"), cost_row("pod-b", "0.03")]
    store.insert_rows(rows)
    store.insert_rows(rows)
    assert totals(store) == (2, Decimal("0.045"))


def test_a_higher_version_replaces_the_row(store: ClickHouseStore) -> None:
    store.insert_rows([cost_row(cost="0.015", version=1)])
    store.insert_rows([cost_row(cost="0.020", version=3)])
    store.insert_rows([cost_row(cost="0.999", version=2)])  # a stale re-send loses
    assert totals(store) == (1, Decimal("0.020"))


def test_a_retried_batch_with_the_same_token_is_dropped(store: ClickHouseStore) -> None:
    rows = [cost_row("pod-a"), cost_row("pod-b")]
    store.insert_rows(rows, dedup_token="orders-0-100")
    store.insert_rows(rows, dedup_token="orders-0-100")
    raw = store.query_rows(f"SELECT count() FROM {store.database}.gpu_cost_windows")
    assert raw[0][0] == 2


def test_all_three_tables_round_trip(store: ClickHouseStore) -> None:
    assert store.insert_rows([cost_row(), token_row(), token_cost_row()]) == 3
    got = store.query_dicts(f"SELECT * FROM {store.database}.cost_per_token_windows FINAL")
    assert got[0]["cost_per_1m_tokens"] == Decimal("15")
    assert got[0]["cost_usd"] == Decimal("0.045")
    tokens = store.query_dicts(f"SELECT * FROM {store.database}.token_windows FINAL")
    assert tokens[0]["prompt_tokens"] == 2000
    assert tokens[0]["window_start"].timestamp() * 1000 == pytest.approx(T0)


def test_null_cost_per_token_is_stored_as_null(store: ClickHouseStore) -> None:
    store.insert_rows([dataclasses.replace(token_cost_row(), cost_per_1m_tokens=None)])
    got = store.query_rows(
        f"SELECT cost_per_1m_tokens FROM {store.database}.cost_per_token_windows FINAL"
    )
    assert got == [(None,)]


def test_money_sums_are_exact(store: ClickHouseStore) -> None:
    rows = [cost_row(f"pod-{i}", "0.000000000000001") for i in range(1000)]
    store.insert_rows(rows)
    assert totals(store) == (1000, Decimal("0.000000000001"))


def test_bad_sql_is_a_store_error(store: ClickHouseStore) -> None:
    with pytest.raises(StoreError, match="ClickHouse query failed"):
        store.query_rows("SELECT * FROM no_such_table_here")


def test_server_dsn_password_is_redacted() -> None:
    assert redact("https://alice:s3cret@ch.example:8443/ledger") == (
        "https://alice:***@ch.example:8443/ledger"
    )
    assert "{db}" not in " ".join(ddl_statements("gpuledger"))


def test_relative_embedded_folders_are_made_absolute(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streams.store import embedded_dsn

    monkeypatch.chdir(str(tmp_path))
    assert embedded_dsn("chdb://./ledger") == f"chdb://{tmp_path}/ledger"
    assert embedded_dsn("chdb://ledger") == f"chdb://{tmp_path}/ledger"
    assert embedded_dsn("chdb:///var/lib/ledger") == "chdb:///var/lib/ledger"


OLD_COST_HOURLY = """
CREATE TABLE {db}.gpu_cost_hourly
(
    hour DateTime('UTC'), cluster LowCardinality(String), node LowCardinality(String),
    device_uuid String, gpu_model LowCardinality(String), pricing LowCardinality(String),
    namespace LowCardinality(String), pod String, pod_uid String, team LowCardinality(String),
    product LowCardinality(String), cost_center LowCardinality(String),
    kind LowCardinality(String), device_seconds Float64, sm_pct_window_s Float64,
    window_s Float64, cost_usd Decimal(38, 15), idle_cost_usd Decimal(38, 15), windows UInt64
)
ENGINE = ReplacingMergeTree ORDER BY (hour, device_uuid, pod_uid)
"""


def test_rollups_of_an_older_shape_are_rebuilt_from_the_base_rows(
    store: ClickHouseStore,
) -> None:
    from streams.rollups import read_horizon, seal_hours

    db = store.database
    store.insert_rows([cost_row()])
    seal_hours(store, T0 + 3 * 3_600_000, retention_s=0)
    assert read_horizon(store) is not None
    # an installation from before the hourly rows knew their device's price
    store.command(f"DROP TABLE {db}.gpu_cost_hourly")
    store.command(OLD_COST_HOURLY.replace("{db}", db))
    store.create_schema()
    columns = [
        r[0]
        for r in store.query_rows(
            f"SELECT name FROM system.columns WHERE database = '{db}' AND table = 'gpu_cost_hourly'"
        )
    ]
    assert "price_per_hour" in columns and "mig_profile" in columns
    assert read_horizon(store) is None  # so the next seal rolls every hour up again
    seal_hours(store, T0 + 3 * 3_600_000, retention_s=0)
    rows = store.query_rows(f"SELECT price_per_hour, cost_usd FROM {db}.gpu_cost_hourly FINAL")
    assert rows == [(Decimal("3.6"), Decimal("0.015"))]
    store.create_schema()  # a schema of today's shape is left as it is
    assert read_horizon(store) is not None


def test_an_https_dsn_speaks_tls_on_any_port() -> None:
    """clickhouse-connect picks TLS by port (443, 8443); the DSN's scheme must decide it."""
    import socket
    import threading

    def connect(port: int) -> None:
        with contextlib.suppress(StoreError):
            ClickHouseStore(f"https://u@127.0.0.1:{port}/ledger")

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(10)
        threading.Thread(target=connect, args=(server.getsockname()[1],), daemon=True).start()
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            first = conn.recv(8)
    assert first[:1] == b"\x16", first  # a TLS handshake record, not "POST /..."

"""`redact()`: a DSN, or any message built from one, without its password, whatever form the
password came in."""

from __future__ import annotations

import pytest

from runtime.errors import ConfigError, StoreError
from runtime.redaction import redact
from streams.store import ClickHouseStore

SECRET = "Passw0rd"


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("https://alice:s3cret@ch.example:8443/ledger", "https://alice:***@ch.example:8443/ledger"),
        ("gpuledger:Passw0rd@127.0.0.1:18123", "gpuledger:***@127.0.0.1:18123"),
        ("gpuledger:Passw0rd@127.0.0.1:18123/db", "gpuledger:***@127.0.0.1:18123/db"),
        (
            "http://gpuledger@127.0.0.1:18123/gpuledger?password=Passw0rd",
            "http://gpuledger@127.0.0.1:18123/gpuledger?password=***",
        ),
        (
            "https://h:8443/db?user=u&password=Passw0rd&secure=1",
            "https://h:8443/db?user=u&password=***&secure=1",
        ),
        ("http://h/db?access_token=Passw0rd", "http://h/db?access_token=***"),
        ("http://h/db?client_secret=Passw0rd;x=1", "http://h/db?client_secret=***;x=1"),
        ("http://u:p%40ss@h:1/db", "http://u:***@h:1/db"),
        ("u:pa@ss:word@h:1", "u:***@h:1"),
        ("chdb:///var/lib/gpuledger", "chdb:///var/lib/gpuledger"),
        ("http://gpuledger@h:8123/gpuledger", "http://gpuledger@h:8123/gpuledger"),
    ],
)
def test_scheme_less_and_query_parameter_passwords_are_redacted(dsn: str, shown: str) -> None:
    assert redact(dsn) == shown


def test_a_message_quoting_a_dsn_is_redacted_and_known_secrets_go_too() -> None:
    message = (
        "cannot open 'gpuledger:Passw0rd@127.0.0.1:18123' (tried http://x:Passw0rd@h/ with "
        "password=Passw0rd, token Passw0rd)"
    )
    shown = redact(message, secrets=[SECRET])
    assert SECRET not in shown
    assert "gpuledger:***@127.0.0.1:18123" in shown and "cannot open" in shown


@pytest.mark.parametrize(
    "dsn",
    [
        "gpuledger:Passw0rd@127.0.0.1:18123",
        "gpuledger:Passw0rd@127.0.0.1:18123/gpuledger",
        "ftp://gpuledger:Passw0rd@127.0.0.1:18123/gpuledger",
    ],
)
def test_a_dsn_without_a_known_scheme_is_refused_without_its_password(dsn: str) -> None:
    with pytest.raises(ConfigError) as refused:
        ClickHouseStore(dsn)
    assert SECRET not in str(refused.value)
    assert "chdb:///path or http(s)://" in str(refused.value)


def test_invalid_database_name_error_is_redacted() -> None:
    with pytest.raises(StoreError) as refused:
        ClickHouseStore("http://gpuledger:Passw0rd@127.0.0.1:1/bad-name!")
    assert "invalid database name" in str(refused.value) and SECRET not in str(refused.value)


def test_the_worker_config_repr_does_not_show_the_dsn() -> None:
    from runtime.kafka import KafkaSettings
    from streams.worker.app import WorkerConfig

    config = WorkerConfig(KafkaSettings(), clickhouse_dsn="http://u:Passw0rd@h:8123/db")
    assert SECRET not in repr(config)

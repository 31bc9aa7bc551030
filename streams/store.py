"""ClickHouse access through clickhouse-connect: embedded chDB (`chdb:///path`) or a server
(`http(s)://user@host:8123/db`). Same DDL, same queries. Blocking: async callers run it in a
thread. clickhouse-connect errors are converted to `StoreError` here.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import struct
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError

from runtime.errors import StoreError, StoreLockedError
from runtime.options import EnvSecret, add_env_option, add_env_secret
from streams.rows import Row, as_values, column_names

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
DEFAULT_DATABASE = "gpuledger"
DEFAULT_DSN = "chdb://./gpuledger-data"
PASSWORD_ENV = "GPULEDGER_CLICKHOUSE_PASSWORD"
PASSWORD_FILE_ENV = "GPULEDGER_CLICKHOUSE_PASSWORD_FILE"
OWNER_FILE = ".gpuledger-owner.json"  # in an embedded folder: who holds it and where to read
_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def embedded_dsn(dsn: str) -> str:
    """`chdb://./data` and `chdb://data` are folders relative to the working directory, which
    clickhouse-connect would read as a database name: make the folder absolute."""
    parts = urlsplit(dsn)
    folder = (parts.netloc + parts.path) or "."
    if folder == "memory":
        return dsn
    return f"chdb://{Path(folder).resolve()}"


def redact(dsn: str) -> str:
    """The DSN without its password, for logs and messages."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def add_clickhouse_option(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """--clickhouse, and the server password, from the environment or a file only."""
    add_env_option(
        parser,
        env,
        "--clickhouse",
        env="GPULEDGER_CLICKHOUSE_DSN",
        default=DEFAULT_DSN,
        metavar="DSN",
        help="chdb:///path (embedded) or http(s)://user@host:8123/db "
        f"(default {DEFAULT_DSN}; the password from {PASSWORD_ENV} or the file below)",
    )
    add_env_secret(parser, env, env=PASSWORD_ENV, dest="clickhouse_password")
    add_env_option(
        parser,
        env,
        "--clickhouse-password-file",
        env=PASSWORD_FILE_ENV,
        secret=True,
        metavar="FILE",
        help=f"file holding the server password (a mounted secret); it wins over {PASSWORD_ENV}",
    )


def store_from_args(args: argparse.Namespace) -> ClickHouseStore:
    """Open the store named by --clickhouse, with the password from the environment or file."""
    return ClickHouseStore(args.clickhouse, password=clickhouse_password(args))


def clickhouse_password(args: argparse.Namespace) -> str | None:
    """The server password: from the file of --clickhouse-password-file (a mounted secret),
    else from its variable; never printed."""
    path: str | None = getattr(args, "clickhouse_password_file", None)
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise StoreError(
                f"cannot read the ClickHouse password file (--clickhouse-password-file or "
                f"{PASSWORD_FILE_ENV}): {exc.strerror}"
            ) from exc
    secret: EnvSecret | None = getattr(args, "clickhouse_password", None)
    return secret.reveal() if secret is not None else None


def ddl_statements(database: str) -> list[str]:
    """Statements of every schemas/clickhouse*.sql file, in file-name order."""
    statements = []
    for path in sorted(SCHEMA_DIR.glob("clickhouse*.sql")):
        text = path.read_text(encoding="utf-8")
        body = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("--"))
        statements += [s.strip().replace("{db}", database) for s in body.split(";") if s.strip()]
    return statements


class ClickHouseStore:
    """One connection; a lock serialises calls because a client is not thread safe."""

    def __init__(
        self, dsn: str, *, database: str | None = None, password: str | None = None
    ) -> None:
        parts = urlsplit(dsn)
        self.embedded = parts.scheme == "chdb"
        self.dsn = embedded_dsn(dsn) if self.embedded else dsn
        self._password = password
        path_db = parts.path.strip("/") if not self.embedded else ""
        self.database = database or path_db or DEFAULT_DATABASE
        if not _DB_NAME.match(self.database):
            raise StoreError(f"invalid database name {self.database!r}")
        self._lock = threading.Lock()
        self._client = self._connect()

    def _connect(self) -> Any:
        try:
            if self.embedded:
                return clickhouse_connect.get_client(dsn=self.dsn)
            # The server's default database need not exist yet: connect to `default`.
            parts = urlsplit(self.dsn)
            extra: dict[str, Any] = {}
            if self._password is not None and parts.password is None:
                extra["password"] = self._password
            return clickhouse_connect.get_client(
                dsn=parts._replace(path="/default").geturl(), connect_timeout=5, **extra
            )
        except Exception as exc:  # clickhouse-connect and chdb raise many types here
            raise _convert(exc, f"cannot open ClickHouse at {redact(self.dsn)}") from exc

    def create_schema(self) -> None:
        for statement in ddl_statements(self.database):
            self.command(statement)

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        with self._lock:
            try:
                return self._client.command(sql, parameters=parameters)
            except Exception as exc:
                raise _convert(exc, "ClickHouse command failed") from exc

    def query_rows(
        self, sql: str, parameters: dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                result = self._client.query(sql, parameters=parameters)
            except Exception as exc:
                raise _convert(exc, "ClickHouse query failed") from exc
            return [tuple(r) for r in result.result_rows]

    def query_dicts(
        self, sql: str, parameters: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        with self._lock:
            try:
                result = self._client.query(sql, parameters=parameters)
            except Exception as exc:
                raise _convert(exc, "ClickHouse query failed") from exc
            names = result.column_names
            return [dict(zip(names, r, strict=True)) for r in result.result_rows]

    def insert_rows(self, rows: Iterable[Row], *, dedup_token: str | None = None) -> int:
        """Insert rows of any of the three tables; one insert per table. Returns rows written.

        With `dedup_token`, a retry of the same batch is dropped by ClickHouse; versions make a
        repeated row harmless anyway."""
        by_type: dict[type[Row], list[Row]] = defaultdict(list)
        for row in rows:
            by_type[type(row)].append(row)
        written = 0
        for row_type, batch in by_type.items():
            settings: dict[str, Any] = {}
            if dedup_token is not None:
                settings = {
                    "insert_deduplicate": 1,
                    "insert_deduplication_token": f"{dedup_token}:{row_type.TABLE}",
                }
            self._insert(
                row_type.TABLE, column_names(row_type), [as_values(r) for r in batch], settings
            )
            written += len(batch)
        return written

    def _insert(
        self,
        table: str,
        columns: list[str],
        values: Sequence[tuple[Any, ...]],
        settings: dict[str, Any],
    ) -> None:
        with self._lock:
            try:
                self._client.insert(
                    f"{self.database}.{table}", values, column_names=columns, settings=settings
                )
            except Exception as exc:
                raise _convert(exc, f"insert into {table} failed") from exc

    def close(self) -> None:
        with self._lock, contextlib.suppress(Exception):  # closing is best effort
            self._client.close()


def _convert(exc: Exception, context: str) -> StoreError:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "Cannot lock file" in str(exc) or "Error initializing EmbeddedServer" in str(exc):
        return StoreLockedError(
            f"{context}: the embedded data folder is in use by another process ({message})"
        )
    return StoreError(f"{context}: {message}", retriable=is_retriable(exc))


# ClickHouse error codes of a statement refused for what it is (its values, its columns or its
# SQL): sent again unchanged, it is refused again.
REFUSED_CODES = frozenset(
    {
        6,  # CANNOT_PARSE_TEXT
        8,  # THERE_IS_NO_COLUMN
        10,  # NOT_FOUND_COLUMN_IN_BLOCK
        16,  # NO_SUCH_COLUMN_IN_TABLE
        20,  # NUMBER_OF_COLUMNS_DOESNT_MATCH
        26,  # CANNOT_PARSE_QUOTED_STRING
        27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
        36,  # BAD_ARGUMENTS
        38,  # CANNOT_PARSE_DATE
        41,  # CANNOT_PARSE_DATETIME
        43,  # ILLEGAL_TYPE_OF_ARGUMENT
        44,  # ILLEGAL_COLUMN
        46,  # UNKNOWN_FUNCTION
        47,  # UNKNOWN_IDENTIFIER
        53,  # TYPE_MISMATCH
        62,  # SYNTAX_ERROR
        69,  # ARGUMENT_OUT_OF_BOUND
        70,  # CANNOT_CONVERT_TYPE
        72,  # CANNOT_PARSE_NUMBER
        117,  # INCORRECT_DATA
        131,  # TOO_LARGE_STRING_SIZE
        321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
        349,  # CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
        386,  # NO_COMMON_TYPE
        407,  # DECIMAL_OVERFLOW
        469,  # VIOLATED_CONSTRAINT
    }
)
TOO_MANY_PARTS = 252
# Code 252 says either: this block spans more partitions than `max_partitions_per_insert_block`
# (refused whatever the server's state), or the table has too many active parts (merges are
# behind: retry later).
PARTITIONS_LIMIT = "Too many partitions for single INSERT block"
_CODE = re.compile(r"\bCode:\s*(\d+)")


def is_retriable(exc: BaseException) -> bool:
    """Whether sending the same statement again may succeed (`StoreError.retriable`).

    Retriable: the server or the path to it failed (connection refused, timeouts, HTTP 429,
    503 or 504, too many parts while merges catch up, memory limits, a lost table or access:
    an operator can fix those). Not retriable: ClickHouse or the client refused the statement
    itself (a value the column's type cannot take, an unknown column, bad SQL, a block over
    the partitions limit). Unknown server errors count as retriable: a sink must not drop
    rows for an error it cannot place."""
    from clickhouse_connect.driver.exceptions import DataError, OperationalError, ProgrammingError

    if isinstance(exc, OperationalError):
        return True
    if isinstance(exc, (DataError, ProgrammingError)):
        return False  # the client could not encode the values, or named unknown columns
    if isinstance(exc, ClickHouseError):
        code = getattr(exc, "code", None)
        if code is None:
            found = _CODE.search(str(exc))
            code = int(found.group(1)) if found else None
        if code == TOO_MANY_PARTS:
            return PARTITIONS_LIMIT not in str(exc)
        return code not in REFUSED_CODES
    # chDB and the client's encoders raise these bare for a value its column cannot take
    return not isinstance(exc, (ValueError, TypeError, ArithmeticError, struct.error))

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
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError

from runtime.errors import ConfigError, StoreError, StoreLockedError
from runtime.options import EnvSecret, add_env_option, add_env_secret
from runtime.redaction import redact
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


DERIVED_SCHEMA = "clickhouse_rollups.sql"  # tables rebuilt from the others when reshaped
_CREATE_TABLE = re.compile(r"CREATE TABLE IF NOT EXISTS \S+?\.(\w+)\s*\((.*?)\)\s*ENGINE", re.S)


def ddl_statements(database: str, *, only: str | None = None) -> list[str]:
    """Statements of every schemas/clickhouse*.sql file (or of the file `only`), in file-name
    order."""
    statements = []
    for path in sorted(SCHEMA_DIR.glob("clickhouse*.sql")):
        if only is not None and path.name != only:
            continue
        text = path.read_text(encoding="utf-8")
        body = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("--"))
        statements += [s.strip().replace("{db}", database) for s in body.split(";") if s.strip()]
    return statements


def table_columns(statements: Iterable[str]) -> dict[str, list[str]]:
    """Each CREATE TABLE's table name and its column names, in order."""
    tables = {}
    for statement in statements:
        found = _CREATE_TABLE.search(statement)
        if found:
            lines = (ln.strip() for ln in found.group(2).splitlines())
            tables[found.group(1)] = [ln.split()[0] for ln in lines if ln]
    return tables


SCHEMES = ("chdb", "http", "https")
TIMEOUT_EXCEEDED = 159  # ClickHouse's code for a query stopped by max_execution_time


def split_dsn(dsn: str) -> tuple[str, str | None]:
    """The DSN without a `?password=` parameter (clickhouse-connect takes it as an argument,
    not in the DSN), and that password. A DSN of another scheme, or none (`user:pass@host`
    reads as scheme `user`), is refused, with its password masked."""
    parts = urlsplit(dsn)
    if parts.scheme not in SCHEMES or (parts.scheme != "chdb" and not parts.hostname):
        raise ConfigError(
            f"--clickhouse {redact(dsn)!r} is not chdb:///path or http(s)://user@host:port/db"
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    passwords = [value for name, value in query if name == "password"]
    if not passwords:
        return dsn, None
    kept = urlencode([(name, value) for name, value in query if name != "password"])
    return parts._replace(query=kept).geturl(), passwords[-1]


class TimeLimit:
    """The deadline of one read: each query it makes runs with ClickHouse's
    `max_execution_time` set to the time left, so the engine stops it there; `exceeded` says
    whether the limit cut the read short."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.exceeded = False

    def settings(self) -> dict[str, Any]:
        left_s = self.deadline - time.monotonic()
        if left_s <= 0:
            self.exceeded = True
            raise StoreError(f"ClickHouse query not run: the {self.seconds:g} s limit has passed")
        return {"max_execution_time": round(max(left_s, 0.001), 3)}


class ClickHouseStore:
    """One connection; a lock serialises calls because a client is not thread safe.

    `read_only`: the connection refuses writes (`readonly=2`, which still lets a query set
    its own time limit). `reader()` opens such a second connection for reports, so that a
    read neither waits for the writer's lock nor holds it."""

    def __init__(
        self,
        dsn: str,
        *,
        database: str | None = None,
        password: str | None = None,
        read_only: bool = False,
    ) -> None:
        dsn, dsn_password = split_dsn(dsn)
        parts = urlsplit(dsn)
        self.embedded = parts.scheme == "chdb"
        self.dsn = embedded_dsn(dsn) if self.embedded else dsn
        self.read_only = read_only
        # A password in the DSN beats the one from the environment or file; one in its user
        # part is read from there by clickhouse-connect.
        self._password = dsn_password if dsn_password is not None else password
        if parts.password is not None and dsn_password is None:
            self._password = None
        self._secrets = [s for s in (password, dsn_password, parts.password) if s]
        path_db = parts.path.strip("/") if not self.embedded else ""
        self.database = database or path_db or DEFAULT_DATABASE
        if not _DB_NAME.match(self.database):
            raise StoreError(f"invalid database name {self._redact(self.database)!r}")
        self._lock = threading.Lock()
        self._limit: TimeLimit | None = None
        self._client = self._connect()

    def _redact(self, text: str) -> str:
        return redact(text, secrets=self._secrets)

    def _connect(self) -> Any:
        settings = {"readonly": 2} if self.read_only else {}
        try:
            if self.embedded:
                return clickhouse_connect.get_client(dsn=self.dsn, settings=settings)
            # The server's default database need not exist yet: connect to `default`.
            parts = urlsplit(self.dsn)
            extra: dict[str, Any] = {}
            if self._password is not None:
                extra["password"] = self._password
            # The scheme decides TLS: clickhouse-connect would infer it from the port alone
            # (https on 443 and 8443 only), so https://host:9440 would go out as plain HTTP.
            return clickhouse_connect.get_client(
                dsn=parts._replace(path="/default").geturl(),
                interface=parts.scheme,
                secure=parts.scheme == "https",
                connect_timeout=5,
                settings=settings,
                **extra,
            )
        except Exception as exc:  # clickhouse-connect and chdb raise many types here
            raise self._error(exc, f"cannot open ClickHouse at {self._redact(self.dsn)}") from exc

    def _error(self, exc: Exception, context: str) -> StoreError:
        """`exc` as a StoreError, with no secret in its text; a query stopped by the engine
        under a time limit marks the limit exceeded."""
        error = _convert(exc, context)
        if self._limit is not None and _code(exc) == TIMEOUT_EXCEEDED:
            self._limit.exceeded = True
        text = self._redact(str(error))
        if text != str(error):
            error = type(error)(text, retriable=error.retriable)
        return error

    def reader(self) -> ClickHouseStore:
        """A second, read-only connection to the same database, with its own client and lock.
        On chDB it is another handle on the engine this process already runs."""
        return ClickHouseStore(
            self.dsn, database=self.database, password=self._password, read_only=True
        )

    @contextlib.contextmanager
    def time_limit(self, seconds: float) -> Iterator[TimeLimit]:
        """Bound the queries made inside to `seconds` in all. For a connection that serves
        one read at a time (a reader handed out by a pool)."""
        limit = self._limit = TimeLimit(seconds)
        try:
            yield limit
        finally:
            self._limit = None

    def create_schema(self) -> None:
        self._drop_reshaped_derived_tables()
        for statement in ddl_statements(self.database):
            self.command(statement)

    def _drop_reshaped_derived_tables(self) -> list[str]:
        """Drop the derived tables (DERIVED_SCHEMA) when one of them exists with other columns
        than the DDL says: they are rebuilt from the base rows, which they only summarise."""
        wanted = table_columns(ddl_statements(self.database, only=DERIVED_SCHEMA))
        names = ", ".join(f"'{name}'" for name in wanted)
        found: dict[str, list[str]] = {}
        for table, column in self.query_rows(
            f"SELECT table, name FROM system.columns WHERE database = '{self.database}' "
            f"AND table IN ({names}) ORDER BY table, position"
        ):
            found.setdefault(str(table), []).append(str(column))
        if all(found.get(table, columns) == columns for table, columns in wanted.items()):
            return []
        for table in wanted:
            self.command(f"DROP TABLE IF EXISTS {self.database}.{table}")
        return sorted(wanted)

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        with self._lock:
            try:
                return self._client.command(sql, parameters=parameters)
            except Exception as exc:
                raise self._error(exc, "ClickHouse command failed") from exc

    def _query(self, sql: str, parameters: dict[str, Any] | None) -> Any:
        settings = self._limit.settings() if self._limit is not None else None
        with self._lock:
            try:
                return self._client.query(sql, parameters=parameters, settings=settings)
            except Exception as exc:
                raise self._error(exc, "ClickHouse query failed") from exc

    def query_rows(
        self, sql: str, parameters: dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._query(sql, parameters).result_rows]

    def query_dicts(
        self, sql: str, parameters: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        result = self._query(sql, parameters)
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

    def insert_values(
        self,
        table: str,
        columns: list[str],
        values: Sequence[tuple[Any, ...]],
        *,
        dedup_token: str | None = None,
    ) -> int:
        """Insert plain tuples into `table` (of this database) in one insert; see insert_rows
        for `dedup_token`."""
        if not values:
            return 0
        settings: dict[str, Any] = {}
        if dedup_token is not None:
            settings = {"insert_deduplicate": 1, "insert_deduplication_token": dedup_token}
        self._insert(table, columns, values, settings)
        return len(values)

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
                raise self._error(exc, f"insert into {table} failed") from exc

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
        code = _code(exc)
        if code == TOO_MANY_PARTS:
            return PARTITIONS_LIMIT not in str(exc)
        return code not in REFUSED_CODES
    # chDB and the client's encoders raise these bare for a value its column cannot take
    return not isinstance(exc, (ValueError, TypeError, ArithmeticError, struct.error))


def _code(exc: BaseException) -> int | None:
    """The ClickHouse error code of `exc`, from its attribute or its text."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    found = _CODE.search(str(exc))
    return int(found.group(1)) if found else None

"""The reading commands' guard: every gpuledger error as one line on stderr with its exit
code, and the store of `--clickhouse` opened so that an embedded folder held by a running
worker or demo names where to read instead (its URL, or why there is none). Shared by
`gpuledger report|export|bill|plan` (streams.reports_cli, bill_cli, plan_cli, requests_cli)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from runtime.errors import ConfigError, GpuledgerError, StoreError, StoreLockedError
from streams.store import OWNER_FILE, ClickHouseStore, embedded_dsn, split_dsn, store_from_args

EXIT_ARGS, EXIT_STORE, EXIT_LOCKED = 2, 1, 3
# Reports not served over HTTP: a held folder says to stop its owner, not where to read them.
NOT_SERVED = ("forecast", "budget", "requests")


def guarded(command: str, args: argparse.Namespace, body: Callable[[], int]) -> int:
    """`body()`, with every gpuledger error as one line on stderr and its exit code."""
    try:
        return body()
    except StoreLockedError:
        print(f"{command}: {_locked_line(args)}", file=sys.stderr)
        return EXIT_LOCKED
    except ConfigError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return EXIT_ARGS
    except StoreError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return EXIT_STORE
    except GpuledgerError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return EXIT_STORE
    except OSError as exc:
        print(
            f"{command}: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr
        )
        return EXIT_STORE


def open_store(args: argparse.Namespace) -> ClickHouseStore:
    """The store of `--clickhouse`; an embedded folder held by a running worker or demo raises
    StoreLockedError (guarded names its URL)."""
    dsn: str = args.clickhouse
    split_dsn(dsn)  # a DSN of no known scheme is refused here, its password masked
    # clickhouse-connect logs connection failures itself; the one line below says it all
    driver_log = logging.getLogger("clickhouse_connect")
    driver_log.addHandler(logging.NullHandler())
    driver_log.propagate = False
    try:
        if dsn.startswith("chdb://"):
            with _native_stderr_silenced():
                store = store_from_args(args)
        else:
            store = store_from_args(args)
    except StoreError as exc:
        if dsn.startswith("chdb://") and _looks_held(_folder(dsn), str(exc)):
            raise StoreLockedError(str(exc)) from exc
        raise
    if store.embedded:
        store.create_schema()  # a new folder reads as empty, not as an error
    return store


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """chDB's engine writes its own errors to file descriptor 2; ours is the one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _folder(dsn: str) -> Path:
    return Path(urlsplit(embedded_dsn(dsn)).path)


def _looks_held(folder: Path, message: str) -> bool:
    """chDB reports a folder held by another process as "Cannot lock file" or, in some
    versions, as a failure to initialise the embedded server; the owner file confirms it."""
    if "Cannot lock file" in message:
        return True
    try:
        pid = int(json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return "EmbeddedServer" in message and (folder / "status").exists()
    return pid != os.getpid()


def _locked_line(args: argparse.Namespace) -> str:
    dsn: str = args.clickhouse
    folder = _folder(dsn)
    where = f"the data folder {folder} is in use by another gpuledger process"
    try:
        owner = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
        pid = int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return (
            f"{where}; stop it, or read from the ClickHouse server it writes to "
            f"(--clickhouse http://...)"
        )
    if getattr(args, "report", None) in NOT_SERVED:
        return f"{where} (pid {pid}); stop it to run the {args.report} report on the folder"
    if getattr(args, "bill", None):  # a bill is written into the folder: no URL can do that
        return (
            f"{where} (pid {pid}); stop it to import or true up a bill, or point both at a "
            "ClickHouse server (--clickhouse http://...)"
        )
    if not owner.get("url"):  # it serves no reads (its reports listener is off)
        return f"{where} (pid {pid}), which serves no reports; stop it to read the folder"
    url = str(owner["url"]).rstrip("/")
    return f"{where} (pid {pid}); read this report from it: {url}{_http_path(args)}"


def _http_path(args: argparse.Namespace) -> str:
    if getattr(args, "export", None) == "chargeback":
        wanted = {"period": args.period, "format": args.format}
        if args.basis != "list":
            wanted["basis"] = args.basis
        return "/export/chargeback?" + urlencode(wanted)
    if getattr(args, "export", None) == "invoice":
        wanted = {"period": args.period, "by": args.by, "format": args.format}
        if args.basis != "list":
            wanted["basis"] = args.basis
        return "/export/invoice?" + urlencode(wanted)
    name = args.report
    query: dict[str, str] = {}
    for key, value in (("from", args.start), ("to", args.end)):
        if value:
            query[key] = value
    if name == "variance":
        query["threshold"] = args.threshold
    if name == "showback":
        query["by"] = args.by
        if args.basis != "list":
            query["basis"] = args.basis
    if name != "html":
        query["format"] = args.format
    return f"/report/{name}" + ("?" + urlencode(query) if query else "")

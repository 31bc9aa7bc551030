"""`gpuledger report showback|tags|unit-economics|html` and `gpuledger export chargeback`.

Every failure ends in one line on stderr and a non-zero exit: 2 for bad arguments, 1 when the
store cannot be read, 3 when an embedded folder is held by a running worker or demo (the line
names the URL where that process serves the same report).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from runtime.errors import ConfigError, GpuledgerError, StoreError, StoreLockedError
from runtime.options import add_env_option
from runtime.redaction import redact
from streams.reports.chargeback import ChargebackSettings, chargeback
from streams.reports.focus_files import export_bytes
from streams.reports.html_report import html_report
from streams.reports.limits import MAX_PERIOD_DAYS
from streams.reports.params import (
    DIMENSIONS,
    EXPORT_FORMATS,
    FORMATS,
    check_choice,
    format_ms,
    parse_month,
    parse_period,
)
from streams.reports.render import Report, render
from streams.reports.showback import showback
from streams.reports.tags import tag_compliance
from streams.reports.unit_economics import unit_economics
from streams.store import (
    OWNER_FILE,
    ClickHouseStore,
    add_clickhouse_option,
    embedded_dsn,
    split_dsn,
    store_from_args,
)
from streams.worker_cli import add_policy_options

EXIT_ARGS, EXIT_STORE, EXIT_LOCKED = 2, 1, 3
_DEFAULTS = ChargebackSettings()


def register(subparsers: Any, env: Mapping[str, str]) -> None:
    report = subparsers.add_parser("report", help="showback, tag compliance, unit economics")
    kinds = report.add_subparsers(dest="report", metavar="REPORT")
    for name, help_text in (
        ("showback", "cost by team, product, model, namespace or cost centre"),
        ("tags", "tag compliance: untagged cost and who is responsible"),
        ("unit-economics", "cost per 1M tokens and per request, usage vs allocation basis"),
        ("html", "a self-contained HTML report with charts"),
    ):
        p = kinds.add_parser(name, help=help_text)
        add_clickhouse_option(p, env)
        p.add_argument(
            "--from",
            dest="start",
            metavar="TIME",
            help=(
                "start: a date (midnight UTC), an RFC 3339 time with T and Z or an offset "
                "(2026-11-01T08:00:00+01:00), or Unix ms; default: start of this month. "
                f"A report covers at most {MAX_PERIOD_DAYS} days"
            ),
        )
        p.add_argument(
            "--to",
            dest="end",
            metavar="TIME",
            help="end, exclusive, in the same forms (default: now)",
        )
        if name == "showback":
            p.add_argument("--by", default="team", help=f"one of {', '.join(DIMENSIONS)}")
        if name == "html":
            p.add_argument("--output", "-o", default="gpuledger-report.html", metavar="FILE")
        else:
            p.add_argument("--format", default="table", help=f"one of {', '.join(FORMATS)}")
            p.add_argument("--output", "-o", metavar="FILE", help="write here, not to stdout")
        p.add_argument(
            "--base-only",
            action="store_true",
            help="read only base rows, not the hourly rollups (for checking)",
        )
        p.set_defaults(handler=_handler(name))
    report.set_defaults(handler=_usage(report))

    export = subparsers.add_parser("export", help="chargeback export (FOCUS 1.3)")
    targets = export.add_subparsers(dest="export", metavar="EXPORT")
    p = targets.add_parser("chargeback", help="one FOCUS charge per team/product/model/pricing")
    add_clickhouse_option(p, env)
    p.add_argument("--period", required=True, metavar="YYYY-MM", help="billing month")
    p.add_argument("--format", default="focus-csv", help=f"one of {', '.join(EXPORT_FORMATS)}")
    p.add_argument("--output", "-o", metavar="FILE", help="write here, not to stdout")
    add_env_option(
        p,
        env,
        "--billing-account",
        env="GPULEDGER_BILLING_ACCOUNT",
        default=_DEFAULTS.billing_account_id,
        help=f"FOCUS BillingAccountId (default {_DEFAULTS.billing_account_id})",
    )
    add_env_option(
        p,
        env,
        "--currency",
        env="GPULEDGER_CURRENCY",
        default="USD",
        help="FOCUS BillingCurrency (default USD)",
    )
    add_env_option(
        p,
        env,
        "--host-provider",
        env="GPULEDGER_HOST_PROVIDER",
        default=_DEFAULTS.host_provider_name,
        help=f"FOCUS HostProviderName (default {_DEFAULTS.host_provider_name})",
    )
    add_policy_options(
        p,
        env,
        share_help="share policy the worker ran with, named in each charge (default dominant)",
        idle_help="idle policy the worker ran with, named in each charge (default platform)",
    )
    p.add_argument("--base-only", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(handler=_run_export)
    export.set_defaults(handler=_usage(export))


def _usage(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def handler(_: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return EXIT_ARGS

    return handler


def _handler(name: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        return _guarded(f"gpuledger report {name}", args, lambda: _run_report(name, args))

    return handler


def _run_export(args: argparse.Namespace) -> int:
    return _guarded("gpuledger export chargeback", args, lambda: _export(args))


def _guarded(command: str, args: argparse.Namespace, body: Callable[[], int]) -> int:
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


def _open(args: argparse.Namespace) -> ClickHouseStore:
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


def _run_report(name: str, args: argparse.Namespace) -> int:
    now_ms = int(time.time() * 1000)
    period = parse_period(args.start, args.end, now_ms=now_ms)
    use_rollups = not args.base_only
    if name != "html":
        fmt = check_choice(args.format, FORMATS, "--format")
    if name == "showback":
        check_choice(args.by, DIMENSIONS, "--by")
    store = _open(args)
    try:
        if name == "html":
            Path(args.output).write_text(
                html_report(store, period, use_rollups=use_rollups), encoding="utf-8"
            )
            print(f"wrote {args.output}", file=sys.stderr)
            return 0
        report: Report
        if name == "showback":
            report = showback(store, period, args.by, use_rollups=use_rollups)
        elif name == "tags":
            report = tag_compliance(store, period, use_rollups=use_rollups)
        else:
            report = unit_economics(store, period, use_rollups=use_rollups)
        _write(render(report, fmt).encode("utf-8"), args.output)
        return 0
    finally:
        store.close()


def _export(args: argparse.Namespace) -> int:
    fmt = check_choice(args.format, EXPORT_FORMATS, "--format")
    period = parse_month(args.period)
    settings = ChargebackSettings(
        billing_account_id=args.billing_account,
        currency=args.currency,
        host_provider_name=args.host_provider,
        share_policy=args.share_policy,
        idle_policy=args.idle_policy,
    )
    if fmt == "focus-parquet" and not args.output and sys.stdout.isatty():
        raise ConfigError("focus-parquet is binary: give --output FILE")
    store = _open(args)
    try:
        data = export_bytes(
            chargeback(store, period, settings, use_rollups=not args.base_only), fmt
        )
    finally:
        store.close()
    _write(data, args.output)
    return 0


def _write(data: bytes, output: str | None) -> None:
    if output:
        Path(output).write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


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
    if not owner.get("url"):  # it serves no reads (its reports listener is off)
        return f"{where} (pid {pid}), which serves no reports; stop it to read the folder"
    url = str(owner["url"]).rstrip("/")
    return f"{where} (pid {pid}); read this report from it: {url}{_http_path(args)}"


def _http_path(args: argparse.Namespace) -> str:
    if getattr(args, "export", None) == "chargeback":
        return "/export/chargeback?" + urlencode({"period": args.period, "format": args.format})
    name = args.report
    query: dict[str, str] = {}
    for key, value in (("from", args.start), ("to", args.end)):
        if value:
            query[key] = value
    if name == "showback":
        query["by"] = args.by
    if name != "html":
        query["format"] = args.format
    return f"/report/{name}" + ("?" + urlencode(query) if query else "")


__all__ = ["format_ms", "redact", "register"]

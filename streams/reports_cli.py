"""`gpuledger report showback|tags|unit-economics|variance|html|forecast|budget`,
`gpuledger export chargeback|invoice`.

Every failure ends in one line on stderr and a non-zero exit: 2 for bad arguments, 1 when the
store cannot be read, 3 when an embedded folder is held by a running worker or demo (the line
names the URL where that process serves the same report).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from runtime.errors import ConfigError
from runtime.options import add_env_option
from runtime.redaction import redact
from streams.pricing import load_price_book
from streams.report_guard import EXIT_ARGS, guarded, open_store
from streams.reports.budget_report import budget_report
from streams.reports.budgets import load_budgets
from streams.reports.chargeback import BASES as BILL_BASES
from streams.reports.chargeback import ChargebackSettings, ExportTotals, chargeback, invoice
from streams.reports.focus_columns import plain
from streams.reports.focus_files import FORMATS as FOCUS_FORMATS
from streams.reports.focus_files import check_format, write_rows
from streams.reports.forecast_report import forecast
from streams.reports.html_report import html_report
from streams.reports.invoice import INVOICE_BY
from streams.reports.limits import MAX_PERIOD_DAYS
from streams.reports.params import (
    DAY_MS,
    DIMENSIONS,
    FORMATS,
    Period,
    check_choice,
    format_ms,
    parse_instant,
    parse_month,
    parse_period,
)
from streams.reports.render import Report, render
from streams.reports.showback import BASES, showback
from streams.reports.tags import tag_compliance
from streams.reports.unit_economics import unit_economics
from streams.reports.variance import parse_threshold, variance
from streams.requests_cli import register_report
from streams.store import (
    add_clickhouse_option,
)
from streams.worker_cli import (
    add_budgets_option,
    add_label_options,
    add_policy_options,
    add_price_book_option,
)

_DEFAULTS = ChargebackSettings()


def register(subparsers: Any, env: Mapping[str, str]) -> None:
    report = subparsers.add_parser("report", help="showback, tag compliance, unit economics")
    kinds = report.add_subparsers(dest="report", metavar="REPORT")
    for name, help_text in (
        ("showback", "cost by team, product, model, namespace or cost centre"),
        ("tags", "tag compliance: untagged cost and who is responsible"),
        ("unit-economics", "cost per 1M tokens and per request, usage vs allocation basis"),
        ("variance", "price book vs the provider's bill, per GPU model, class and entry"),
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
            p.add_argument(
                "--basis",
                default="list",
                help=(
                    "list: metered cost at the price book's rates (default); billed: the "
                    "provider's bill, from `gpuledger bill import`, split over the metered rows"
                ),
            )
        if name == "variance":
            p.add_argument(
                "--threshold",
                default="5",
                metavar="PCT",
                help="name the price-book entries off the bill by more than this (default 5 %%)",
            )
            add_price_book_option(p, env)
        if name == "html":
            p.add_argument("--output", "-o", default="gpuledger-report.html", metavar="FILE")
            add_budgets_option(
                p,
                env,
                help="add the month's budgets against its forecast (a budgets file, as for "
                "`report budget`)",
            )
        else:
            p.add_argument("--format", default="table", help=f"one of {', '.join(FORMATS)}")
            p.add_argument("--output", "-o", metavar="FILE", help="write here, not to stdout")
        p.add_argument(
            "--base-only",
            action="store_true",
            help="read only base rows, not the hourly rollups (for checking)",
        )
        p.set_defaults(handler=_handler(name))
    p = kinds.add_parser("forecast", help="month-end spend per owner, with prediction intervals")
    add_clickhouse_option(p, env)
    p.add_argument("--period", metavar="YYYY-MM", help="the month (default: this month)")
    p.add_argument("--by", default="team", help=f"one of {', '.join(DIMENSIONS)}")
    p.add_argument(
        "--as-of",
        dest="as_of",
        metavar="TIME",
        help="forecast as of this time, in the forms of --from (default: now)",
    )
    p.add_argument("--format", default="table", help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--output", "-o", metavar="FILE", help="write here, not to stdout")
    p.add_argument("--base-only", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(
        handler=lambda args: guarded("gpuledger report forecast", args, lambda: _forecast(args))
    )
    p = kinds.add_parser("budget", help="month to date and forecast against each budget")
    add_clickhouse_option(p, env)
    add_budgets_option(
        p,
        env,
        help="budgets YAML: monthly USD per team, cost_center, product or namespace and the "
        "alert thresholds (schemas/budgets.example.yaml); required",
    )
    p.add_argument("--period", metavar="YYYY-MM", help="the month (default: this month)")
    p.add_argument(
        "--as-of",
        dest="as_of",
        metavar="TIME",
        help="as of this time, in the forms of --from (default: now)",
    )
    p.add_argument("--format", default="table", help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--output", "-o", metavar="FILE", help="write here, not to stdout")
    p.add_argument("--base-only", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(
        handler=lambda args: guarded("gpuledger report budget", args, lambda: _budget(args))
    )
    register_report(kinds, env)
    report.set_defaults(handler=_usage(report))

    export = subparsers.add_parser("export", help="chargeback (FOCUS 1.3) and invoice")
    targets = export.add_subparsers(dest="export", metavar="EXPORT")
    p = targets.add_parser(
        "chargeback", help="FOCUS 1.3 rows: each device-hour split among its owners"
    )
    _add_export_options(p, env, formats=FOCUS_FORMATS, default_format="focus-csv")
    p.add_argument("--base-only", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(handler=_run_export)
    p = targets.add_parser("invoice", help="what each team or cost centre owes, in cents")
    _add_export_options(p, env, formats=FORMATS, default_format="table")
    p.add_argument("--by", default="team", help=f"one of {', '.join(INVOICE_BY)}")
    p.add_argument("--base-only", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(handler=_run_invoice)
    export.set_defaults(handler=_usage(export))


def _add_export_options(
    p: argparse.ArgumentParser,
    env: Mapping[str, str],
    *,
    formats: tuple[str, ...],
    default_format: str,
) -> None:
    add_clickhouse_option(p, env)
    p.add_argument("--period", required=True, metavar="YYYY-MM", help="billing month")
    p.add_argument("--format", default=default_format, help=f"one of {', '.join(formats)}")
    p.add_argument("--output", "-o", metavar="FILE", help="write here, not to stdout")
    add_env_option(
        p,
        env,
        "--billing-account",
        env="GPULEDGER_BILLING_ACCOUNT",
        default=_DEFAULTS.billing_account_id,
        help=f"FOCUS BillingAccountId: who is billed (default {_DEFAULTS.billing_account_id})",
    )
    add_env_option(
        p,
        env,
        "--billing-account-name",
        env="GPULEDGER_BILLING_ACCOUNT_NAME",
        default=_DEFAULTS.billing_account_name,
        help=f"FOCUS BillingAccountName (default {_DEFAULTS.billing_account_name!r})",
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
        "--service-provider",
        env="GPULEDGER_SERVICE_PROVIDER",
        default=_DEFAULTS.service_provider_name,
        help=(
            "FOCUS ServiceProviderName, InvoiceIssuerName: the platform that re-bills its GPUs "
            f"(default {_DEFAULTS.service_provider_name!r})"
        ),
    )
    add_env_option(
        p,
        env,
        "--host-provider",
        env="GPULEDGER_HOST_PROVIDER",
        default="",
        help=(
            "FOCUS HostProviderName: the cloud provider whose instances hold the GPUs, e.g. "
            "'Amazon Web Services' (default: the service provider, for devices it owns)"
        ),
    )
    p.add_argument(
        "--basis",
        default="list",
        help="list: EffectiveCost at the price book's rates (default); billed: EffectiveCost "
        "and BilledCost the provider's bill, from `gpuledger bill import`",
    )
    add_price_book_option(p, env)
    add_label_options(p, env)
    add_policy_options(
        p,
        env,
        share_help="share policy the worker ran with, named in each charge (default dominant)",
        idle_help="idle policy the worker ran with, named in each charge (default platform)",
    )


def _usage(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def handler(_: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return EXIT_ARGS

    return handler


def _handler(name: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        return guarded(f"gpuledger report {name}", args, lambda: _run_report(name, args))

    return handler


def _run_export(args: argparse.Namespace) -> int:
    return guarded("gpuledger export chargeback", args, lambda: _export(args))


def _run_invoice(args: argparse.Namespace) -> int:
    return guarded("gpuledger export invoice", args, lambda: _invoice(args))


def _run_report(name: str, args: argparse.Namespace) -> int:
    now_ms = int(time.time() * 1000)
    period = parse_period(args.start, args.end, now_ms=now_ms)
    use_rollups = not args.base_only
    if name != "html":
        fmt = check_choice(args.format, FORMATS, "--format")
    if name == "showback":
        check_choice(args.by, DIMENSIONS, "--by")
        check_choice(args.basis, BASES, "--basis")
    store = open_store(args)
    try:
        if name == "html":
            budgets = load_budgets(args.budgets) if args.budgets else None
            html = html_report(
                store, period, use_rollups=use_rollups, as_of_ms=now_ms, budgets=budgets
            )
            Path(args.output).write_text(html, encoding="utf-8")
            print(f"wrote {args.output}", file=sys.stderr)
            return 0
        report: Report
        if name == "showback":
            report = showback(store, period, args.by, use_rollups=use_rollups, basis=args.basis)
        elif name == "tags":
            report = tag_compliance(store, period, use_rollups=use_rollups)
        elif name == "variance":
            report = variance(
                store,
                period,
                price_book=load_price_book(args.price_book),
                threshold_pct=parse_threshold(args.threshold),
                use_rollups=use_rollups,
            )
        else:
            report = unit_economics(store, period, use_rollups=use_rollups)
        _write(render(report, fmt).encode("utf-8"), args.output)
        return 0
    finally:
        store.close()


def _forecast(args: argparse.Namespace) -> int:
    fmt = check_choice(args.format, FORMATS, "--format")
    check_choice(args.by, DIMENSIONS, "--by")
    now_ms = int(time.time() * 1000)
    as_of = parse_instant(args.as_of, option="--as-of") if args.as_of else now_ms
    month = parse_month(args.period or format_ms(as_of)[:7])
    store = open_store(args)
    try:
        report = forecast(store, month, args.by, now_ms=as_of, use_rollups=not args.base_only)
    finally:
        store.close()
    _write(render(report, fmt).encode("utf-8"), args.output)
    return 0


def _budget(args: argparse.Namespace) -> int:
    fmt = check_choice(args.format, FORMATS, "--format")
    now_ms = int(time.time() * 1000)
    as_of = parse_instant(args.as_of, option="--as-of") if args.as_of else now_ms
    month = parse_month(args.period or format_ms(as_of)[:7])
    if not args.budgets:
        raise ConfigError("give the budgets file: --budgets FILE")
    budgets = load_budgets(args.budgets)
    store = open_store(args)
    try:
        report = budget_report(store, budgets, month, now_ms=as_of, use_rollups=not args.base_only)
    finally:
        store.close()
    _write(render(report, fmt).encode("utf-8"), args.output)
    return 0


def _settings(args: argparse.Namespace) -> ChargebackSettings:
    return ChargebackSettings(
        billing_account_id=args.billing_account,
        billing_account_name=args.billing_account_name,
        currency=args.currency,
        service_provider_name=args.service_provider,
        host_provider_name=args.host_provider,
        share_policy=args.share_policy,
        idle_policy=args.idle_policy,
        team_label=args.team_label,
        product_label=args.product_label,
        cost_center_label=args.cost_center_label,
    )


@contextlib.contextmanager
def _day_progress(period: Period, what: str) -> Iterator[Callable[[int], None]]:
    """A progress bar over the days of `period` on stderr (when it is a terminal)."""
    days = max(1, -(-(period.end_ms - period.start_ms) // DAY_MS))
    console = Console(stderr=True)
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(what, total=days)
        yield lambda _day_ms: bar.advance(task)


def _export(args: argparse.Namespace) -> int:
    fmt = check_format(args.format)
    basis = check_choice(args.basis, BILL_BASES, "--basis")
    period = parse_month(args.period)
    settings = _settings(args)
    book = load_price_book(args.price_book)
    if fmt == "focus-parquet" and not args.output and sys.stdout.isatty():
        raise ConfigError("focus-parquet is binary: give --output FILE")
    store = open_store(args)
    totals = ExportTotals()
    try:
        with _output(args.output) as out, _day_progress(period, "exporting days") as on_day:
            rows = chargeback(
                store,
                period,
                settings,
                book,
                use_rollups=not args.base_only,
                totals=totals,
                on_day=on_day,
                basis=basis,
            )
            write_rows(rows, fmt, out)
    finally:
        store.close()
    kinds = ", ".join(
        f"{kind} {format(plain(amount), 'f')}"
        for kind, amount in sorted(totals.by_kind_usd.items())
    )
    unbilled = ""
    if basis == "billed" and totals.unbilled_rows:
        unbilled = f"; {totals.unbilled_rows:,} charges on no imported bill kept the list basis"
    print(
        f"{totals.rows:,} charges, EffectiveCost total {format(plain(totals.total_usd), 'f')} "
        f"{settings.currency}"
        + (f" ({kinds})" if kinds else "")
        + unbilled
        + (f"; wrote {args.output}" if args.output else ""),
        file=sys.stderr,
    )
    return 0


def _invoice(args: argparse.Namespace) -> int:
    fmt = check_choice(args.format, FORMATS, "--format")
    check_choice(args.by, INVOICE_BY, "--by")
    period = parse_month(args.period)
    settings = _settings(args)
    store = open_store(args)
    try:
        with _day_progress(period, "reading days") as on_day:
            bill = invoice(
                store,
                period,
                settings,
                args.by,
                use_rollups=not args.base_only,
                on_day=on_day,
                basis=check_choice(args.basis, BILL_BASES, "--basis"),
            )
    finally:
        store.close()
    _write(render(bill, fmt).encode("utf-8"), args.output)
    return 0


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[IO[bytes]]:
    """The file to write (replaced only once it is complete), or stdout."""
    if not path:
        yield sys.stdout.buffer
        sys.stdout.flush()
        return
    target = Path(path)
    partial = target.with_name(f".{target.name}.partial")
    try:
        with partial.open("wb") as out:
            yield out
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def _write(data: bytes, output: str | None) -> None:
    if output:
        Path(output).write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


__all__ = ["format_ms", "guarded", "open_store", "redact", "register"]

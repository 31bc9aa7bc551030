"""`gpuledger bill import|trueup|list`: the provider's FOCUS bill beside the meter.

`import FILE...` reads one provider export (all its parts), keeps each billing period of each
account as a versioned slice, and allocates its GPU instances' charges over the metered rows
(the true-up, streams/billing/). `trueup` computes the true-up again from the meter as it is now
(late usage, corrections, another non-GPU rule). `list` shows the slices and their versions.
Exit codes as `gpuledger report`: 2 bad arguments, 1 the store or the file failed (bad rows
included), 3 the embedded folder is held by a running worker or demo.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from runtime.errors import ConfigError
from runtime.options import add_env_option
from streams.billing import ledger
from streams.billing.importer import ImportOptions, ImportResult, SliceResult, import_bills
from streams.billing.importer import retrue_up as recompute
from streams.billing.resources import DEFAULT_GPU_INSTANCE_PATTERNS, GpuInstanceTypes
from streams.billing.trueup import DEFAULT_WEIGHTS, NON_GPU_RULES, NonGpuRule
from streams.report_guard import guarded, open_store
from streams.reports.money import round_total
from streams.reports.params import check_choice, format_ms
from streams.store import add_clickhouse_option

EXIT_BAD_ROWS = 1
_FORMATS = ("table", "json")


def register(subparsers: Any, env: Mapping[str, str]) -> None:
    bill = subparsers.add_parser(
        "bill", help="import the provider's FOCUS bill and true metered cost up to it"
    )
    verbs = bill.add_subparsers(dest="bill", metavar="ACTION")
    p = verbs.add_parser("import", help="import FOCUS Cost and Usage files (CSV or Parquet)")
    p.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        type=Path,
        help="every file of one export (a month's parts together: each billing period in them "
        "replaces the one imported before)",
    )
    p.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="import the good rows when some are bad (they are listed either way)",
    )
    _add_common(p, env)
    p.set_defaults(
        handler=lambda args: guarded("gpuledger bill import", args, lambda: _import(args))
    )
    p = verbs.add_parser("trueup", help="compute the true-up again from the meter as it is now")
    p.add_argument("--slice", action="append", default=[], help="only this slice (repeatable)")
    _add_common(p, env)
    p.set_defaults(
        handler=lambda args: guarded("gpuledger bill trueup", args, lambda: _trueup(args))
    )
    p = verbs.add_parser("list", help="imported bills: slices and their newest versions")
    add_clickhouse_option(p, env)
    p.add_argument("--format", default="table", help=f"one of {', '.join(_FORMATS)}")
    p.set_defaults(handler=lambda args: guarded("gpuledger bill list", args, lambda: _list(args)))
    bill.set_defaults(handler=_usage(bill))


def _add_common(p: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    add_clickhouse_option(p, env)
    add_env_option(
        p,
        env,
        "--non-gpu-rule",
        env="GPULEDGER_NON_GPU_RULE",
        default="whole",
        choices=NON_GPU_RULES,
        help="whole: the users of a GPU instance's GPUs pay all of it (default); weights: "
        "only its GPU part, by --gpu-weights, the rest is a line of its own",
    )
    add_env_option(
        p,
        env,
        "--gpu-weights",
        env="GPULEDGER_GPU_WEIGHTS",
        default=",".join(str(w) for w in DEFAULT_WEIGHTS),
        metavar="GPU,VCPU,GIB",
        help="weights of one GPU, one vCPU and one GiB of memory for the weights rule "
        "(default OpenCost's default prices per hour: %(default)s)",
    )
    add_env_option(
        p,
        env,
        "--gpu-instance-type",
        env="GPULEDGER_GPU_INSTANCE_TYPES",
        separator=",",
        dest="gpu_instance_types",
        metavar="REGEX",
        help="an instance type with GPUs, as a regular expression of the whole name "
        "(repeatable; default: AWS P and G families, Azure N-series, Google Cloud a2/a3/a4/g2/g4)",
    )
    p.add_argument("--format", default="table", help=f"one of {', '.join(_FORMATS)}")


def _usage(parser: argparse.ArgumentParser) -> Any:
    def handler(_: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return handler


def _options(args: argparse.Namespace, *, skip_bad_rows: bool = False) -> ImportOptions:
    parts = [p.strip() for p in str(args.gpu_weights).split(",")]
    try:
        weights = [Decimal(p) for p in parts]
    except ArithmeticError:
        weights = []
    if len(weights) != 3 or not all(w.is_finite() for w in weights):
        raise ConfigError(f"--gpu-weights {args.gpu_weights!r}: give three numbers GPU,VCPU,GIB")
    try:
        rule = NonGpuRule(args.non_gpu_rule, *weights)
    except ValueError as exc:
        raise ConfigError(f"--gpu-weights: {exc}") from exc
    patterns = list(args.gpu_instance_types or DEFAULT_GPU_INSTANCE_PATTERNS)
    try:
        types = GpuInstanceTypes(patterns)
    except Exception as exc:  # re.error: a bad pattern given by the user
        raise ConfigError(f"--gpu-instance-type: {exc}") from exc
    return ImportOptions(rule=rule, gpu_types=types, skip_bad_rows=skip_bad_rows)


def _import(args: argparse.Namespace) -> int:
    fmt = check_choice(args.format, _FORMATS, "--format")
    options = _options(args, skip_bad_rows=args.skip_bad_rows)
    for path in args.files:
        if not path.is_file():
            raise ConfigError(f"{path}: no such file")
    store = open_store(args)
    console = Console(stderr=True)
    try:
        with Progress(
            SpinnerColumn(),
            TextColumn("reading bill rows: {task.completed:,}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        ) as bar:
            task = bar.add_task("rows", total=None)
            result = import_bills(
                store, args.files, options, lambda n: bar.update(task, completed=n)
            )
    finally:
        store.close()
    _report_bad_rows(result)
    if not result.imported:
        print(
            f"gpuledger bill import: nothing imported: {result.bad_rows_total:,} bad row(s) of "
            f"{result.rows_read:,} (fix them, or --skip-bad-rows to import the rest)",
            file=sys.stderr,
        )
        return EXIT_BAD_ROWS
    _print_slices(result.slices, fmt, rows_read=result.rows_read, rounded=result.rounded_amounts)
    return 0


def _report_bad_rows(result: ImportResult) -> None:
    for bad in result.bad_rows:
        print(f"bad row: {bad}", file=sys.stderr)
    more = result.bad_rows_total - len(result.bad_rows)
    if more > 0:
        print(f"... and {more:,} more bad rows", file=sys.stderr)
    if result.bad_rows_total and result.imported:
        print(f"left out {result.bad_rows_total:,} bad row(s) (--skip-bad-rows)", file=sys.stderr)


def _trueup(args: argparse.Namespace) -> int:
    fmt = check_choice(args.format, _FORMATS, "--format")
    options = _options(args)
    store = open_store(args)
    try:
        done = recompute(store, options, only=args.slice)
    finally:
        store.close()
    if not done:
        print(
            "gpuledger bill trueup: no imported bill (gpuledger bill import FILE)", file=sys.stderr
        )
    _print_slices(done, fmt)
    return 0


def _print_slices(
    slices: Sequence[SliceResult], fmt: str, *, rows_read: int | None = None, rounded: int = 0
) -> None:
    if fmt == "json":
        print(
            json.dumps(
                [
                    {
                        "slice": s.slice,
                        "version": s.version,
                        "status": s.status,
                        "lines": s.lines,
                        "changed_hours": s.changed_hours,
                        "gpu_effective_cost": format(s.gpu_effective_cost, "f"),
                        "unmetered_cost": format(s.unmetered_cost, "f"),
                        "non_gpu_cost": format(s.non_gpu_cost, "f"),
                        "currency": s.currency,
                    }
                    for s in slices
                ],
                indent=2,
            )
        )
        return
    console = Console()
    for s in slices:
        provider, account, start = [*s.slice.split("|"), "", ""][:3]
        what = {
            "new": "imported",
            "restated": f"restated, {s.changed_hours:,} hour(s) recomputed",
            "recomputed": f"recomputed, {s.changed_hours:,} hour(s) changed",
            "unchanged": "unchanged",
        }.get(s.status, s.status)
        non_gpu = f", non-GPU part {_money(s.non_gpu_cost, s.currency)}" if s.non_gpu_cost else ""
        console.print(
            f"{provider} {account} {start[:7]}: {what} (version {s.version}, {s.lines:,} lines); "
            f"GPU instances {_money(s.gpu_effective_cost, s.currency)}, of which unmetered "
            f"{_money(s.unmetered_cost, s.currency)}{non_gpu}",
            soft_wrap=True,
            highlight=False,
        )
    if rows_read is not None:
        note = f"{rows_read:,} rows read"
        if rounded:
            note += f"; {rounded:,} line(s) had an amount past 1e-15, rounded half-even"
        console.print(note)


def _money(amount: Decimal, currency: str) -> str:
    return f"{round_total(amount):,.2f} {currency}"


def _list(args: argparse.Namespace) -> int:
    fmt = check_choice(args.format, _FORMATS, "--format")
    store = open_store(args)
    try:
        versions = ledger.latest_versions(store)
    finally:
        store.close()
    if fmt == "json":
        print(
            json.dumps(
                [
                    {
                        "slice": v.slice,
                        "provider": v.provider,
                        "billing_account_id": v.billing_account_id,
                        "billing_period_start": format_ms(v.billing_period_start_ms),
                        "billing_period_end": format_ms(v.billing_period_end_ms),
                        "currency": v.billing_currency,
                        "version": v.version,
                        "lines": v.lines,
                        "imported_at": format_ms(v.imported_at_ms),
                        "source_files": list(v.source_files),
                    }
                    for v in versions.values()
                ],
                indent=2,
            )
        )
        return 0
    table = Table(title="imported bills (newest version of each slice)")
    for header in ("provider", "account", "billing period", "version", "lines", "imported (UTC)"):
        table.add_column(header)
    for v in versions.values():
        table.add_row(
            v.provider,
            v.billing_account_id,
            format_ms(v.billing_period_start_ms)[:10],
            str(v.version),
            f"{v.lines:,}",
            format_ms(v.imported_at_ms)[:16].replace("T", " "),
        )
    Console().print(table)
    return 0

"""`gpuledger plan`: devices, cost a month and per 1M tokens of serving a model at a target
rate on each GPU type and MIG profile it ran on, from measured data. Errors are one line on
stderr with the reports' exit codes (2 bad arguments, 1 store, 3 folder held)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtime.errors import StoreLockedError
from streams.pricing import load_price_book
from streams.report_guard import EXIT_LOCKED, guarded, open_store
from streams.reports.limits import MAX_PERIOD_DAYS
from streams.reports.params import FORMATS, check_choice, parse_period
from streams.reports.plan import parse_growth, parse_tokens_per_s
from streams.reports.plan_data import plan
from streams.reports.render import render
from streams.store import add_clickhouse_option
from streams.worker_cli import add_price_book_option


def register(subparsers: Any, env: Mapping[str, str]) -> None:
    p = subparsers.add_parser(
        "plan", help="devices and cost of serving a model at a target rate, from measured data"
    )
    add_clickhouse_option(p, env)
    p.add_argument("--model", required=True, help="the model, as its token counters name it")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--tokens-per-s", metavar="N", help="target rate: prompt + completion tokens a second"
    )
    target.add_argument(
        "--growth",
        metavar="FACTOR",
        help="target: the observed average rate over the period times this (3x, 3 or 300%%)",
    )
    p.add_argument(
        "--from",
        dest="start",
        metavar="TIME",
        help=(
            "measure from: a date (midnight UTC), an RFC 3339 time with T and Z or an offset, "
            f"or Unix ms; default: start of this month. At most {MAX_PERIOD_DAYS} days"
        ),
    )
    p.add_argument("--to", dest="end", metavar="TIME", help="end, exclusive (default: now)")
    add_price_book_option(p, env)
    p.add_argument("--format", default="table", help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--output", "-o", metavar="FILE", help="write here, not to stdout")
    p.add_argument(
        "--base-only",
        action="store_true",
        help="read only base rows, not the hourly rollups (for checking)",
    )
    p.set_defaults(handler=_handler)


def _handler(args: argparse.Namespace) -> int:
    return guarded("gpuledger plan", args, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    fmt = check_choice(args.format, FORMATS, "--format")
    period = parse_period(args.start, args.end, now_ms=int(time.time() * 1000))
    tokens_per_s = parse_tokens_per_s(args.tokens_per_s) if args.tokens_per_s is not None else None
    growth = parse_growth(args.growth) if args.growth is not None else None
    book = load_price_book(args.price_book)
    try:
        store = open_store(args)
    except StoreLockedError:
        # No URL to name: a worker's read endpoints serve reports, not plans.
        print(
            f"gpuledger plan: the data folder of {args.clickhouse} is in use by another "
            "gpuledger process; stop it, or point --clickhouse at a ClickHouse server",
            file=sys.stderr,
        )
        return EXIT_LOCKED
    try:
        report = plan(
            store,
            period,
            args.model,
            tokens_per_s=tokens_per_s,
            growth=growth,
            price_book=book,
            use_rollups=not args.base_only,
        )
    finally:
        store.close()
    text = render(report, fmt)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return 0

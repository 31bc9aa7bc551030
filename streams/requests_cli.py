"""`gpuledger report requests`: each owner's GPU cost under usage-based allocation (showback)
beside request-based allocation (OpenCost, Kubecost: whole devices per request), with the
difference and the (unrequested) line. Errors are one line on stderr with the reports' exit
codes (2 bad arguments, 1 store, 3 folder held); not served over HTTP."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from streams.report_guard import guarded, open_store
from streams.reports.limits import MAX_PERIOD_DAYS
from streams.reports.params import FORMATS, check_choice, parse_period
from streams.reports.render import render
from streams.reports.requests_data import requests_report
from streams.reports.requests_report import REQUEST_DIMENSIONS
from streams.store import add_clickhouse_option

COMMAND = "gpuledger report requests"


def register_report(kinds: Any, env: Mapping[str, str]) -> None:
    """Add `requests` to the subparsers of `gpuledger report`."""
    p = kinds.add_parser(
        "requests", help="usage-based cost vs request-based (whole devices per request)"
    )
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
    p.add_argument("--to", dest="end", metavar="TIME", help="end, exclusive (default: now)")
    p.add_argument("--by", default="team", help=f"one of {', '.join(REQUEST_DIMENSIONS)}")
    p.add_argument("--format", default="table", help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--output", "-o", metavar="FILE", help="write here, not to stdout")
    p.add_argument(
        "--base-only",
        action="store_true",
        help="read only base rows, not the hourly rollups (for checking)",
    )
    p.set_defaults(handler=_handler)


def _handler(args: argparse.Namespace) -> int:
    return guarded(COMMAND, args, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    fmt = check_choice(args.format, FORMATS, "--format")
    by = check_choice(args.by, REQUEST_DIMENSIONS, "--by")
    period = parse_period(args.start, args.end, now_ms=int(time.time() * 1000))
    store = open_store(args)  # a held folder: `guarded` says to stop its owner (not served)
    try:
        report = requests_report(store, period, by, use_rollups=not args.base_only)
    finally:
        store.close()
    text = render(report, fmt)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return 0

"""Turns a dashboard panel's SQL into the statement ClickHouse receives from Grafana.

Two steps, as in Grafana: the frontend interpolates template variables (`${name:singlequote}`),
then the ClickHouse plugin's backend expands its macros exactly as
grafana/clickhouse-datasource `pkg/macros/macros.go` does (`$__timeFilter(c)` ->
`c >= toDateTime(FROM) AND c <= toDateTime(TO)`, `$__interval_s` -> max(interval, 1) seconds,
...). Anything not handled here fails loudly rather than reaching ClickHouse half-expanded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

ALL = ("__all__",)  # a variable with "All" selected: its allValue
_VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}")
_MACRO = re.compile(r"\$__(\w+)(?:\(([^()]*)\))?")


@dataclass(frozen=True)
class QueryContext:
    from_s: int
    to_s: int
    interval_s: float
    variables: Mapping[str, Sequence[str]]


def interpolate(sql: str, variables: Mapping[str, Sequence[str]]) -> str:
    def replace(match: re.Match[str]) -> str:
        name, fmt = match.group(1), match.group(2)
        if name not in variables:
            raise KeyError(f"panel SQL uses ${{{name}}}, which the test does not set")
        if fmt != "singlequote":
            raise ValueError(f"variable format {fmt!r} is not handled by the test")
        # Grafana's singlequote format: each value in single quotes, ' escaped as \'.
        return ",".join("'" + v.replace("'", "\\'") + "'" for v in variables[name])

    return _VARIABLE.sub(replace, sql)


def _datetime(unix_s: int) -> str:
    return f"toDateTime({unix_s})"


def _datetime64(unix_s: int) -> str:
    return f"fromUnixTimestamp64Milli({unix_s * 1000})"


def _date(unix_s: int) -> str:
    return "toDate('" + datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%d") + "')"


def expand_macros(sql: str, ctx: QueryContext) -> str:
    seconds = int(max(ctx.interval_s, 1))
    millis = int(max(ctx.interval_s * 1000, 1))

    def one_arg(name: str, args: str | None) -> str:
        if args is None or not args.strip() or "," in args:
            raise ValueError(f"$__{name} expects 1 argument, got {args!r}")
        return args.strip()

    def replace(match: re.Match[str]) -> str:
        name, args = match.group(1), match.group(2)
        f, t = ctx.from_s, ctx.to_s
        if name == "timeFilter":
            c = one_arg(name, args)
            return f"{c} >= {_datetime(f)} AND {c} <= {_datetime(t)}"
        if name == "timeFilter_ms":
            c = one_arg(name, args)
            return f"{c} >= {_datetime64(f)} AND {c} <= {_datetime64(t)}"
        if name == "dateFilter":
            c = one_arg(name, args)
            return f"{c} >= {_date(f)} AND {c} <= {_date(t)}"
        if name == "fromTime":
            return _datetime(f)
        if name == "toTime":
            return _datetime(t)
        if name == "fromTime_ms":
            return _datetime64(f)
        if name == "toTime_ms":
            return _datetime64(t)
        if name == "timeInterval":
            c = one_arg(name, args)
            return f"toStartOfInterval(toDateTime({c}), INTERVAL {seconds} second)"
        if name == "timeInterval_ms":
            c = one_arg(name, args)
            return f"toStartOfInterval(toDateTime64({c}, 3), INTERVAL {millis} millisecond)"
        if name == "interval_s":
            return str(seconds)
        raise ValueError(f"macro $__{name} is not handled by the test")

    return _MACRO.sub(replace, sql)


def render(sql: str, ctx: QueryContext) -> str:
    out = expand_macros(interpolate(sql, ctx.variables), ctx)
    if "$" in out:
        raise ValueError(f"unexpanded template left in: {out}")
    return out

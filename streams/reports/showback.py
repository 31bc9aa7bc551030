"""Showback: cost per team, product, model, namespace or cost centre over a period, with the
idle, untagged and host lines, and a total that reconciles with all metered GPU cost:
allocated + untagged + host + idle = total. By model, pod time that served no tokens is its own
`(no model)` line, counted as allocated: the GPU was held by a pod, just not for inference."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from runtime.errors import ConfigError
from streams.reports.limits import MAX_RESULT_ROWS, query_bounded
from streams.reports.money import largest_remainder_cents, ratio, round_total
from streams.reports.params import DIMENSIONS, Period, check_choice, check_period, format_ms
from streams.reports.render import Tabular, display, money, num, pct
from streams.reports.sources import cost_source, read_plan, token_source
from streams.rows import KIND_HOST, KIND_IDLE, UNKNOWN, UNTAGGED
from streams.store import ClickHouseStore

ALLOCATED, UNTAGGED_LINE, HOST_LINE, IDLE_LINE = "allocated", "untagged", "host", "idle"
NO_MODEL_LINE = "no_model"  # by model only; part of the allocated total
NO_MODEL = "__no_model__"
_ZERO = Decimal(0)
_MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class ShowbackLine:
    key: str
    line_kind: str  # allocated | no_model | untagged | host | idle
    cost_usd: Decimal
    cost_cents_usd: Decimal  # largest-remainder cents: lines add up to the rounded total
    share_pct: float
    gpu_hours: float
    avg_sm_util_pct: float | None  # None on the idle line: idle time has no workload to rate
    idle_share_usd: Decimal  # idle cost already spread into this line (idle policies)
    tokens: int
    requests: int
    token_cost_usd: Decimal  # cost of the pods that served the tokens
    cost_per_1m_tokens_usd: Decimal | None


@dataclass(frozen=True, slots=True)
class ShowbackReport:
    period: Period
    by: str
    lines: tuple[ShowbackLine, ...]
    allocated_usd: Decimal  # includes no_model_usd
    untagged_usd: Decimal
    host_usd: Decimal
    idle_usd: Decimal
    total_usd: Decimal
    total_cents_usd: Decimal
    gpu_hours: float
    no_model_usd: Decimal = _ZERO
    notes: tuple[str, ...] = field(default=())

    @property
    def reconciles(self) -> bool:
        parts = self.allocated_usd + self.untagged_usd + self.host_usd + self.idle_usd
        cents = sum((line.cost_cents_usd for line in self.lines), _ZERO)
        return parts == self.total_usd and cents == self.total_cents_usd

    def table(self) -> Sequence[Tabular]:
        headers = (
            self.by.replace("_", " "),
            "cost USD",
            "share",
            "GPU-hours",
            "avg SM",
            "tokens",
            "USD / 1M tok",
        )
        places = gpu_hours_places(self.gpu_hours)
        rows = tuple(
            (
                line_label(line),
                money(line.cost_cents_usd),
                pct(line.share_pct),
                num(line.gpu_hours, places),
                pct(line.avg_sm_util_pct, 0),
                f"{line.tokens:,}" if line.tokens else "-",
                money(line.cost_per_1m_tokens_usd)
                if line.cost_per_1m_tokens_usd is not None
                else "-",
            )
            for line in self.lines
        )
        footer = (
            (
                "total (all metered GPU cost)",
                money(self.total_cents_usd),
                pct(100.0 if self.total_usd else None),
                num(self.gpu_hours, places),
                "",
                "",
                "",
            ),
        )
        check = "reconciles" if self.reconciles else "DOES NOT RECONCILE"
        # The parts are sums of the displayed cents, so they match the lines above and add up.
        cents = self.cents_by_kind()
        allocated = money(cents[ALLOCATED] + cents[NO_MODEL_LINE])
        if any(line.line_kind == NO_MODEL_LINE for line in self.lines):
            allocated += (
                f" (models {money(cents[ALLOCATED])} + no model {money(cents[NO_MODEL_LINE])})"
            )
        notes = (
            f"allocated {allocated} + untagged {money(cents[UNTAGGED_LINE])} + host "
            f"{money(cents[HOST_LINE])} + idle {money(cents[IDLE_LINE])} = "
            f"{money(self.total_cents_usd)} ({check}; lines rounded to cents by largest "
            "remainder)",
            "avg SM: SM utilisation of the line's pods, weighted by window time; "
            "none for idle GPU time",
            *self.notes,
        )
        title = (
            f"GPU showback by {self.by.replace('_', ' ')}, "
            f"{format_ms(self.period.start_ms)} to {format_ms(self.period.end_ms)}"
        )
        return (Tabular(title, headers, rows, footer, notes),)

    def cents_by_kind(self) -> dict[str, Decimal]:
        """The displayed (largest-remainder) cents summed per line kind; they add up to the
        rounded total."""
        out = dict.fromkeys(_ORDER, _ZERO)
        for line in self.lines:
            out[line.line_kind] += line.cost_cents_usd
        return out

    def records(self) -> list[dict[str, Any]]:
        return [
            {
                self.by: line.key,
                "label": line_label(line),
                "line_kind": line.line_kind,
                "cost_usd": line.cost_usd,
                "cost_usd_cents": line.cost_cents_usd,
                "share_pct": round(line.share_pct, 4),
                "gpu_hours": round(line.gpu_hours, 6),
                "avg_sm_util_pct": None
                if line.avg_sm_util_pct is None
                else round(line.avg_sm_util_pct, 3),
                "idle_share_usd": line.idle_share_usd,
                "tokens": line.tokens,
                "requests": line.requests,
                "token_cost_usd": line.token_cost_usd,
                "cost_per_1m_tokens_usd": line.cost_per_1m_tokens_usd,
            }
            for line in self.lines
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "report": "showback",
            "from": format_ms(self.period.start_ms),
            "to": format_ms(self.period.end_ms),
            "by": self.by,
            "lines": self.records(),
            "totals": {
                "allocated_usd": self.allocated_usd,
                "no_model_usd": self.no_model_usd,
                "untagged_usd": self.untagged_usd,
                "host_usd": self.host_usd,
                "idle_usd": self.idle_usd,
                "total_usd": self.total_usd,
                "total_usd_cents": self.total_cents_usd,
                "gpu_hours": round(self.gpu_hours, 6),
                "reconciles": self.reconciles,
            },
            "notes": list(self.notes),
        }


def line_label(line: ShowbackLine) -> str:
    """What a person reads for the line: the value, or what the line stands for."""
    if line.line_kind == IDLE_LINE:
        return "(idle GPU time)"
    if line.line_kind == HOST_LINE:
        return "(host processes, no pod)"
    if line.line_kind == NO_MODEL_LINE:
        return "(no model)"
    return display(line.key)


def gpu_hours_places(total_gpu_hours: float) -> int:
    """Decimals for a GPU-hours column, from its total: a 10-minute period needs thousandths
    (0.047), a month of a fleet does not."""
    if total_gpu_hours >= 100:
        return 1
    if total_gpu_hours >= 10:
        return 2
    return 3


@dataclass
class _Acc:
    cost: Decimal = _ZERO
    idle_share: Decimal = _ZERO
    seconds: float = 0.0
    sm_pct_s: float = 0.0
    window_s: float = 0.0
    tokens: int = 0
    requests: int = 0
    token_cost: Decimal = _ZERO

    def add(self, cost: Decimal, idle: Decimal, secs: float, sm: float, win: float) -> None:
        self.cost += cost
        self.idle_share += idle
        self.seconds += secs
        self.sm_pct_s += sm
        self.window_s += win


def showback(
    store: ClickHouseStore, period: Period, by: str, *, use_rollups: bool = True
) -> ShowbackReport:
    check_choice(by, DIMENSIONS, "--by")
    check_period(period)
    db = store.database
    plan = read_plan(store, period.start_ms, period.end_ms, use_rollups=use_rollups)
    costs = cost_source(db, plan)
    tokens = token_source(db, plan)
    dim = "''" if by == "model" else by
    # Idle and host time are one line each whatever the dimension: one row per line.
    key_sql = f"if(kind IN ('{KIND_IDLE}', '{KIND_HOST}'), '', {dim})"
    what, narrow = f"showback by {by}", "give a shorter period or a coarser --by"
    cost_rows = query_bounded(
        store,
        f"SELECT {key_sql} AS key, kind, sum(cost_usd), sum(idle_cost_usd), sum(device_seconds), "
        f"sum(sm_pct_window_s), sum(window_s) FROM {costs} GROUP BY key, kind",
        limit=MAX_RESULT_ROWS,
        what=what,
        narrow=narrow,
    )
    token_dim = "model" if by == "model" else by
    token_rows = query_bounded(
        store,
        f"SELECT {token_dim} AS key, sum(cost_usd), sum(prompt_tokens + completion_tokens), "
        f"sum(requests) FROM {tokens} GROUP BY key",
        limit=MAX_RESULT_ROWS,
        what=what,
        narrow=narrow,
    )
    groups: dict[tuple[str, str], _Acc] = {}
    for key, kind, cost, idle, secs, sm, win in cost_rows:
        line_kind = _classify(kind, key)
        group_key = key if line_kind in (ALLOCATED, UNTAGGED_LINE) else ""
        groups.setdefault((line_kind, group_key), _Acc()).add(cost, idle, secs, sm, win)
    notes: list[str] = []
    if by == "model":
        _split_by_model(store, costs, tokens, groups)
        notes.append(
            "model lines: the cost of the pods that served the model's tokens; (no model): "
            "pods that served no tokens (batch, notebooks), counted as allocated"
        )
    for key, token_cost, n_tokens, requests in token_rows:
        line_kind = ALLOCATED if by == "model" or key not in (UNTAGGED, UNKNOWN) else UNTAGGED_LINE
        acc = groups.setdefault((line_kind, key), _Acc())
        acc.tokens += int(n_tokens)
        acc.requests += int(requests)
        acc.token_cost += token_cost
    if len(groups) > MAX_RESULT_ROWS:
        raise ConfigError(
            f"{what} has {len(groups):,} lines, more than the {MAX_RESULT_ROWS:,} rows one "
            f"report returns; {narrow}"
        )
    return _build(period, by, groups, tuple(notes))


def _classify(kind: str, key: str) -> str:
    if kind == KIND_IDLE:
        return IDLE_LINE
    if kind == KIND_HOST:
        return HOST_LINE
    if key in (UNTAGGED, UNKNOWN):
        return UNTAGGED_LINE
    return ALLOCATED


def _split_by_model(
    store: ClickHouseStore, costs: str, tokens: str, groups: dict[tuple[str, str], _Acc]
) -> None:
    """Usage cost goes to models by the cost-per-token rows; GPU time and SM use follow each
    pod-hour's cost share. What no model claims is the (no model) line."""
    usage = groups.pop((ALLOCATED, ""), None) or _Acc()
    untagged = groups.pop((UNTAGGED_LINE, ""), None)
    if untagged is not None:
        usage.add(
            untagged.cost,
            untagged.idle_share,
            untagged.seconds,
            untagged.sm_pct_s,
            untagged.window_s,
        )
    frac = "ifNull(toFloat64(t.cost) / nullIf(toFloat64(c.cost), 0), 0)"
    rows = query_bounded(
        store,
        f"SELECT t.model, sum(t.cost), sum(c.secs * {frac}), sum(c.sm * {frac}), "
        f"sum(c.win * {frac}), sum(c.idle * {frac}) FROM "
        f"(SELECT hour, pod_uid, sum(device_seconds) AS secs, sum(sm_pct_window_s) AS sm, "
        f"sum(window_s) AS win, sum(cost_usd) AS cost, toFloat64(sum(idle_cost_usd)) AS idle "
        f"FROM {costs} WHERE kind = 'usage' GROUP BY hour, pod_uid) AS c "
        f"RIGHT JOIN (SELECT hour, pod_uid, model, sum(cost_usd) AS cost FROM {tokens} "
        f"GROUP BY hour, pod_uid, model) AS t USING (hour, pod_uid) GROUP BY t.model",
        limit=MAX_RESULT_ROWS,
        what="showback by model",
        narrow="give a shorter period or a coarser --by",
    )
    claimed = _Acc()
    for model, cost, secs, sm, win, idle in rows:
        acc = groups.setdefault((ALLOCATED, model), _Acc())
        idle_dec = Decimal(repr(idle or 0.0))
        acc.add(cost, idle_dec, secs or 0.0, sm or 0.0, win or 0.0)
        claimed.add(cost, idle_dec, secs or 0.0, sm or 0.0, win or 0.0)
    rest = _Acc()
    rest.add(
        usage.cost - claimed.cost,
        usage.idle_share - claimed.idle_share,
        max(0.0, usage.seconds - claimed.seconds),
        max(0.0, usage.sm_pct_s - claimed.sm_pct_s),
        max(0.0, usage.window_s - claimed.window_s),
    )
    if rest.cost != 0 or rest.seconds > 1e-9:
        groups[(NO_MODEL_LINE, NO_MODEL)] = rest


_ORDER = {ALLOCATED: 0, NO_MODEL_LINE: 1, UNTAGGED_LINE: 2, HOST_LINE: 3, IDLE_LINE: 4}


def _build(
    period: Period, by: str, groups: dict[tuple[str, str], _Acc], notes: tuple[str, ...]
) -> ShowbackReport:
    items = sorted(groups.items(), key=lambda kv: (_ORDER[kv[0][0]], -kv[1].cost, kv[0][1]))
    total = sum((acc.cost for _, acc in items), _ZERO)
    cents = largest_remainder_cents([acc.cost for _, acc in items])
    lines = []
    sums = dict.fromkeys(_ORDER, _ZERO)
    for ((line_kind, key), acc), cent in zip(items, cents, strict=True):
        sums[line_kind] += acc.cost
        lines.append(
            ShowbackLine(
                key=key,
                line_kind=line_kind,
                cost_usd=acc.cost,
                cost_cents_usd=cent,
                share_pct=float(acc.cost / total * 100) if total else 0.0,
                gpu_hours=acc.seconds / 3600,
                avg_sm_util_pct=acc.sm_pct_s / acc.window_s
                if acc.window_s > 0 and line_kind != IDLE_LINE
                else None,
                idle_share_usd=acc.idle_share,
                tokens=acc.tokens,
                requests=acc.requests,
                token_cost_usd=acc.token_cost,
                cost_per_1m_tokens_usd=ratio(acc.token_cost * _MILLION, Decimal(acc.tokens), 6)
                if acc.tokens
                else None,
            )
        )
    return ShowbackReport(
        period=period,
        by=by,
        lines=tuple(lines),
        allocated_usd=sums[ALLOCATED] + sums[NO_MODEL_LINE],
        untagged_usd=sums[UNTAGGED_LINE],
        host_usd=sums[HOST_LINE],
        idle_usd=sums[IDLE_LINE],
        total_usd=total,
        total_cents_usd=round_total(total),
        gpu_hours=sum(acc.seconds for _, acc in items) / 3600,
        no_model_usd=sums[NO_MODEL_LINE],
        notes=notes,
    )

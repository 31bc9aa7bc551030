"""Showback: cost per team, product, model, namespace or cost centre over a period, with the
idle, untagged and host lines, and a total that reconciles with all metered GPU cost:
allocated + untagged + host + idle = total. By model, pod time that served no tokens is its own
`(no model)` line, counted as allocated: the GPU was held by a pod, just not for inference."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from typing import Any

from runtime.errors import ConfigError
from streams.billing.slices import KIND_NON_GPU, KIND_UNMETERED, latest_versions_sql
from streams.reports.limits import MAX_RESULT_ROWS, query_bounded
from streams.reports.money import WIDE, largest_remainder_cents, ratio, round_total
from streams.reports.params import DIMENSIONS, Period, check_choice, check_period, format_ms
from streams.reports.render import Tabular, display, money, num, pct
from streams.reports.sources import cost_source, read_plan, token_source
from streams.rollups import COST_DIMENSIONS
from streams.rows import KIND_HOST, KIND_IDLE, UNKNOWN, UNTAGGED
from streams.store import ClickHouseStore

ALLOCATED, UNTAGGED_LINE, HOST_LINE, IDLE_LINE = "allocated", "untagged", "host", "idle"
NON_GPU_LINE, UNMETERED_LINE = "non_gpu", "unmetered"  # billed basis only
BASES = ("list", "billed")
NO_MODEL_LINE = "no_model"  # by model only; part of the allocated total
NO_MODEL = "__no_model__"
_ZERO = Decimal(0)
_MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class ShowbackLine:
    key: str
    line_kind: str  # allocated | no_model | untagged | host | idle | non_gpu | unmetered
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
    basis: str = "list"  # list: the price book (metered); billed: the provider's bill
    currency: str = "USD"
    non_gpu_usd: Decimal = _ZERO  # billed basis: kept off GPU users by the non-GPU rule
    unmetered_usd: Decimal = _ZERO  # billed basis: GPU instances billed with no metering

    @property
    def reconciles(self) -> bool:
        parts = (
            self.allocated_usd
            + self.untagged_usd
            + self.host_usd
            + self.idle_usd
            + self.non_gpu_usd
            + self.unmetered_usd
        )
        cents = sum((line.cost_cents_usd for line in self.lines), _ZERO)
        return parts == self.total_usd and cents == self.total_cents_usd

    def table(self) -> Sequence[Tabular]:
        headers = (
            self.by.replace("_", " "),
            f"cost {self.currency}",
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
                "total (all metered GPU cost)"
                if self.basis == "list"
                else "total (the bill's EffectiveCost of GPU instances)",
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
        billed_parts = ""
        if self.basis == "billed":
            billed_parts = (
                f" + non-GPU part {money(cents[NON_GPU_LINE])} + unmetered "
                f"{money(cents[UNMETERED_LINE])}"
            )
        notes = (
            f"allocated {allocated} + untagged {money(cents[UNTAGGED_LINE])} + host "
            f"{money(cents[HOST_LINE])} + idle {money(cents[IDLE_LINE])}{billed_parts} = "
            f"{money(self.total_cents_usd)} ({check}; lines rounded to cents by largest "
            "remainder)",
            "avg SM: SM utilisation of the line's pods, weighted by window time; "
            "none for idle GPU time"
            if self.basis == "list"
            else "billed basis: each hour's bill for a GPU instance split over its metered "
            "rows by metered cost (gpuledger bill import)",
            *self.notes,
        )
        title = (
            f"GPU showback by {self.by.replace('_', ' ')}"
            f"{', billed basis' if self.basis == 'billed' else ''}, "
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
            "basis": self.basis,
            "currency": self.currency,
            "lines": self.records(),
            "totals": {
                "allocated_usd": self.allocated_usd,
                "no_model_usd": self.no_model_usd,
                "untagged_usd": self.untagged_usd,
                "host_usd": self.host_usd,
                "idle_usd": self.idle_usd,
                "non_gpu_usd": self.non_gpu_usd,
                "unmetered_usd": self.unmetered_usd,
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
    if line.line_kind == NON_GPU_LINE:
        return "(non-GPU part of GPU instances)"
    if line.line_kind == UNMETERED_LINE:
        return "(unmetered GPU spend)"
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
    store: ClickHouseStore,
    period: Period,
    by: str,
    *,
    use_rollups: bool = True,
    basis: str = "list",
) -> ShowbackReport:
    """Showback on the price-book basis (`list`: metered cost) or on the provider's bill
    (`billed`: the true-up of imported bills, with the non-GPU part and unmetered GPU spend
    on lines of their own)."""
    check_choice(by, DIMENSIONS, "--by")
    check_choice(basis, BASES, "--basis")
    check_period(period)
    db = store.database
    plan = read_plan(store, period.start_ms, period.end_ms, use_rollups=use_rollups)
    costs = cost_source(db, plan)
    tokens = token_source(db, plan)
    dim = "''" if by == "model" else by
    # Idle and host time are one line each whatever the dimension: one row per line.
    lone = (KIND_IDLE, KIND_HOST, KIND_NON_GPU, KIND_UNMETERED)
    key_sql = f"if(kind IN ({', '.join(repr(k) for k in lone)}), '', {dim})"
    what, narrow = f"showback by {by}", "give a shorter period or a coarser --by"
    notes: list[str] = []
    currency = "USD"
    metered_of: dict[tuple[str, str], Decimal] = {}
    if basis == "billed":
        currency, source, billed_notes = _billed_source(store, period, costs)
        notes += billed_notes
        costs = source
    cost_rows = query_bounded(
        store,
        f"SELECT {key_sql} AS key, kind, sum(cost_usd), sum(idle_cost_usd), sum(device_seconds), "
        f"sum(sm_pct_window_s), sum(window_s), sum(metered_cost_usd) FROM {costs} "
        "GROUP BY key, kind",
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
    for key, kind, cost, idle, secs, sm, win, metered in cost_rows:
        line_kind = _classify(kind, key)
        group_key = key if line_kind in (ALLOCATED, UNTAGGED_LINE) else ""
        groups.setdefault((line_kind, group_key), _Acc()).add(cost, idle, secs, sm, win)
        metered_of[(line_kind, group_key)] = metered_of.get((line_kind, group_key), _ZERO) + (
            metered or _ZERO
        )
    if by == "model":
        _split_by_model(store, costs, tokens, groups, billed=basis == "billed")
        notes.append(
            "model lines: the cost of the pods that served the model's tokens; (no model): "
            "pods that served no tokens (batch, notebooks), counted as allocated"
        )
    for key, token_cost, n_tokens, requests in token_rows:
        line_kind = ALLOCATED if by == "model" or key not in (UNTAGGED, UNKNOWN) else UNTAGGED_LINE
        acc = groups.setdefault((line_kind, key), _Acc())
        acc.tokens += int(n_tokens)
        acc.requests += int(requests)
        if basis == "billed":  # the tokens' metered cost at the line's billed/metered rate
            metered = metered_of.get((line_kind, key), _ZERO)
            with localcontext(WIDE):
                token_cost = token_cost * acc.cost / metered if metered else _ZERO
        acc.token_cost += token_cost
    if len(groups) > MAX_RESULT_ROWS:
        raise ConfigError(
            f"{what} has {len(groups):,} lines, more than the {MAX_RESULT_ROWS:,} rows one "
            f"report returns; {narrow}"
        )
    return _build(period, by, groups, tuple(notes), basis=basis, currency=currency)


def _billed_source(
    store: ClickHouseStore, period: Period, metered_costs: str
) -> tuple[str, str, list[str]]:
    """The billed rows of `period` shaped as a cost source, their currency, and notes: which
    bill versions they come from, and the metered cost no imported bill covers."""
    db = store.database
    hours = (
        f"hour >= toDateTime({period.start_ms // 1000}, 'UTC') "
        f"AND hour < toDateTime({-(-period.end_ms // 1000)}, 'UTC')"
    )
    latest = latest_versions_sql(db)
    currencies = [
        str(r[0])
        for r in store.query_rows(
            f"SELECT DISTINCT billing_currency FROM {db}.billed_cost_hourly "
            f"WHERE {latest} AND {hours} ORDER BY 1"
        )
    ]
    if len(currencies) > 1:
        raise ConfigError(
            f"the bills of this period are in {', '.join(currencies)}: give a period or "
            "bills in one currency"
        )
    dims = ", ".join(COST_DIMENSIONS)
    source = (
        f"(SELECT hour, {dims}, device_seconds, 0.0 AS sm_pct_window_s, 0.0 AS window_s, "
        "effective_cost AS cost_usd, toDecimal128(0, 15) AS idle_cost_usd, "
        "toUInt64(0) AS windows, metered_cost_usd "
        f"FROM {db}.billed_cost_hourly FINAL WHERE {latest} AND {hours})"
    )
    # A metered row can take parts of two resources' bills (a scale set's and its instance's):
    # count its metered cost once.
    billed_rows = f"(SELECT max(metered_cost_usd) AS m FROM {source} GROUP BY hour, {dims})"
    found = store.query_rows(
        f"SELECT (SELECT sum(cost_usd) FROM {metered_costs}), (SELECT sum(m) FROM "
        f"{billed_rows}), (SELECT count(DISTINCT slice) FROM {db}.billed_cost_hourly "
        f"WHERE {latest} AND {hours})"
    )
    metered_all, metered_billed, slices = found[0]
    notes = [f"billed basis: the newest version of {int(slices)} imported bill(s)"]
    uncovered = (metered_all or _ZERO) - (metered_billed or _ZERO)
    if not slices:
        notes.append("no imported bill covers this period: gpuledger bill import FILE")
    if uncovered:
        notes.append(
            f"metered cost on no imported bill (nodes or hours the bills do not cover): "
            f"{money(round_total(uncovered))} USD, not in this total"
        )
    return (currencies[0] if currencies else "USD"), source, notes


def _classify(kind: str, key: str) -> str:
    if kind == KIND_IDLE:
        return IDLE_LINE
    if kind == KIND_HOST:
        return HOST_LINE
    if kind == KIND_NON_GPU:
        return NON_GPU_LINE
    if kind == KIND_UNMETERED:
        return UNMETERED_LINE
    if key in (UNTAGGED, UNKNOWN):
        return UNTAGGED_LINE
    return ALLOCATED


def _split_by_model(
    store: ClickHouseStore,
    costs: str,
    tokens: str,
    groups: dict[tuple[str, str], _Acc],
    *,
    billed: bool = False,
) -> None:
    """Usage cost goes to models by the cost-per-token rows; GPU time and SM use follow each
    pod-hour's cost share. What no model claims is the (no model) line. On the billed basis a
    model takes the same share of its pod-hour's billed cost as of its metered cost (rounded
    down to 1e-15: the rest stays on the (no model) line, so the total is exact)."""
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
    frac = "ifNull(toFloat64(t.cost) / nullIf(toFloat64(c.metered), 0), 0)"
    claim = (
        "if(c.metered > 0, toDecimal128(toDecimal256(c.cost, 15) * toDecimal256(t.cost, 15) "
        "/ toDecimal256(c.metered, 15), 15), toDecimal128(0, 15))"
        if billed
        else "t.cost"
    )
    rows = query_bounded(
        store,
        f"SELECT t.model, sum({claim}), sum(c.secs * {frac}), sum(c.sm * {frac}), "
        f"sum(c.win * {frac}), sum(c.idle * {frac}) FROM "
        f"(SELECT hour, pod_uid, sum(device_seconds) AS secs, sum(sm_pct_window_s) AS sm, "
        f"sum(window_s) AS win, sum(cost_usd) AS cost, sum(metered_cost_usd) AS metered, "
        f"toFloat64(sum(idle_cost_usd)) AS idle "
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


_ORDER = {
    ALLOCATED: 0,
    NO_MODEL_LINE: 1,
    UNTAGGED_LINE: 2,
    HOST_LINE: 3,
    IDLE_LINE: 4,
    NON_GPU_LINE: 5,
    UNMETERED_LINE: 6,
}


def _build(
    period: Period,
    by: str,
    groups: dict[tuple[str, str], _Acc],
    notes: tuple[str, ...],
    *,
    basis: str = "list",
    currency: str = "USD",
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
                if acc.window_s > 0 and line_kind not in (IDLE_LINE, NON_GPU_LINE)
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
        basis=basis,
        currency=currency,
        non_gpu_usd=sums[NON_GPU_LINE],
        unmetered_usd=sums[UNMETERED_LINE],
    )

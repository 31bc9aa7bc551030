"""Variance: what the price book says the metered GPU time cost beside what the provider's bill
allocated to the same node-hours (the true-up, newest bill versions only), per GPU model, MIG
profile and pricing class (and price-book entry); with the metered nodes the bill has no line
for and the GPU instances on the bill that nothing metered."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from typing import Any

from runtime.errors import ConfigError
from schemas.fields import excerpt
from streams.billing.slices import KIND_NON_GPU, KIND_UNMETERED, latest_versions_sql
from streams.pricing import DEFAULT_ENTRY_ID, PriceBook
from streams.reports.limits import MAX_RESULT_ROWS, query_bounded
from streams.reports.money import WIDE, largest_remainder_cents, ratio, round_total
from streams.reports.params import Period, check_period, format_ms
from streams.reports.render import Tabular, money, num
from streams.reports.sources import cost_source, read_plan
from streams.rollups import ceil_hour
from streams.rows import KIND_HOST, KIND_IDLE, KIND_USAGE
from streams.store import ClickHouseStore

GPU_KINDS = (KIND_USAGE, KIND_IDLE, KIND_HOST)
_ZERO = Decimal(0)
_HOURS_QUANTUM = Decimal("1e-12")
_NARROW = "give a shorter period"


@dataclass(frozen=True, slots=True)
class VarianceLine:
    """One GPU model, MIG profile, pricing class, price-book entry and bill currency."""

    gpu_model: str
    mig_profile: str
    pricing: str
    entry_id: str | None  # the entry in force (x_PriceBookEntryId); None without a book
    currency: str  # the bill's
    device_hours: Decimal
    metered_usd: Decimal  # price-book cost of the metered rows of the billed node-hours
    effective_cost: Decimal  # the bill's EffectiveCost allocated to the GPU kinds
    billed_cost: Decimal
    book_rate: Decimal | None  # per device-hour: the rows' price, or metered / device-hours
    bill_rate: Decimal | None  # effective cost / device-hours, in `currency`
    variance: Decimal | None  # effective - metered; None when the currencies differ
    variance_pct: Decimal | None  # variance / metered * 100
    metered_cents: Decimal
    effective_cents: Decimal

    @property
    def label(self) -> str:
        return " ".join(p for p in (self.gpu_model, self.mig_profile, self.pricing) if p)

    @property
    def unit(self) -> str:
        return "device-h" if self.mig_profile else "GPU-h"


@dataclass(frozen=True, slots=True)
class UnbilledNode:
    """A metered node with hours in the bill's periods that no bill line covers."""

    cluster: str
    node: str
    hours: int
    metered_usd: Decimal
    metered_cents: Decimal
    first_hour_ms: int
    last_hour_ms: int


@dataclass(frozen=True, slots=True)
class UnmeteredSpend:
    """A GPU instance on the bill with no metering."""

    resource_key: str
    instance_type: str
    currency: str
    hours: Decimal  # the charge periods' length
    effective_cost: Decimal
    billed_cost: Decimal
    effective_cents: Decimal


_RECORD_KEYS = tuple(
    dict.fromkeys(
        f.name.removesuffix("_ms")
        for cls in (VarianceLine, UnbilledNode, UnmeteredSpend)
        for f in dataclasses.fields(cls)
        if not f.name.endswith("_cents")
    )
)


@dataclass(frozen=True, slots=True)
class BillTotals:
    """The bill in one currency by part (GPU kinds, non-GPU part, unmetered), and the metered
    cost of the rows its GPU part was allocated over."""

    currency: str
    metered_usd: Decimal
    gpu_effective_cost: Decimal
    gpu_billed_cost: Decimal
    non_gpu_effective_cost: Decimal
    unmetered_effective_cost: Decimal


@dataclass(frozen=True, slots=True)
class BillSlice:
    slice: str
    version: int
    billing_period_start_ms: int
    billing_period_end_ms: int
    currency: str


@dataclass(frozen=True, slots=True)
class VarianceReport:
    period: Period
    threshold_pct: Decimal
    book_currency: str
    lines: tuple[VarianceLine, ...]
    totals: tuple[BillTotals, ...]
    unbilled_nodes: tuple[UnbilledNode, ...]
    unmetered: tuple[UnmeteredSpend, ...]
    slices: tuple[BillSlice, ...]
    verdicts: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())

    def table(self) -> Sequence[Tabular]:
        span = f"{format_ms(self.period.start_ms)} to {format_ms(self.period.end_ms)}"
        headers = (
            "GPU model, class",
            "entry",
            "cur",
            "device-h",
            "metered",
            "billed (eff.)",
            "variance",
            "var %",
            "book rate",
            "bill rate",
        )
        rows = tuple(
            (
                line.label,
                line.entry_id or "-",
                line.currency,
                num(float(line.device_hours), 2),
                money(line.metered_cents),
                money(line.effective_cents),
                money(line.effective_cents - line.metered_cents)
                if line.variance is not None
                else "n/a",
                _pct(line.variance_pct),
                _rate(line.book_rate),
                _rate(line.bill_rate),
            )
            for line in self.lines
        )
        footer = tuple(self._footer(c) for c in sorted({line.currency for line in self.lines}))
        parts = [
            f"{t.currency}: non-GPU part {money(round_total(t.non_gpu_effective_cost))}, unmetered "
            f"GPU spend {money(round_total(t.unmetered_effective_cost))} (not in the lines above)"
            for t in self.totals
        ]
        notes = (
            *self.verdicts,
            *parts,
            "metered: price-book cost of the metered rows of the node-hours the bill covers "
            f"(newest bill versions); rates per device-hour; threshold {self.threshold_pct} %",
            *self.notes,
        )
        tables = [Tabular(f"GPU cost vs provider bill, {span}", headers, rows, footer, notes, 3)]
        if self.unbilled_nodes:
            tables.append(
                Tabular(
                    "Metered nodes with no bill line (in the bills' periods)",
                    ("cluster", "node", "hours", "metered", "first hour", "last hour"),
                    tuple(
                        (
                            n.cluster,
                            n.node,
                            str(n.hours),
                            money(n.metered_cents),
                            format_ms(n.first_hour_ms),
                            format_ms(n.last_hour_ms),
                        )
                        for n in self.unbilled_nodes
                    ),
                    right_aligned_from=2,
                )
            )
        if self.unmetered:
            tables.append(
                Tabular(
                    "Unmetered GPU spend (GPU instances on the bill that nothing metered)",
                    ("resource", "instance type", "cur", "hours", "effective cost"),
                    tuple(
                        (
                            u.resource_key,
                            u.instance_type,
                            u.currency,
                            num(float(u.hours), 1),
                            money(u.effective_cents),
                        )
                        for u in self.unmetered
                    ),
                    right_aligned_from=3,
                )
            )
        return tuple(tables)

    def _footer(self, currency: str) -> tuple[str, ...]:
        lines = [line for line in self.lines if line.currency == currency]
        metered = sum((line.metered_usd for line in lines), _ZERO)
        effective = sum((line.effective_cost for line in lines), _ZERO)
        m_cents = sum((line.metered_cents for line in lines), _ZERO)
        e_cents = sum((line.effective_cents for line in lines), _ZERO)
        hours = sum((line.device_hours for line in lines), _ZERO)
        same = currency == self.book_currency
        return (
            "total",
            "",
            currency,
            num(float(hours), 2),
            money(m_cents),
            money(e_cents),
            money(e_cents - m_cents) if same else "n/a",
            _pct(ratio((effective - metered) * 100, metered, 6) if same else None),
            "",
            "",
        )

    def records(self) -> list[dict[str, Any]]:
        """Every line of every section with the same columns, for CSV."""
        sections = (
            [("line", line) for line in self.lines]
            + [("unbilled_node", node) for node in self.unbilled_nodes]
            + [("unmetered", spend) for spend in self.unmetered]
        )
        return [{"section": name} | dict.fromkeys(_RECORD_KEYS) | _fields(item)
                for name, item in sections]  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "report": "variance",
            "from": format_ms(self.period.start_ms),
            "to": format_ms(self.period.end_ms),
            "threshold_pct": self.threshold_pct,
            "price_book_currency": self.book_currency,
            "lines": [_fields(line) for line in self.lines],
            "totals": [_fields(t) for t in self.totals],
            "unbilled_nodes": [_fields(n) for n in self.unbilled_nodes],
            "unmetered": [_fields(u) for u in self.unmetered],
            "bill_slices": [_fields(s) for s in self.slices],
            "verdicts": list(self.verdicts),
            "notes": list(self.notes),
        }


def _fields(item: Any) -> dict[str, Any]:
    """A dataclass as JSON fields: `*_ms` times as RFC 3339 text (named without the suffix);
    the display cents left out (JSON and CSV carry exact amounts)."""
    out: dict[str, Any] = {}
    for name in (f.name for f in dataclasses.fields(item)):
        if name.endswith("_ms"):
            out[name.removesuffix("_ms")] = format_ms(getattr(item, name))
        elif not name.endswith("_cents"):
            out[name] = getattr(item, name)
    return out


def _pct(value: Decimal | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def _rate(value: Decimal | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if abs(value) >= 1 else f"{value:.4f}"


# --------------------------------------------------------------------------- reading


@dataclass
class _Acc:
    seconds: float = 0.0
    metered: Decimal = _ZERO
    effective: Decimal = _ZERO
    billed: Decimal = _ZERO
    prices: set[Decimal] = field(default_factory=set)


def parse_threshold(text: str) -> Decimal:
    """`--threshold` / `threshold=`: a percentage, zero or more, such as `5` or `2.5`."""
    value = Decimal("NaN")
    if len(text) <= 20:
        with contextlib.suppress(ArithmeticError):
            value = Decimal(text.strip())
    if not value.is_finite() or value < 0:
        raise ConfigError(f"threshold {excerpt(text)} is not a percentage of zero or more")
    return value


def variance(
    store: ClickHouseStore,
    period: Period,
    *,
    price_book: PriceBook | None,
    threshold_pct: Decimal = Decimal("5"),
    use_rollups: bool = True,
) -> VarianceReport:
    """The report over the whole hours that start in `period` (module docstring). With a
    price book, lines are per price-book entry in force at each hour."""
    check_period(period)
    if not threshold_pct.is_finite() or threshold_pct < 0:
        raise ConfigError(f"the variance threshold {threshold_pct} % must be zero or more")
    db = store.database
    latest = latest_versions_sql(db)
    first_ms, end_ms = ceil_hour(period.start_ms), ceil_hour(period.end_ms)
    hours = (
        f"hour >= toDateTime({first_ms // 1000}, 'UTC') "
        f"AND hour < toDateTime({end_ms // 1000}, 'UTC')"
    )
    billed = f"{db}.billed_cost_hourly FINAL WHERE {latest} AND {hours}"
    gpu = "kind IN (" + ", ".join(f"'{k}'" for k in GPU_KINDS) + ")"
    costs = cost_source(db, read_plan(store, first_ms, end_ms, use_rollups=use_rollups))
    bucket = _bucket_sql(price_book)

    def bounded(sql: str, what: str) -> list[tuple[Any, ...]]:
        return query_bounded(store, sql, limit=MAX_RESULT_ROWS, what=what, narrow=_NARROW)

    slices = [
        BillSlice(str(s), int(v), int(a) * 1000, int(b) * 1000, str(c))
        for s, v, a, b, c in bounded(
            "SELECT slice, version, toUnixTimestamp(billing_period_start), "
            f"toUnixTimestamp(billing_period_end), billing_currency FROM {db}.bill_versions "
            f"FINAL WHERE {latest} AND billing_period_end > toDateTime({first_ms // 1000}, 'UTC') "
            f"AND billing_period_start < toDateTime({end_ms // 1000}, 'UTC') ORDER BY slice",
            "the bill slices of the variance report",
        )
    ]
    node_hours = (
        f"SELECT hour, cluster, node, any(billing_currency) AS currency FROM {billed} AND {gpu} "
        "GROUP BY hour, cluster, node"
    )
    groups: dict[tuple[str, str, str, str | None, str], _Acc] = {}
    for model, mig, pricing, _, hour_s, currency, secs, cost, low, high in bounded(
        f"SELECT c.gpu_model, c.mig_profile, c.pricing, {bucket.format(hour='c.hour')} AS bucket, "
        "toUnixTimestamp(min(c.hour)), b.currency, sum(c.device_seconds), sum(c.cost_usd), "
        f"min(c.price_per_hour), max(c.price_per_hour) FROM {costs} AS c "
        f"INNER JOIN ({node_hours}) AS b ON c.hour = b.hour AND c.cluster = b.cluster "
        "AND c.node = b.node GROUP BY c.gpu_model, c.mig_profile, c.pricing, bucket, b.currency",
        "variance by GPU model (metered)",
    ):
        key = _key(price_book, model, mig, pricing, int(hour_s), currency)
        acc = groups.setdefault(key, _Acc())
        acc.seconds += secs
        acc.metered += cost
        acc.prices |= {low, high}
    for model, mig, pricing, _, hour_s, currency, eff, bil in bounded(
        f"SELECT gpu_model, mig_profile, pricing, {bucket.format(hour='hour')} AS bucket, "
        "toUnixTimestamp(min(hour)), billing_currency, sum(effective_cost), sum(billed_cost) "
        f"FROM {billed} AND {gpu} GROUP BY gpu_model, mig_profile, pricing, bucket, "
        "billing_currency",
        "variance by GPU model (billed)",
    ):
        key = _key(price_book, model, mig, pricing, int(hour_s), currency)
        acc = groups.setdefault(key, _Acc())
        acc.effective += eff
        acc.billed += bil
    if len(groups) > MAX_RESULT_ROWS:
        raise ConfigError(
            f"the variance report has {len(groups):,} lines, more than the {MAX_RESULT_ROWS:,} "
            f"rows one report returns; {_NARROW}"
        )
    totals: dict[str, list[Decimal]] = {}
    for currency, kind, eff, bil in bounded(
        f"SELECT billing_currency, kind, sum(effective_cost), sum(billed_cost) FROM {billed} "
        "GROUP BY billing_currency, kind ORDER BY billing_currency, kind",
        "the variance report's totals",
    ):
        acc4 = totals.setdefault(currency, [_ZERO] * 4)
        part = 2 if kind == KIND_NON_GPU else 3 if kind == KIND_UNMETERED else 0
        acc4[part] += eff
        if part == 0:
            acc4[1] += bil
    unmetered = _unmetered(bounded, db, billed, latest)
    covered = _covered_sql(slices, first_ms, end_ms)
    unbilled = bounded(
        "SELECT cluster, node, uniqExact(hour), sum(cost_usd), toUnixTimestamp(min(hour)), "
        f"toUnixTimestamp(max(hour)) FROM {costs} WHERE ({covered}) AND (hour, cluster, node) "
        f"NOT IN (SELECT hour, cluster, node FROM {billed}) GROUP BY cluster, node "
        "ORDER BY sum(cost_usd) DESC, cluster, node",
        "metered nodes with no bill line",
    )
    return _build(period, threshold_pct, price_book, groups, totals, unmetered, unbilled, slices)


def _bucket_sql(book: PriceBook | None) -> str:
    """Which span between the book's effective dates an hour is in: within one span every
    (model, class) has one entry in force. Only integers reach the SQL."""
    starts = sorted({e.effective_from_ms for e in book.entries} if book else set())
    if not starts:
        return "0"
    return (
        f"arrayCount(x -> x <= toInt64(toUnixTimestamp({{hour}})) * 1000, "
        f"[{', '.join(str(int(s)) for s in starts)}])"
    )


def _key(
    book: PriceBook | None, model: str, mig: str, pricing: str, hour_s: int, currency: str
) -> tuple[str, str, str, str | None, str]:
    entry_id: str | None = None
    if book is not None:
        entry = book.entry_at(model, pricing, hour_s * 1000)
        entry_id = entry.entry_id if entry is not None else DEFAULT_ENTRY_ID
    return (model, mig, pricing, entry_id, currency)


def _covered_sql(slices: Sequence[BillSlice], first_ms: int, end_ms: int) -> str:
    """The hours of the report inside the bills' periods, overlapping periods merged."""
    spans: list[list[int]] = []
    for s in sorted(slices, key=lambda s: s.billing_period_start_ms):
        lo, hi = max(s.billing_period_start_ms, first_ms), min(s.billing_period_end_ms, end_ms)
        if spans and lo <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], hi)
        elif hi > lo:
            spans.append([lo, hi])
    return (
        " OR ".join(
            f"(hour >= toDateTime({lo // 1000}, 'UTC') AND hour < toDateTime({hi // 1000}, 'UTC'))"
            for lo, hi in spans
        )
        or "0"
    )


def _unmetered(bounded: Any, db: str, billed: str, latest: str) -> list[tuple[Any, ...]]:
    """Per GPU instance nothing metered: its bill and the hours of its charge periods."""
    rows: list[tuple[Any, ...]] = bounded(
        "SELECT u.resource_key, u.instance_type, u.billing_currency, u.eff, u.bil, "
        "ifNull(h.seconds, 0) FROM (SELECT resource_key, instance_type, billing_currency, "
        "sum(effective_cost) AS eff, sum(billed_cost) AS bil FROM "
        f"{billed} AND kind = '{KIND_UNMETERED}' GROUP BY resource_key, instance_type, "
        "billing_currency) AS u LEFT JOIN (SELECT resource_key, "
        "sum(dateDiff('second', charge_period_start, charge_period_end)) AS seconds FROM "
        "(SELECT DISTINCT slice, resource_key, charge_period_start, charge_period_end FROM "
        f"{db}.bill_lines FINAL WHERE {latest} AND (slice, resource_key, "
        "toStartOfHour(charge_period_start)) IN (SELECT slice, resource_key, hour FROM "
        f"{billed} AND kind = '{KIND_UNMETERED}')) GROUP BY resource_key) AS h "
        "ON u.resource_key = h.resource_key ORDER BY u.eff DESC, u.resource_key",
        "unmetered GPU spend",
    )
    return rows


def _build(
    period: Period,
    threshold_pct: Decimal,
    book: PriceBook | None,
    groups: dict[tuple[str, str, str, str | None, str], _Acc],
    totals: dict[str, list[Decimal]],
    unmetered_rows: list[tuple[Any, ...]],
    unbilled_rows: list[tuple[Any, ...]],
    slices: list[BillSlice],
) -> VarianceReport:
    book_currency = book.currency if book is not None else "USD"
    items = sorted(
        groups.items(), key=lambda kv: (kv[0][4], -kv[1].metered, kv[0][:3], kv[0][3] or "")
    )
    metered_cents = _cents_by_currency([(k[4], acc.metered) for k, acc in items])
    effective_cents = _cents_by_currency([(k[4], acc.effective) for k, acc in items])
    lines, verdicts = [], []
    for ((model, mig, pricing, entry_id, currency), acc), m_cents, e_cents in zip(
        items, metered_cents, effective_cents, strict=True
    ):
        with localcontext(WIDE):
            device_hours = (Decimal(repr(acc.seconds)) / 3600).quantize(_HOURS_QUANTUM)
        same = currency == book_currency
        if len(acc.prices) == 1:
            book_rate: Decimal | None = next(iter(acc.prices))
        else:
            book_rate = ratio(acc.metered, device_hours, 6) if device_hours else None
        diff = acc.effective - acc.metered if same else None
        diff_pct = ratio(diff * 100, acc.metered, 6) if diff is not None else None
        line = VarianceLine(
            model,
            mig,
            pricing,
            entry_id,
            currency,
            device_hours,
            acc.metered,
            acc.effective,
            acc.billed,
            book_rate,
            ratio(acc.effective, device_hours, 6) if device_hours else None,
            diff,
            diff_pct,
            m_cents,
            e_cents,
        )
        lines.append(line)
        verdict = _verdict(line, threshold_pct) if same else None
        if verdict:
            verdicts.append(verdict)
    notes = [
        f"bill in {currency}: amounts shown in {currency}; rates and variance not compared "
        f"with the price book, which is in {book_currency}"
        for currency in sorted({line.currency for line in lines} | set(totals))
        if currency != book_currency
    ]
    unbilled_cents = largest_remainder_cents([Decimal(r[3]) for r in unbilled_rows])
    unmetered_cents = _cents_by_currency([(str(r[2]), Decimal(r[3])) for r in unmetered_rows])
    return VarianceReport(
        period=period,
        threshold_pct=threshold_pct,
        book_currency=book_currency,
        lines=tuple(lines),
        totals=tuple(
            BillTotals(c, sum((x.metered_usd for x in lines if x.currency == c), _ZERO), *t)
            for c, t in sorted(totals.items())
        ),
        unbilled_nodes=tuple(
            UnbilledNode(str(c), str(n), int(h), cost, cents, int(a) * 1000, int(b) * 1000)
            for (c, n, h, cost, a, b), cents in zip(unbilled_rows, unbilled_cents, strict=True)
        ),
        unmetered=tuple(
            UnmeteredSpend(str(k), str(t), str(c), Decimal(int(s)) / 3600, eff, bil, cents)
            for (k, t, c, eff, bil, s), cents in zip(unmetered_rows, unmetered_cents, strict=True)
        ),
        slices=tuple(slices),
        verdicts=tuple(verdicts),
        notes=tuple(notes),
    )


def _cents_by_currency(amounts: Sequence[tuple[str, Decimal]]) -> list[Decimal]:
    """Largest-remainder cents within each currency: a currency's lines add up to its total."""
    out = [_ZERO] * len(amounts)
    for currency in {c for c, _ in amounts}:
        at = [i for i, (c, _) in enumerate(amounts) if c == currency]
        for i, cents in zip(at, largest_remainder_cents([amounts[i][1] for i in at]), strict=True):
            out[i] = cents
    return out


def _verdict(line: VarianceLine, threshold_pct: Decimal) -> str | None:
    """A line off by more than the threshold, in words; None when within it."""
    name = f"price-book entry `{line.entry_id}`" if line.entry_id else "the price book"
    book = f"{name} ({line.label}, {_rate(line.book_rate)}/{line.unit})"
    if line.metered_usd == 0:
        if line.effective_cost == 0:
            return None
        return (
            f"{book}: the bill allocates {money(round_total(line.effective_cost))} "
            f"{line.currency} to node-hours with no metered cost"
        )
    assert line.variance is not None and line.variance_pct is not None
    if abs(line.variance) * 100 <= threshold_pct * line.metered_usd:
        return None
    # variance_pct is the bill's difference from the book, as a share of the book.
    side = "below" if line.variance < 0 else "above"
    return (
        f"{book}: the bill's {_rate(line.bill_rate)}/{line.unit} is "
        f"{abs(line.variance_pct):.1f} % {side} it"
    )

"""Unit economics of inference: cost per 1M tokens (blended, and input vs output as labelled
estimates, design §3) and cost per request, by model, team and product, with the trend
across the period. Every figure is given on two bases, side by side:

- usage basis: the pods' own GPU cost, idle excluded (an idle share that an idle policy spread
  into pod rows is taken out again);
- allocation basis: idle included: each bucket's idle cost spread over the pod cost of that
  bucket in proportion to it (as OpenCost's idle-included view).
Aggregates divide sums; they never average ratios.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from runtime.errors import ConfigError
from streams.allocation import MONEY_QUANTUM
from streams.reports.limits import MAX_RESULT_ROWS, MAX_SERIES_POINTS, query_bounded
from streams.reports.money import ratio, round_total
from streams.reports.params import Period, check_period, format_ms
from streams.reports.render import Tabular, display
from streams.reports.sources import cost_source, read_plan, token_source
from streams.store import ClickHouseStore
from streams.tokens import split_input_output

_ZERO = Decimal(0)
_MILLION = Decimal(1_000_000)
DEFAULT_OUTPUT_WEIGHT = 3.0


@dataclass(frozen=True, slots=True)
class Basis:
    """The figures of one line on one basis."""

    cost_usd: Decimal
    cost_per_1m_tokens_usd: Decimal | None
    input_cost_per_1m_tokens_usd: Decimal | None  # estimate
    output_cost_per_1m_tokens_usd: Decimal | None  # estimate
    cost_per_request_usd: Decimal | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "cost_usd": self.cost_usd,
            "cost_per_1m_tokens_usd": self.cost_per_1m_tokens_usd,
            "input_cost_per_1m_tokens_usd_estimate": self.input_cost_per_1m_tokens_usd,
            "output_cost_per_1m_tokens_usd_estimate": self.output_cost_per_1m_tokens_usd,
            "cost_per_request_usd": self.cost_per_request_usd,
        }


@dataclass(frozen=True, slots=True)
class TrendPoint:
    bucket_start_ms: int
    tokens: int
    requests: int
    usage_cost_usd: Decimal
    allocation_cost_usd: Decimal

    def cost_per_1m(self, basis: str) -> Decimal | None:
        cost = self.usage_cost_usd if basis == "usage" else self.allocation_cost_usd
        return ratio(cost * _MILLION, Decimal(self.tokens), 6) if self.tokens else None


@dataclass(frozen=True, slots=True)
class UnitLine:
    model: str
    team: str
    product: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    requests: int
    split_basis: str  # "time" (prefill vs decode seconds) or "weight"
    usage: Basis
    allocation: Basis
    trend: tuple[TrendPoint, ...]

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class UnitEconomicsReport:
    period: Period
    bucket: str  # "hour" or "day"
    lines: tuple[UnitLine, ...]
    output_weight: float

    def table(self) -> Sequence[Tabular]:
        def pair(u: Decimal | None, a: Decimal | None, places: int = 2) -> str:
            def one(v: Decimal | None) -> str:
                return "-" if v is None else f"{v:,.{places}f}"

            return f"{one(u)} / {one(a)}"

        rows = []
        for line in self.lines:
            first = next((p for p in line.trend if p.tokens), None)
            last = next((p for p in reversed(line.trend) if p.tokens), None)
            trend = "-"
            if first and last and first is not last:
                a, b = first.cost_per_1m("allocation"), last.cost_per_1m("allocation")
                if a and b:
                    trend = f"{float((b - a) / a * 100):+.1f}%"
            rows.append(
                (
                    display(line.model),
                    display(line.team),
                    display(line.product),
                    f"{line.tokens:,}",
                    f"{line.requests:,}",
                    pair(round_total(line.usage.cost_usd), round_total(line.allocation.cost_usd)),
                    pair(line.usage.cost_per_1m_tokens_usd, line.allocation.cost_per_1m_tokens_usd),
                    pair(
                        line.usage.input_cost_per_1m_tokens_usd,
                        line.allocation.input_cost_per_1m_tokens_usd,
                    ),
                    pair(
                        line.usage.output_cost_per_1m_tokens_usd,
                        line.allocation.output_cost_per_1m_tokens_usd,
                    ),
                    pair(line.usage.cost_per_request_usd, line.allocation.cost_per_request_usd, 5),
                    trend,
                )
            )
        headers = (
            "model",
            "team",
            "product",
            "tokens",
            "requests",
            "cost USD",
            "USD/1M tok",
            "input USD/1M*",
            "output USD/1M*",
            "USD/request",
            "trend",
        )
        notes = (
            "each money column: usage basis (idle excluded) / allocation basis (idle included)",
            "* input/output split is an ESTIMATE: by prefill vs decode time where known, else "
            f"output tokens weighted {self.output_weight:g}:1; input priced over uncached "
            "prompt tokens",
            f"trend: change of allocation-basis USD/1M tokens from the first to the last "
            f"{self.bucket} with tokens",
        )
        title = (
            f"Inference unit economics, {format_ms(self.period.start_ms)} to "
            f"{format_ms(self.period.end_ms)}"
        )
        return (Tabular(title, headers, tuple(rows), notes=notes, right_aligned_from=3),)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.lines:
            record: dict[str, Any] = {
                "model": line.model,
                "team": line.team,
                "product": line.product,
                "prompt_tokens": line.prompt_tokens,
                "completion_tokens": line.completion_tokens,
                "cached_tokens": line.cached_tokens,
                "requests": line.requests,
                "split_estimate_basis": line.split_basis,
            }
            for name, basis in (("usage", line.usage), ("allocation", line.allocation)):
                for key, value in basis.to_dict().items():
                    record[f"{name}_{key}"] = value
            out.append(record)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "report": "unit-economics",
            "from": format_ms(self.period.start_ms),
            "to": format_ms(self.period.end_ms),
            "trend_bucket": self.bucket,
            "estimates": "input/output figures are estimates (design §3)",
            "output_weight": self.output_weight,
            "lines": [
                {
                    **record,
                    "trend": [
                        {
                            "bucket_start": format_ms(p.bucket_start_ms),
                            "tokens": p.tokens,
                            "requests": p.requests,
                            "usage_cost_usd": p.usage_cost_usd,
                            "allocation_cost_usd": p.allocation_cost_usd,
                            "usage_cost_per_1m_tokens_usd": p.cost_per_1m("usage"),
                            "allocation_cost_per_1m_tokens_usd": p.cost_per_1m("allocation"),
                        }
                        for p in line.trend
                    ],
                }
                for record, line in zip(self.records(), self.lines, strict=True)
            ],
        }


def _basis(
    cost: Decimal,
    prompt: int,
    completion: int,
    cached: int,
    requests: int,
    prefill_s: float,
    decode_s: float,
    output_weight: float,
) -> tuple[Basis, str]:
    split = split_input_output(cost, prompt, completion, prefill_s, decode_s, output_weight)
    uncached = max(prompt - cached, 0)
    return (
        Basis(
            cost_usd=cost,
            cost_per_1m_tokens_usd=ratio(cost * _MILLION, Decimal(prompt + completion), 6)
            if prompt + completion
            else None,
            input_cost_per_1m_tokens_usd=ratio(
                split.input_cost_usd * _MILLION, Decimal(uncached), 6
            )
            if uncached
            else None,
            output_cost_per_1m_tokens_usd=ratio(
                split.output_cost_usd * _MILLION, Decimal(completion), 6
            )
            if completion
            else None,
            cost_per_request_usd=ratio(cost, Decimal(requests), 9) if requests else None,
        ),
        split.basis,
    )


def unit_economics(
    store: ClickHouseStore,
    period: Period,
    *,
    output_weight: float = DEFAULT_OUTPUT_WEIGHT,
    use_rollups: bool = True,
) -> UnitEconomicsReport:
    check_period(period)
    plan = read_plan(store, period.start_ms, period.end_ms, use_rollups=use_rollups)
    bucket = "hour" if period.hours <= 48 else "day"
    bucket_sql = "hour" if bucket == "hour" else "toStartOfDay(hour)"
    costs = cost_source(store.database, plan)
    tokens = token_source(store.database, plan)
    factors: dict[int, tuple[Decimal, Decimal]] = {}
    for b, usage, idle_in_usage, idle_rows in store.query_rows(
        f"SELECT toUnixTimestamp({bucket_sql}) AS b, sumIf(cost_usd, kind = 'usage'), "
        f"sumIf(idle_cost_usd, kind = 'usage'), sumIf(cost_usd, kind = 'idle') "
        f"FROM {costs} GROUP BY b"
    ):
        if usage > 0:
            factors[int(b) * 1000] = ((usage - idle_in_usage) / usage, (usage + idle_rows) / usage)
    # The factors above are one row per hour or day of a bounded period; these are one row
    # per line and bucket, so they are bounded here.
    what = f"unit economics (one row per model, team, product and {bucket})"
    rows = query_bounded(
        store,
        f"SELECT toUnixTimestamp({bucket_sql}) AS b, model, team, product, sum(cost_usd), "
        f"sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens), sum(requests), "
        f"sum(prefill_s), sum(decode_s) FROM {tokens} GROUP BY b, model, team, product "
        f"ORDER BY model, team, product, b",
        limit=MAX_SERIES_POINTS,
        what=what,
        narrow="give a shorter period",
    )
    grouped: dict[tuple[str, str, str], list[tuple[Any, ...]]] = {}
    for row in rows:
        grouped.setdefault((row[1], row[2], row[3]), []).append(row)
    if len(grouped) > MAX_RESULT_ROWS:
        raise ConfigError(
            f"unit economics has {len(grouped):,} (model, team, product) lines, more than the "
            f"{MAX_RESULT_ROWS:,} rows one report returns; give a shorter period"
        )
    lines = []
    for (model, team, product), bucket_rows in grouped.items():
        trend = []
        sums = [0, 0, 0, 0, 0.0, 0.0]
        usage_cost = alloc_cost = _ZERO
        for b, _, _, _, cost, prompt, completion, cached, requests, pre, dec in bucket_rows:
            f_usage, f_alloc = factors.get(int(b) * 1000, (Decimal(1), Decimal(1)))
            u = (cost * f_usage).quantize(MONEY_QUANTUM)
            a = (cost * f_alloc).quantize(MONEY_QUANTUM)
            usage_cost += u
            alloc_cost += a
            for i, v in enumerate((prompt, completion, cached, requests, pre, dec)):
                sums[i] += v
            trend.append(TrendPoint(int(b) * 1000, int(prompt + completion), int(requests), u, a))
        prompt, completion, cached, requests = (int(v) for v in sums[:4])
        pre, dec = float(sums[4]), float(sums[5])
        usage_basis, split_basis = _basis(
            usage_cost, prompt, completion, cached, requests, pre, dec, output_weight
        )
        alloc_basis, _ = _basis(
            alloc_cost, prompt, completion, cached, requests, pre, dec, output_weight
        )
        lines.append(
            UnitLine(
                model,
                team,
                product,
                prompt,
                completion,
                cached,
                requests,
                split_basis,
                usage_basis,
                alloc_basis,
                tuple(trend),
            )
        )
    lines.sort(key=lambda line: (-line.allocation.cost_usd, line.model, line.team))
    return UnitEconomicsReport(period, bucket, tuple(lines), output_weight)

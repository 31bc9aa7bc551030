"""`gpuledger plan`: the cost of serving a model at a target rate, read from the store and
worked out by the pure core (`streams.reports.plan`), as a report (table, CSV, JSON)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Any

from runtime.errors import ConfigError
from schemas.fields import excerpt
from streams.allocation import MONEY_QUANTUM
from streams.pricing import PriceBook
from streams.reports.limits import MAX_SOURCE_ROWS, query_bounded
from streams.reports.money import WIDE, round_total
from streams.reports.params import Period, check_period, format_ms
from streams.reports.plan import (
    HOURS_PER_MONTH,
    SOLID_DEVICE_HOURS,
    SOLID_DISTINCT_HOURS,
    SOLID_MAX_CV,
    THIN_DEVICE_HOURS,
    THIN_DISTINCT_HOURS,
    DeviceType,
    Measured,
    Option,
    PodDeviceHour,
    PodModelHour,
    cheapest,
    measure,
    plan_options,
)
from streams.reports.render import Tabular, money
from streams.reports.sources import cost_source, read_plan, token_source
from streams.store import ClickHouseStore

_SHOWN_MODELS = 10


@dataclass(frozen=True, slots=True)
class Target:
    tokens_per_s: Fraction
    observed_tokens_per_s: float  # the model's tokens over the period's seconds
    growth: Fraction | None  # None for an absolute target

    def describe(self) -> str:
        rate = f"{sig3(float(self.tokens_per_s))} tokens/s"
        if self.growth is None:
            return rate
        return (
            f"{rate} ({float(self.growth):g}x the observed average "
            f"{sig3(self.observed_tokens_per_s)} tokens/s)"
        )


@dataclass(frozen=True, slots=True)
class PlanReport:
    period: Period
    model: str
    target: Target
    prompt_tokens: int  # the model's, in the period
    completion_tokens: int
    cached_tokens: int
    unplaced_tokens: float  # in pod-hours with no metered device time
    options: tuple[Option, ...]  # cheapest first
    price_note: str

    @property
    def cheapest(self) -> Option | None:
        return cheapest(self.options)

    @property
    def prompt_share(self) -> float | None:
        total = self.prompt_tokens + self.completion_tokens
        return self.prompt_tokens / total if total else None

    def notes(self) -> tuple[str, ...]:
        best = self.cheapest
        share = self.prompt_share
        mix = "token mix unknown"
        if share is not None:
            target = float(self.target.tokens_per_s)
            mix = (
                f"token mix observed {share:.1%} prompt / {1 - share:.1%} completion"
                + (
                    f" ({self.cached_tokens / self.prompt_tokens:.1%} of prompt tokens cached)"
                    if self.prompt_tokens
                    else ""
                )
                + f"; the target at that mix: {sig3(target * share)} prompt + "
                f"{sig3(target * (1 - share))} completion tokens/s"
            )
        out = [
            f"target {self.target.describe()}; " + mix,
            "throughput is measured at the observed token mix and utilisation over the period; "
            "nothing is extrapolated beyond what was seen (another mix, batch size or "
            "utilisation serves at another rate)",
            "device time: the model's pods' metered device-seconds with each device's idle time "
            "spread over its users, split over a pod's models by cost share; hours a pod served "
            "no tokens are not counted (showback's (no model))",
            f"devices = ceil(target / tokens per device-second); a device is a whole GPU or a "
            f"MIG instance; month = devices x USD per device-hour x {HOURS_PER_MONTH} h",
            self.price_note,
            f"confidence: thin under {THIN_DEVICE_HOURS:g} device-hours or "
            f"{THIN_DISTINCT_HOURS} distinct hours; solid from {SOLID_DEVICE_HOURS:g} "
            f"device-hours over {SOLID_DISTINCT_HOURS} hours with hourly CV at most "
            f"{SOLID_MAX_CV:g}; fair between",
            "rates are binary floats (about 15 significant digits), shown to 3; money is exact, "
            "shown in cents (each option rounded half-up: options are alternatives, not parts)",
        ]
        if best is not None:
            out.insert(
                1,
                f"cheapest fit: {_device_text(best.measured.device)}, {best.devices:,} devices, "
                f"{money(round_total(best.monthly_cost_usd))} USD a month "
                f"({best.evidence.grade} data)",
            )
        for o in self.options:
            k = o.measured.devices_per_pod
            if k > 1:
                out.append(
                    f"{_device_text(o.measured.device)}: a pod held up to {k} of these devices "
                    f"at once; serving in such pods takes {-(-o.devices // k) * k:,} devices "
                    f"({-(-o.devices // k):,} pods), not {o.devices:,}"
                )
        if self.unplaced_tokens:
            out.append(
                f"{self.unplaced_tokens:,.0f} tokens were served in pod-hours with no metered "
                "device time and are in no estimate"
            )
        return tuple(out)

    def table(self) -> Sequence[Tabular]:
        """Two tables, each narrow enough for a terminal: the options, then what each rests on
        (the notes follow the second)."""
        options, evidence = [], []
        for o in self.options:
            m, e = o.measured, o.evidence
            device = _device_text(m.device)
            options.append(
                (
                    device,
                    sig3(m.tokens_per_device_s),
                    "-" if m.sm_util_pct is None else f"{m.sm_util_pct:.0f}%",
                    "-" if m.busy_share is None else f"{m.busy_share:.0%}",
                    f"{o.devices:,}",
                    f"{o.price_per_hour_usd:,.4f}",
                    money(round_total(o.monthly_cost_usd)),
                    f"{o.cost_per_1m_tokens_usd:,.4f}",
                )
            )
            evidence.append(
                (
                    device,
                    _hours_text(e.device_hours),
                    f"{e.tokens:,.0f}",
                    f"{e.distinct_hours:,}",
                    "-" if e.hourly_cv is None else f"{e.hourly_cv:.2f}",
                    e.reason,
                )
            )
        title = (
            f"Plan for {self.model}, measured {format_ms(self.period.start_ms)} to "
            f"{format_ms(self.period.end_ms)}"
        )
        option_headers = (
            "device (GPU, MIG, pricing)",
            "tok/device-s",
            "SM util",
            "busy",
            "devices",
            "USD/device-h",
            "USD/month",
            "USD/1M tok at target",
        )
        evidence_headers = ("device", "device-h", "tokens", "hours", "CV", "confidence")
        return (
            Tabular(title, option_headers, tuple(options), right_aligned_from=1),
            Tabular(
                f"What the plan for {self.model} rests on",
                evidence_headers,
                tuple(evidence),
                notes=self.notes(),
                right_aligned_from=1,
            ),
        )

    def records(self) -> list[dict[str, Any]]:
        best = self.cheapest
        out = []
        for o in self.options:
            m, e = o.measured, o.evidence
            out.append(
                {
                    "model": self.model,
                    "gpu_model": m.device[0],
                    "mig_profile": m.device[1],
                    "pricing": m.device[2],
                    "tokens_per_device_s": m.tokens_per_device_s,
                    "sm_util_pct": m.sm_util_pct,
                    "busy_share": m.busy_share,
                    "prompt_tokens": round(m.prompt_tokens),
                    "completion_tokens": round(m.completion_tokens),
                    "cached_tokens": round(m.cached_tokens),
                    "target_tokens_per_s": float(self.target.tokens_per_s),
                    "devices": o.devices,
                    "price_per_device_hour_usd": o.price_per_hour_usd,
                    "monthly_cost_usd": o.monthly_cost_usd,
                    "monthly_cost_cents_usd": round_total(o.monthly_cost_usd),
                    "cost_per_1m_tokens_usd": o.cost_per_1m_tokens_usd,
                    "measured_cost_per_1m_tokens_usd": o.measured_cost_per_1m_tokens_usd,
                    "device_hours": e.device_hours,
                    "tokens": round(e.tokens),
                    "distinct_hours": e.distinct_hours,
                    "hourly_cv": e.hourly_cv,
                    "devices_per_pod_seen": m.devices_per_pod,
                    "confidence": e.grade,
                    "confidence_reason": e.reason,
                    "cheapest": o is best,
                }
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        best = self.cheapest
        return {
            "report": "plan",
            "model": self.model,
            "from": format_ms(self.period.start_ms),
            "to": format_ms(self.period.end_ms),
            "target_tokens_per_s": float(self.target.tokens_per_s),
            "growth": None if self.target.growth is None else float(self.target.growth),
            "observed_tokens_per_s": self.target.observed_tokens_per_s,
            "hours_per_month": HOURS_PER_MONTH,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "prompt_share": self.prompt_share,
            "unplaced_tokens": round(self.unplaced_tokens),
            "cheapest": None
            if best is None
            else {
                "gpu_model": best.measured.device[0],
                "mig_profile": best.measured.device[1],
                "pricing": best.measured.device[2],
            },
            "notes": list(self.notes()),
            "options": self.records(),
        }


def sig3(value: float) -> str:
    """A rate to 3 significant digits, in plain notation with thousands separators."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    places = 2 - math.floor(math.log10(abs(value)))
    return f"{round(value, places):,.{max(0, places)}f}"


def _hours_text(hours: float) -> str:
    return f"{hours:,.{3 if hours < 10 else 2 if hours < 100 else 1}f}"


def _device_text(device: DeviceType) -> str:
    gpu, mig, pricing = device
    return f"{gpu}{' ' + mig if mig else ''} ({pricing})"


def _literal(text: str) -> str:
    """A ClickHouse String expression of `text`, whatever it holds (hex: nothing to escape)."""
    return f"unhex('{text.encode('utf-8').hex()}')"


def plan(
    store: ClickHouseStore,
    period: Period,
    model: str,
    *,
    tokens_per_s: Fraction | Decimal | int | None = None,
    growth: Fraction | Decimal | int | None = None,
    price_book: PriceBook | None = None,
    use_rollups: bool = True,
) -> PlanReport:
    """What serving `model` at `tokens_per_s` (or `growth` x its observed average rate over
    `period`) takes on each device type it ran on in `period`."""
    if (tokens_per_s is None) == (growth is None):
        raise ConfigError("give exactly one of --tokens-per-s and --growth")
    for option, value in (("--tokens-per-s", tokens_per_s), ("--growth", growth)):
        if value is not None and Fraction(value) <= 0:
            raise ConfigError(f"{option} must be more than 0, not {value}")
    check_period(period)
    db = store.database
    read = read_plan(store, period.start_ms, period.end_ms, use_rollups=use_rollups)
    costs, tokens = cost_source(db, read), token_source(db, read)
    name = _literal(model)
    totals = store.query_rows(
        f"SELECT sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens), count() "
        f"FROM {tokens} WHERE model = {name}"
    )[0]
    prompt, completion, cached, found = (int(v or 0) for v in totals)
    when = f"{format_ms(period.start_ms)} to {format_ms(period.end_ms)}"
    if not found or prompt + completion == 0:
        seen = store.query_rows(
            f"SELECT model, sum(prompt_tokens + completion_tokens) AS n FROM {tokens} "
            f"GROUP BY model ORDER BY n DESC, model LIMIT {_SHOWN_MODELS + 1}"
        )
        listed = ", ".join(
            f"{excerpt(str(m))} ({int(n):,} tokens)" for m, n in seen[:_SHOWN_MODELS]
        )
        listed += ", ..." if len(seen) > _SHOWN_MODELS else ""
        what = "served no tokens" if found else "was not seen"
        raise ConfigError(
            f"model {excerpt(model)} {what} from {when}; models seen: {listed or 'none'}"
        )
    pods = f"(SELECT DISTINCT hour, pod_uid FROM {tokens} WHERE model = {name})"
    narrow = "give a shorter period"
    token_rows = query_bounded(
        store,
        f"SELECT toUnixTimestamp(hour) AS h, pod_uid, model, sum(cost_usd), sum(prompt_tokens), "
        f"sum(completion_tokens), sum(cached_tokens) FROM {tokens} "
        f"WHERE (hour, pod_uid) IN {pods} GROUP BY h, pod_uid, model ORDER BY h, pod_uid, model",
        limit=MAX_SOURCE_ROWS,
        what=f"the token rows of {excerpt(model)}'s pods (pod, model and hour)",
        narrow=narrow,
    )
    cost_rows = query_bounded(
        store,
        "SELECT toUnixTimestamp(c.hour) AS h, c.pod_uid, c.device_uuid, c.gpu_model, "
        "c.mig_profile, c.pricing, c.price_per_hour, sum(c.device_seconds), sum(c.cost_usd), "
        "sum(c.sm_pct_window_s), sum(c.window_s), any(d.metered), any(d.used) "
        f"FROM {costs} AS c INNER JOIN (SELECT hour, cluster, device_uuid, "
        "sum(device_seconds) AS metered, sumIf(device_seconds, kind != 'idle') AS used "
        f"FROM {costs} WHERE (hour, cluster, device_uuid) IN (SELECT hour, cluster, device_uuid "
        f"FROM {costs} WHERE kind = 'usage' AND (hour, pod_uid) IN {pods}) "
        "GROUP BY hour, cluster, device_uuid) AS d "
        "ON c.hour = d.hour AND c.cluster = d.cluster AND c.device_uuid = d.device_uuid "
        f"WHERE c.kind = 'usage' AND (c.hour, c.pod_uid) IN {pods} "
        "GROUP BY h, c.pod_uid, c.device_uuid, c.gpu_model, c.mig_profile, c.pricing, "
        "c.price_per_hour ORDER BY h, c.pod_uid, c.device_uuid",
        limit=MAX_SOURCE_ROWS,
        what=f"the device-hours of {excerpt(model)}'s pods",
        narrow=narrow,
    )
    rows = [
        PodDeviceHour(
            int(h) * 1000,
            str(pod),
            str(dev),
            str(gpu),
            str(mig),
            str(pricing),
            Decimal(price),
            float(used),
            Decimal(cost),
            float(sm),
            float(win),
            float(metered),
            float(busy),
        )
        for h, pod, dev, gpu, mig, pricing, price, used, cost, sm, win, metered, busy in cost_rows
    ]
    served = [
        PodModelHour(int(h) * 1000, str(pod), str(m), Decimal(c), int(p), int(o), int(k))
        for h, pod, m, c, p, o, k in token_rows
    ]
    measured, unplaced = measure(model, rows, served)
    if not measured:
        raise ConfigError(
            f"model {excerpt(model)} served {prompt + completion:,} tokens from {when}, but its "
            "pods have no metered device time then: nothing to measure throughput on"
        )
    seconds = (period.end_ms - period.start_ms) / 1000
    observed = (prompt + completion) / seconds if seconds > 0 else 0.0
    if tokens_per_s is not None:
        target = Target(Fraction(tokens_per_s), observed, None)
    else:
        assert growth is not None
        target = Target(Fraction(growth) * Fraction(observed), observed, Fraction(growth))
    prices, price_note = _prices(measured, price_book, period)
    options = plan_options(measured, target.tokens_per_s, prices)
    return PlanReport(
        period, model, target, prompt, completion, cached, unplaced, tuple(options), price_note
    )


def _prices(
    measured: Sequence[Measured], book: PriceBook | None, period: Period
) -> tuple[dict[DeviceType, Decimal], str]:
    """Each device type's rate: the latest seen, moved by the book's change (if any) between
    that hour and the period's end, so a MIG instance keeps the share of its GPU it was
    priced at."""
    if book is None:
        return {}, "USD per device-hour: the latest rate the meter applied in the period"
    out: dict[DeviceType, Decimal] = {}
    at_ms = max(period.start_ms, period.end_ms - 1)
    for m in measured:
        gpu, _, pricing = m.device
        then = book.quote(gpu, pricing, m.price_hour_ms).price_per_hour_usd
        now = book.quote(gpu, pricing, at_ms).price_per_hour_usd
        if then > 0:
            with localcontext(WIDE):
                out[m.device] = (m.price_per_hour_usd * now / then).quantize(MONEY_QUANTUM)
    return out, (
        f"USD per device-hour: the price book's rate at {format_ms(at_ms)} (a MIG instance at "
        "the share of its GPU the meter applied)"
    )

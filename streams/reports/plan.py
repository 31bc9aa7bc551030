"""Capacity planning from measured data: what serving a model at a target token rate takes on
each GPU type and MIG profile it ran on, what that costs a month and per 1M tokens, the
cheapest fit, and how much data each answer rests on. Pure: `plan_data` reads the rows.

A model's device time in an hour is its pods' metered time on each device with the device's
idle time of that hour spread over its users in proportion to their use (a device that was
held but idle was still paid for), split over the models a pod served by their cost share (as
showback by model and the chargeback do). Its tokens in a pod-hour are spread over the pod's
devices of that hour by that device time. Throughput is tokens per device-second of that time,
measured at the token mix and utilisation observed: nothing is extrapolated beyond them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, localcontext
from fractions import Fraction

from runtime.errors import ConfigError
from schemas.fields import excerpt
from streams.reports.money import WIDE, ratio

HOURS_PER_MONTH = 730  # 8,760 hours a year / 12
SECONDS_PER_HOUR = 3600
# Confidence grades of one estimate (design §6): thin below either floor, solid at or above
# every bar, fair between.
THIN_DEVICE_HOURS = 10.0
THIN_DISTINCT_HOURS = 3
SOLID_DEVICE_HOURS = 100.0
SOLID_DISTINCT_HOURS = 24
SOLID_MAX_CV = 0.25
MAX_TARGET_TOKENS_PER_S = 10**12  # a bound on input, far above any cluster
_ZERO = Decimal(0)
_MILLION = Decimal(1_000_000)
_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?")


@dataclass(frozen=True, slots=True)
class PodDeviceHour:
    """A pod's metered time on one device (at one price) in one hour, beside that device's
    totals for the hour."""

    hour_ms: int
    pod_uid: str
    device_uuid: str
    gpu_model: str
    mig_profile: str  # "" for a whole GPU
    pricing: str
    price_per_hour_usd: Decimal  # per device-hour, MIG share included
    used_s: float  # the pod's device-seconds by the share policy
    cost_usd: Decimal
    sm_pct_s: float  # the pod's SM % x seconds
    window_s: float
    device_metered_s: float  # every metered second of the device in the hour, idle included
    device_used_s: float  # the seconds its pods and host processes used


@dataclass(frozen=True, slots=True)
class PodModelHour:
    """What a pod's cost-per-token rows of one hour say about one model it served."""

    hour_ms: int
    pod_uid: str
    model: str
    cost_usd: Decimal
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


DeviceType = tuple[str, str, str]  # gpu_model, mig_profile, pricing


@dataclass(frozen=True, slots=True)
class Evidence:
    """What one estimate rests on."""

    device_hours: float
    tokens: float
    distinct_hours: int
    hourly_cv: float | None  # stdev / mean of hourly throughput; None under 2 hours
    grade: str  # thin | fair | solid
    reason: str


@dataclass(frozen=True, slots=True)
class Measured:
    """A model's measured serving on one device type over the period."""

    device: DeviceType
    price_per_hour_usd: Decimal  # the latest hour's rate
    price_hour_ms: int
    device_s: float  # held device-seconds, idle share included
    used_s: float  # by the share policy
    prompt_tokens: float
    completion_tokens: float
    cached_tokens: float
    sm_util_pct: float | None
    hourly_tokens_per_s: tuple[float, ...]
    devices_per_pod: int = 1  # the most devices of this type one pod held in one hour

    @property
    def tokens(self) -> float:
        return self.prompt_tokens + self.completion_tokens

    @property
    def tokens_per_device_s(self) -> float:
        return self.tokens / self.device_s if self.device_s > 0 else 0.0

    @property
    def busy_share(self) -> float | None:
        return self.used_s / self.device_s if self.device_s > 0 else None


@dataclass(frozen=True, slots=True)
class Option:
    """Serving the target on one device type."""

    measured: Measured
    price_per_hour_usd: Decimal  # the rate the plan uses
    devices: int
    monthly_cost_usd: Decimal
    cost_per_1m_tokens_usd: Decimal  # at the target rate, whole devices paid for
    measured_cost_per_1m_tokens_usd: Decimal | None  # a device busy at the measured rate
    evidence: Evidence


def grade(device_hours: float, distinct_hours: int, cv: float | None) -> tuple[str, str]:
    """The plain-words confidence of an estimate, and why."""
    if device_hours < THIN_DEVICE_HOURS:
        return "thin", f"thin: under {THIN_DEVICE_HOURS:g} device-hours"
    if distinct_hours < THIN_DISTINCT_HOURS:
        return "thin", f"thin: under {THIN_DISTINCT_HOURS} distinct hours"
    if device_hours < SOLID_DEVICE_HOURS:
        return "fair", f"fair: under {SOLID_DEVICE_HOURS:g} device-hours"
    if distinct_hours < SOLID_DISTINCT_HOURS:
        return "fair", f"fair: under {SOLID_DISTINCT_HOURS} distinct hours"
    if cv is None or cv > SOLID_MAX_CV:
        return "fair", f"fair: hourly throughput varies (CV over {SOLID_MAX_CV:g})"
    return "solid", (
        f"solid: {SOLID_DEVICE_HOURS:g}+ device-hours over {SOLID_DISTINCT_HOURS}+ hours, "
        f"CV at most {SOLID_MAX_CV:g}"
    )


def coefficient_of_variation(values: Sequence[float]) -> float | None:
    """Population stdev over mean; None for fewer than two values or a zero mean."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    if mean <= 0:
        return None
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) / mean


def devices_needed(target_tokens_per_s: Fraction, tokens_per_device_s: float) -> int:
    """The fewest whole devices whose measured throughput reaches the target, exactly:
    devices x throughput >= target > (devices - 1) x throughput."""
    if tokens_per_device_s <= 0:
        raise ValueError("a device type with no measured throughput serves no target")
    return max(0, math.ceil(target_tokens_per_s / Fraction(tokens_per_device_s)))


def monthly_cost(devices: int, price_per_hour_usd: Decimal) -> Decimal:
    return price_per_hour_usd * devices * HOURS_PER_MONTH


def cost_per_1m_at(monthly_cost_usd: Decimal, tokens_per_s: Fraction) -> Decimal:
    """A month's cost over a month's tokens at `tokens_per_s`, per 1M tokens."""
    with localcontext(WIDE):
        tokens = Decimal(tokens_per_s.numerator) / Decimal(tokens_per_s.denominator)
        month_tokens = tokens * HOURS_PER_MONTH * SECONDS_PER_HOUR
    found = ratio(monthly_cost_usd * _MILLION, month_tokens, 6)
    return found if found is not None else _ZERO


def _model_fractions(pod_cost: Decimal, served: Sequence[PodModelHour]) -> dict[str, Fraction]:
    """Each model's share of a pod-hour: its cost-per-token rows' cost over the pod's cost
    (scaled down when they claim more than the pod cost, after a correction), by tokens where
    the pod cost nothing."""
    asked = [max(m.cost_usd, _ZERO) for m in served]
    claimed = sum(asked, _ZERO)
    if pod_cost > 0 and claimed > 0:
        whole = max(pod_cost, claimed)
        return {m.model: Fraction(a) / Fraction(whole) for m, a in zip(served, asked, strict=True)}
    tokens = [m.prompt_tokens + m.completion_tokens for m in served]
    if sum(tokens) == 0:
        return {m.model: Fraction(1, len(served)) for m in served}
    return {m.model: Fraction(t, sum(tokens)) for m, t in zip(served, tokens, strict=True)}


class _Acc:
    __slots__ = (
        "cached",
        "completion",
        "device_s",
        "hours",
        "per_pod",
        "price",
        "prompt",
        "sm",
        "used_s",
    )

    def __init__(self) -> None:
        self.device_s = self.used_s = self.prompt = self.completion = self.cached = 0.0
        self.sm = [0.0, 0.0]
        self.hours: dict[int, list[float]] = {}
        self.price: tuple[int, Decimal] = (-1, _ZERO)
        self.per_pod = 1


def measure(
    model: str, rows: Iterable[PodDeviceHour], tokens: Iterable[PodModelHour]
) -> tuple[list[Measured], float]:
    """The model's measured serving per device type, costliest first by device time, and the
    tokens it served in pod-hours with no metered device time (counted nowhere else)."""
    by_pod_hour: dict[tuple[int, str], list[PodDeviceHour]] = {}
    for row in rows:
        by_pod_hour.setdefault((row.hour_ms, row.pod_uid), []).append(row)
    served: dict[tuple[int, str], list[PodModelHour]] = {}
    for t in tokens:
        served.setdefault((t.hour_ms, t.pod_uid), []).append(t)
    acc: dict[DeviceType, _Acc] = {}
    unplaced = 0.0
    for key in sorted(served):
        mine = [t for t in served[key] if t.model == model]
        if not mine:
            continue
        own = mine[0]
        parts = by_pod_hour.get(key, [])
        held = [
            p.used_s * p.device_metered_s / p.device_used_s if p.device_used_s > 0 else p.used_s
            for p in parts
        ]
        held_total = sum(held)
        if not parts or held_total <= 0:
            unplaced += own.prompt_tokens + own.completion_tokens
            continue
        pod_cost = sum((p.cost_usd for p in parts), _ZERO)
        share = float(_model_fractions(pod_cost, served[key])[model])
        per_type: dict[DeviceType, set[str]] = {}
        for part in parts:
            per_type.setdefault((part.gpu_model, part.mig_profile, part.pricing), set()).add(
                part.device_uuid
            )
        for device, uuids in per_type.items():
            a = acc.setdefault(device, _Acc())
            a.per_pod = max(a.per_pod, len(uuids))
        for part, part_held in zip(parts, held, strict=True):
            spread = part_held / held_total
            device = (part.gpu_model, part.mig_profile, part.pricing)
            a = acc.setdefault(device, _Acc())
            secs = part_held * share
            a.device_s += secs
            a.used_s += part.used_s * share
            a.prompt += own.prompt_tokens * spread
            a.completion += own.completion_tokens * spread
            a.cached += own.cached_tokens * spread
            a.sm[0] += part.sm_pct_s * share
            a.sm[1] += part.window_s * share
            hour = a.hours.setdefault(part.hour_ms, [0.0, 0.0])
            hour[0] += (own.prompt_tokens + own.completion_tokens) * spread
            hour[1] += secs
            if part.hour_ms > a.price[0] or (
                part.hour_ms == a.price[0] and part.price_per_hour_usd > a.price[1]
            ):
                a.price = (part.hour_ms, part.price_per_hour_usd)
    out = [
        Measured(
            device=device,
            price_per_hour_usd=a.price[1],
            price_hour_ms=a.price[0],
            device_s=a.device_s,
            used_s=a.used_s,
            prompt_tokens=a.prompt,
            completion_tokens=a.completion,
            cached_tokens=a.cached,
            sm_util_pct=a.sm[0] / a.sm[1] if a.sm[1] > 0 else None,
            hourly_tokens_per_s=tuple(
                tok / secs for _, (tok, secs) in sorted(a.hours.items()) if secs > 0
            ),
            devices_per_pod=a.per_pod,
        )
        for device, a in acc.items()
        if a.device_s > 0
    ]
    out.sort(key=lambda m: (-m.device_s, m.device))
    return out, unplaced


def option(
    measured: Measured, target_tokens_per_s: Fraction, price_per_hour_usd: Decimal
) -> Option | None:
    """Serving the target on `measured`'s device type; None where it served no tokens."""
    throughput = measured.tokens_per_device_s
    if throughput <= 0:
        return None
    devices = devices_needed(target_tokens_per_s, throughput)
    month = monthly_cost(devices, price_per_hour_usd)
    cv = coefficient_of_variation(measured.hourly_tokens_per_s)
    hours = len(measured.hourly_tokens_per_s)
    device_hours = measured.device_s / SECONDS_PER_HOUR
    level, reason = grade(device_hours, hours, cv)
    return Option(
        measured=measured,
        price_per_hour_usd=price_per_hour_usd,
        devices=devices,
        monthly_cost_usd=month,
        cost_per_1m_tokens_usd=cost_per_1m_at(month, target_tokens_per_s),
        measured_cost_per_1m_tokens_usd=ratio(
            price_per_hour_usd * _MILLION, Decimal(repr(throughput * SECONDS_PER_HOUR)), 6
        ),
        evidence=Evidence(device_hours, measured.tokens, hours, cv, level, reason),
    )


def cheapest(options: Sequence[Option]) -> Option | None:
    """The lowest monthly cost; ties: fewer devices, then the device type's name."""
    if not options:
        return None
    return min(options, key=lambda o: (o.monthly_cost_usd, o.devices, o.measured.device))


def plan_options(
    measured: Sequence[Measured],
    target_tokens_per_s: Fraction,
    prices: Mapping[DeviceType, Decimal] | None = None,
) -> list[Option]:
    """An option per device type (at `prices` where given, else the latest rate seen), the
    cheapest first."""
    found = []
    for m in measured:
        price = (prices or {}).get(m.device, m.price_per_hour_usd)
        made = option(m, target_tokens_per_s, price)
        if made is not None:
            found.append(made)
    found.sort(key=lambda o: (o.monthly_cost_usd, o.devices, o.measured.device))
    return found


def parse_tokens_per_s(text: str) -> Fraction:
    """--tokens-per-s: a positive decimal number of tokens a second (prompt + completion)."""
    value = text.strip()
    if not _NUMBER.fullmatch(value) or Fraction(value) <= 0:
        raise ConfigError(f"--tokens-per-s {excerpt(text)} is not a positive number like 2500")
    if Fraction(value) > MAX_TARGET_TOKENS_PER_S:
        raise ConfigError(f"--tokens-per-s is at most {MAX_TARGET_TOKENS_PER_S:,}")
    return Fraction(value)


def parse_growth(text: str) -> Fraction:
    """--growth: a factor of the observed rate, as `3x`, `3` or `300%` (all the same)."""
    value = text.strip().lower()
    scale = Fraction(1)
    if value.endswith("%"):
        value, scale = value[:-1].strip(), Fraction(1, 100)
    elif value.endswith("x"):
        value = value[:-1].strip()
    if not _NUMBER.fullmatch(value) or Fraction(value) <= 0:
        raise ConfigError(f"--growth {excerpt(text)} is not a positive factor like 3x, 3 or 300%")
    factor = Fraction(value) * scale
    if factor > 10**6:
        raise ConfigError("--growth is at most 1000000x")
    return factor

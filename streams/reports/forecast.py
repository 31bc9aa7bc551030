"""Month-end spend forecast of one owner, pure: the month so far (exact Decimal) plus a forecast
of the rest with 80 % and 95 % prediction intervals, the method named with its parameters.

The model is fitted to daily totals (a month-end total is a sum of days, the weekly cycle lives
in them, and 30 points fit in milliseconds where 720 hours do not); the daily cycle shapes only
the rest of the current day, which follows an hour-of-day profile. Method and thresholds were
chosen by tests/benchmarks/bench_forecast.py (docs/benchmarks.md)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from importlib.metadata import version

import numpy as np

MIN_DAYS = 3  # complete days below which the run rate is used: no model fits two points
SEASONAL_DAYS = 14  # two weekly cycles: below it the model has no weekly season
SIMULATIONS = 2000  # sample paths behind the intervals
SEED = 20261101  # fixed: the same input gives the same intervals
HOURS_PER_DAY = 24
_Z80, _Z95 = 1.2815515655446004, 1.959963984540054  # normal quantiles 0.90 and 0.975
_MICRO = Decimal("0.000001")
_ZERO = Decimal(0)
_SHORT = {
    "smoothing_level": "alpha",
    "smoothing_trend": "beta",
    "smoothing_seasonal": "gamma",
}

ETS_SEASONAL = "ets_seasonal"
ETS_TREND = "ets_trend"
RUN_RATE = "run_rate"
COMPLETE = "complete"


@dataclass(frozen=True, slots=True)
class MonthForecast:
    """Forecast of one owner's month-end total. Amounts in USD; the month to date is exact, the
    rest and the bounds are rounded to 1e-6."""

    month_to_date_usd: Decimal
    rest_usd: Decimal
    low80_usd: Decimal
    high80_usd: Decimal
    low95_usd: Decimal
    high95_usd: Decimal
    method: str  # ets_seasonal | ets_trend | run_rate | complete
    method_text: str  # the method and its fitted parameters, for a person
    days_of_history: int  # complete days the method saw
    fallback: str | None = None  # why a simpler method was used, when one was

    @property
    def total_usd(self) -> Decimal:
        return self.month_to_date_usd + self.rest_usd


def forecast_hourly(
    hourly_usd: Sequence[Decimal], *, elapsed_hours: float, month_hours: int
) -> MonthForecast:
    """From the owner's hourly spend since the start of the month (hour 0 first; a missing hour
    is 0; the last one may be partial when `elapsed_hours` is not whole). The rest of the
    current day follows the owner's own hour-of-day profile."""
    days = int(elapsed_hours // HOURS_PER_DAY)
    daily = [sum(hourly_usd[d * 24 : d * 24 + 24], _ZERO) for d in range(days)]
    today = sum(hourly_usd[days * 24 :], _ZERO)
    recent = [
        float(sum(hourly_usd[d * 24 + h] for d in range(max(0, days - 7), days)))
        for h in range(HOURS_PER_DAY)
    ]
    return forecast_month_end(
        daily,
        today,
        hours_into_today=elapsed_hours - days * HOURS_PER_DAY,
        days_in_month=month_hours // HOURS_PER_DAY,
        day_profile=recent if days else None,
    )


def forecast_month_end(
    daily_usd: Sequence[Decimal],
    today_usd: Decimal,
    *,
    hours_into_today: float,
    days_in_month: int,
    day_profile: Sequence[float] | None = None,
    metered_from_hours: float = 0.0,
) -> MonthForecast:
    """From the totals of the month's complete days, the spend of the current day so far
    (`hours_into_today` hours of it, 0 <= h < 24) and an hour-of-day profile (24 weights of the
    spend per hour of the day; None: flat) that says how much of a day is still to come.

    `metered_from_hours`: hours into the month at which metering began (a ledger installed
    mid-month, a cluster started then). The time before it is not history: the model sees only
    the complete days after it, and the run rate is spend per hour metered."""
    mtd = sum(daily_usd, _ZERO) + today_usd
    days = len(daily_usd)
    if days >= days_in_month:
        return MonthForecast(mtd, _ZERO, mtd, mtd, mtd, mtd, COMPLETE, "the month is over", days)
    left_today = 1.0 - _share_before(day_profile, hours_into_today)
    whole_days_left = days_in_month - days - 1
    elapsed_h = days * HOURS_PER_DAY + hours_into_today
    metered_from_h = min(max(0.0, metered_from_hours), elapsed_h)
    history = list(daily_usd[math.ceil(metered_from_h / HOURS_PER_DAY) :])
    if len(history) < MIN_DAYS:
        metered_h = elapsed_h - metered_from_h
        return _run_rate(history, metered_h, days_in_month - elapsed_h / HOURS_PER_DAY, mtd)
    days = len(history)
    y = np.array([float(d) for d in history])
    steps = whole_days_left + 1
    weights = np.array([left_today] + [1.0] * whole_days_left)
    seasonal = days >= SEASONAL_DAYS
    point, paths, text = _ets(y, steps, seasonal=seasonal)
    rest = max(0.0, float(point @ weights))
    totals = np.clip(paths, 0.0, None).T @ weights
    low95, low80, high80, high95 = np.percentile(totals, [2.5, 10.0, 90.0, 97.5])
    return MonthForecast(
        month_to_date_usd=mtd,
        rest_usd=_usd(rest),
        low80_usd=mtd + _usd(min(low80, rest)),
        high80_usd=mtd + _usd(max(high80, rest)),
        low95_usd=mtd + _usd(min(low95, rest)),
        high95_usd=mtd + _usd(max(high95, rest)),
        method=ETS_SEASONAL if seasonal else ETS_TREND,
        method_text=f"{text} on {days} daily totals; rest of today {left_today:.0%} of a day "
        f"by the hour-of-day profile; intervals of {SIMULATIONS:,} simulated paths",
        days_of_history=days,
        fallback=None
        if seasonal
        else f"fewer than {SEASONAL_DAYS} complete days: no weekly season fitted",
    )


# The trends ETS may choose from, by AICc per series (AutoETS' rule): tests/benchmarks/
# bench_forecast.py measured a fixed additive trend worse than the run rate (it reads a step
# change or a weekend as a slope) and the choice by AICc best of the trend-keeping candidates.
TRENDS: tuple[tuple[str, str | None, bool], ...] = (
    ("no trend", None, False),
    ("additive trend", "add", False),
    ("damped trend", "add", True),
)


def _ets(y: np.ndarray, steps: int, *, seasonal: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """statsmodels ETS with additive errors, the trend (none, additive or damped) of the lowest
    AICc, and a weekly additive season from two weeks on: the point forecast of `steps` days,
    simulated paths (steps x n) and the fitted model as text. Deterministic: the optimiser
    starts from the same values and the paths are drawn from a fixed seed."""
    from statsmodels.tools.sm_exceptions import ConvergenceWarning
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    scale = float(np.abs(y).mean()) or 1.0  # fit in units of the mean day: conditioned
    with warnings.catch_warnings():
        # A flat or short series leaves the optimiser at a bound; the fit is still usable.
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        fits = [
            (
                ETSModel(
                    y / scale,
                    error="add",
                    trend=trend,
                    damped_trend=damped,
                    seasonal="add" if seasonal else None,
                    seasonal_periods=7 if seasonal else None,
                ).fit(disp=False),
                name,
                trend,
                damped,
            )
            for name, trend, damped in TRENDS
        ]
        finite = [f for f in fits if math.isfinite(float(f[0].aicc))] or fits
        fit, name, trend, damped = min(finite, key=lambda f: float(f[0].aicc))
        point = np.asarray(fit.forecast(steps)) * scale
        paths = (
            np.asarray(
                fit.simulate(
                    steps,
                    anchor="end",
                    repetitions=SIMULATIONS,
                    rng=np.random.default_rng(SEED),
                )
            ).reshape(steps, SIMULATIONS)
            * scale
        )
    named = dict(zip(fit.model.param_names, np.asarray(fit.params), strict=True))
    shown = " ".join(f"{_SHORT[p]}={named[p]:.3g}" for p in _SHORT if p in named)
    if damped and "damping_trend" in named:
        shown += f" phi={named['damping_trend']:.3g}"
    letter = "N" if trend is None else ("Ad" if damped else "A")
    kind = f"ETS(A,{letter},{'A' if seasonal else 'N'}){' weekly season' if seasonal else ''}"
    return (
        point,
        paths,
        f"{kind}, {name} by AICc, statsmodels {version('statsmodels')}: {shown}, "
        f"sigma={math.sqrt(float(fit.mse)) * scale:.4g}/day",
    )


def _run_rate(
    history_usd: Sequence[Decimal], metered_h: float, left_days: float, mtd: Decimal
) -> MonthForecast:
    """Fewer than MIN_DAYS complete days metered: the month so far per hour metered times the
    hours left. The interval treats days as independent draws around an estimated mean (a
    prediction interval for a sum of future days: var = D s^2 + D^2 s^2 / n), with s the spread
    of the complete days seen, or, when fewer than two are, that of a day varying by half its
    level."""
    days = len(history_usd)
    if metered_h <= 0:
        text = "no spend seen yet this month: nothing to extrapolate"
        return MonthForecast(mtd, _ZERO, mtd, mtd, mtd, mtd, RUN_RATE, text, 0, text)
    per_day = float(mtd) / metered_h * HOURS_PER_DAY
    rest = per_day * left_days
    if days >= 2:
        spread = float(np.std([float(d) for d in history_usd], ddof=1))
        n = float(days)
    else:
        # One day or less: the day's level is all there is; the spread of a day is unknown, so
        # the interval is that of a day's spend varying by half its level.
        spread, n = per_day * 0.5, max(metered_h / HOURS_PER_DAY, 1 / HOURS_PER_DAY)
    sd = math.sqrt(left_days * spread**2 + left_days**2 * spread**2 / n)
    reason = f"fewer than {MIN_DAYS} complete days of history"
    return MonthForecast(
        month_to_date_usd=mtd,
        rest_usd=_usd(rest),
        low80_usd=mtd + _usd(max(0.0, rest - _Z80 * sd)),
        high80_usd=mtd + _usd(rest + _Z80 * sd),
        low95_usd=mtd + _usd(max(0.0, rest - _Z95 * sd)),
        high95_usd=mtd + _usd(rest + _Z95 * sd),
        method=RUN_RATE,
        method_text=f"run rate: {per_day:,.2f} USD/day over {metered_h:.4g} h metered x "
        f"{left_days:.2f} days left; normal interval, sd {sd:,.2f}",
        days_of_history=days,
        fallback=reason,
    )


def _share_before(profile: Sequence[float] | None, hours: float) -> float:
    """The share of a day's spend in its first `hours` hours by the profile (flat when none or
    empty)."""
    if hours <= 0:
        return 0.0
    weights = list(profile) if profile and sum(profile) > 0 else [1.0] * HOURS_PER_DAY
    whole = int(hours)
    done = sum(weights[:whole]) + (weights[whole] * (hours - whole) if whole < 24 else 0.0)
    return min(1.0, done / sum(weights))


def _usd(value: float) -> Decimal:
    return Decimal(repr(float(value))).quantize(_MICRO)

"""Backtest of month-end spend forecasts on generated hourly histories with a known trend, a
daily and a weekly cycle, noise and a step change (a team adding GPUs mid-month).

For each series and each forecast origin (midnight of day 7..27 of a 30-day month) every
candidate forecasts the month-end total; reported per candidate: mean absolute error as a share
of the actual total (MAPE), the share of cases whose 80 % / 95 % interval covers the actual, and
time per forecast. Candidates: the naive run rate, the last 7 days' run rate, seasonal naive
(last week repeated), statsmodels ETS as shipped (streams/reports/forecast.py), the same ETS
with a damped trend, with no trend and with the trend chosen by AICc, and, when installed,
statsforecast AutoETS.
Run: .venv/bin/python tests/benchmarks/bench_forecast.py [--series 40] [--origin-step-days 1]
[--only NAME-PART]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable
from decimal import Decimal

import numpy as np

from streams.reports.forecast import SEASONAL_DAYS, SEED, SIMULATIONS, forecast_hourly

MONTH_H = 720
Forecast = tuple[float, float, float, float, float]  # point, lo80, hi80, lo95, hi95


def history(rng: np.random.Generator) -> np.ndarray:
    """One owner's hourly spend of a 30-day month starting on a Sunday (2026-11-01)."""
    h = np.arange(MONTH_H)
    level = rng.uniform(20, 200)
    trend = level * rng.uniform(-0.3, 0.8) / MONTH_H  # -30 %..+80 % over the month
    daily = 0.35 * np.sin(2 * np.pi * (h % 24 - 8) / 24)  # busy afternoons
    weekday = (h // 24) % 7  # 0 = Sunday
    weekly = np.where((weekday == 0) | (weekday == 6), -0.3, 0.05)
    step = np.zeros(MONTH_H)
    if rng.random() < 0.7:
        at = rng.integers(5 * 24, 22 * 24)
        step[at:] = level * rng.uniform(0.2, 0.8)
    base = (level + trend * h) * (1 + daily + weekly) + step
    return np.clip(base * (1 + rng.normal(0, 0.08, MONTH_H)), 0, None)


def run_rate(y: np.ndarray) -> Forecast:
    mtd = y.sum()
    point = mtd / len(y) * MONTH_H
    return point, point, point, point, point


def last_week_rate(y: np.ndarray) -> Forecast:
    """The month so far plus the last 7 days' mean day for each day left: a run rate that
    follows a step change within a week."""
    left = MONTH_H - len(y)
    point = y.sum() + y[-168:].mean() * left
    return point, point, point, point, point


def seasonal_naive(y: np.ndarray) -> Forecast:
    left = MONTH_H - len(y)
    week = y[-168:]
    rest = np.tile(week, left // 168 + 1)[:left].sum()
    point = y.sum() + rest
    return point, point, point, point, point


def shipped(y: np.ndarray) -> Forecast:
    f = forecast_hourly(
        [Decimal(repr(float(v))) for v in y], elapsed_hours=len(y), month_hours=MONTH_H
    )
    return (
        float(f.total_usd),
        float(f.low80_usd),
        float(f.high80_usd),
        float(f.low95_usd),
        float(f.high95_usd),
    )


TRENDS = {"none": (None, False), "additive": ("add", False), "damped": ("add", True)}


def statsmodels_ets(*trends: str) -> Callable[[np.ndarray], Forecast]:
    """ETS on daily totals as shipped (additive error, weekly season from SEASONAL_DAYS, units of
    the mean day, SIMULATIONS paths from SEED clipped at zero) with another trend (a name of
    TRENDS); given several, each is fitted and the lowest AICc kept, as AutoETS chooses. Origins
    are at midnight: the days left are whole."""
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    def fn(y: np.ndarray) -> Forecast:
        daily = y.reshape(-1, 24).sum(axis=1)
        steps = (MONTH_H - len(y)) // 24
        scale = float(np.abs(daily).mean()) or 1.0
        seasonal = len(daily) >= SEASONAL_DAYS
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits = [
                ETSModel(
                    daily / scale,
                    error="add",
                    trend=TRENDS[name][0],
                    damped_trend=TRENDS[name][1],
                    seasonal="add" if seasonal else None,
                    seasonal_periods=7 if seasonal else None,
                ).fit(disp=False)
                for name in trends
            ]
            fit = min(fits, key=lambda f: float(f.aicc))
            rest = max(0.0, float(np.asarray(fit.forecast(steps)).sum()) * scale)
            paths = np.asarray(
                fit.simulate(
                    steps, anchor="end", repetitions=SIMULATIONS, rng=np.random.default_rng(SEED)
                )
            ).reshape(steps, SIMULATIONS)
        totals = np.clip(paths * scale, 0.0, None).sum(axis=0)
        lo95, lo80, hi80, hi95 = np.percentile(totals, [2.5, 10.0, 90.0, 97.5])
        mtd = y.sum()
        return (
            mtd + rest,
            mtd + min(lo80, rest),
            mtd + max(hi80, rest),
            mtd + min(lo95, rest),
            mtd + max(hi95, rest),
        )

    return fn


def statsforecast_autoets(y: np.ndarray) -> Forecast:
    """AutoETS on daily totals, weekly season; the total's interval from the per-day ones
    summed (errors of one path are strongly correlated: an upper bound on the width)."""
    from statsforecast.models import AutoETS  # type: ignore[import-not-found]

    daily = y.reshape(-1, 24).sum(axis=1)
    steps = (MONTH_H - len(y)) // 24
    out = AutoETS(season_length=7).forecast(daily, h=steps, level=[80, 95])
    point = y.sum() + out["mean"].sum()
    half80 = (out["hi-80"] - out["mean"]).sum()
    half95 = (out["hi-95"] - out["mean"]).sum()
    return point, point - half80, point + half80, point - half95, point + half95


def _share(covered: np.ndarray, interval: bool) -> str:
    return f"{100 * covered.mean():.0f} %" if interval and covered.size else "-"


def _mape(errors: np.ndarray) -> str:
    return f"{100 * errors.mean():.2f} %" if errors.size else "-"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--series", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--origin-step-days", type=int, default=1)
    parser.add_argument("--only", help="run only the candidates whose name contains this")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    series = [history(rng) for _ in range(args.series)]
    candidates: dict[str, Callable[[np.ndarray], Forecast]] = {
        "run rate (naive)": run_rate,
        "last week's run rate": last_week_rate,
        "seasonal naive (last week)": seasonal_naive,
        "statsmodels ETS (shipped)": shipped,
        "statsmodels ETS, damped trend": statsmodels_ets("damped"),
        "statsmodels ETS, no trend": statsmodels_ets("none"),
        "statsmodels ETS, trend by AICc (none, additive, damped)": statsmodels_ets(
            "none", "additive", "damped"
        ),
    }
    try:
        import statsforecast  # type: ignore[import-not-found]

        candidates[f"statsforecast {statsforecast.__version__} AutoETS"] = statsforecast_autoets
    except ImportError:
        pass
    if args.only:
        candidates = {k: v for k, v in candidates.items() if args.only in k}
    shipped(series[0][: 7 * 24])  # imports and first-call costs out of the timing
    origins = range(7, 28, args.origin_step_days)
    print(
        f"{len(series)} series x {len(origins)} origins (day 7..27, every "
        f"{args.origin_step_days}), 30-day month; MAPE and coverage over all origins, then "
        f"before / from day {SEASONAL_DAYS}"
    )
    print(
        "| candidate | MAPE | worst APE | 80 % covers | 95 % covers | "
        f"MAPE < day {SEASONAL_DAYS} | MAPE >= day {SEASONAL_DAYS} | "
        f"95 % covers >= day {SEASONAL_DAYS} | fit ms / series |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, fn in candidates.items():
        errors: list[float] = []
        late: list[bool] = []
        in80: list[bool] = []
        in95: list[bool] = []
        seconds, interval = 0.0, False
        for y in series:
            actual = y.sum()
            for day in origins:
                t = time.perf_counter()
                point, lo80, hi80, lo95, hi95 = fn(y[: day * 24])
                seconds += time.perf_counter() - t
                errors.append(abs(point - actual) / actual)
                late.append(day >= SEASONAL_DAYS)
                in80.append(bool(lo80 <= actual <= hi80))
                in95.append(bool(lo95 <= actual <= hi95))
                interval = interval or lo95 != hi95 or name.startswith("statsmodels")
        err, is_late = np.array(errors), np.array(late)
        cov80, cov95 = np.array(in80), np.array(in95)

        print(
            f"| {name} | {_mape(err)} | {100 * err.max():.1f} % | {_share(cov80, interval)} | "
            f"{_share(cov95, interval)} | {_mape(err[~is_late])} | {_mape(err[is_late])} | "
            f"{_share(cov95[is_late], interval)} | {1000 * seconds / len(errors):.1f} |"
        )
        assert not math.isnan(float(err.mean()))


if __name__ == "__main__":
    main()

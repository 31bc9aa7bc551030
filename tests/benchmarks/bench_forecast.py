"""Backtest of month-end spend forecasts on generated hourly histories with a known trend, a
daily and a weekly cycle, noise and a step change (a team adding GPUs mid-month).

For each series and each forecast origin (midnight of day 7..27 of a 30-day month) every
candidate forecasts the month-end total; reported per candidate: mean absolute error as a share
of the actual total (MAPE), the share of cases whose 80 % / 95 % interval covers the actual, and
fit time per series. Candidates: the naive run rate and seasonal naive (last week repeated),
statsmodels ETS as shipped (streams/reports/forecast.py) and, when installed, statsforecast
AutoETS. Run: .venv/bin/python tests/benchmarks/bench_forecast.py [--series 40]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from decimal import Decimal

import numpy as np

from streams.reports.forecast import forecast_hourly

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--series", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--origin-step-days", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    series = [history(rng) for _ in range(args.series)]
    candidates: dict[str, Callable[[np.ndarray], Forecast]] = {
        "run rate (naive)": run_rate,
        "seasonal naive (last week)": seasonal_naive,
        "statsmodels ETS (shipped)": shipped,
    }
    try:
        import statsforecast  # type: ignore[import-not-found]

        candidates[f"statsforecast {statsforecast.__version__} AutoETS"] = statsforecast_autoets
    except ImportError:
        pass
    shipped(series[0][: 7 * 24])  # imports and first-call costs out of the timing
    origins = range(7, 28, args.origin_step_days)
    print(
        f"{len(series)} series x {len(origins)} origins (day 7..27, every "
        f"{args.origin_step_days}), 30-day month"
    )
    print("| candidate | MAPE | worst APE | 80 % covers | 95 % covers | fit ms / series |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, fn in candidates.items():
        errors, in80, in95, seconds = [], 0, 0, 0.0
        for y in series:
            actual = y.sum()
            for day in origins:
                t = time.perf_counter()
                point, lo80, hi80, lo95, hi95 = fn(y[: day * 24])
                seconds += time.perf_counter() - t
                errors.append(abs(point - actual) / actual)
                in80 += lo80 <= actual <= hi80
                in95 += lo95 <= actual <= hi95
        n = len(errors)
        interval = lo80 != hi80 or name.startswith("statsmodels")
        print(
            f"| {name} | {100 * np.mean(errors):.2f} % | {100 * max(errors):.1f} % | "
            f"{f'{100 * in80 / n:.0f} %' if interval else '-'} | "
            f"{f'{100 * in95 / n:.0f} %' if interval else '-'} | {1000 * seconds / n:.1f} |"
        )
    assert not math.isnan(float(np.mean(errors)))


if __name__ == "__main__":
    main()

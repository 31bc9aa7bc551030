"""The HTML report's month-end forecast chart: the fleet's spend this month to date, a bar a day
(cumulative), and the forecast path to month end with its 80 % and 95 % bands. Pure: the path
comes from the forecast core (one forecast per day left, each to the end of that day), the chart
is SVG text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from html import escape

from streams.reports.charts import PALETTE, PLOT_MARGIN, PLOT_TOP, chart_axes
from streams.reports.forecast import HOURS_PER_DAY, forecast_month_end
from streams.reports.params import DAY_MS, Period, format_ms

_ZERO = Decimal(0)
_LABEL_EVERY_DAYS = 5


@dataclass(frozen=True, slots=True)
class PathPoint:
    """The forecast of the month's spend from its start to the end of day `day` (1 = the 1st)."""

    day: int
    point_usd: Decimal
    low80_usd: Decimal
    high80_usd: Decimal
    low95_usd: Decimal
    high95_usd: Decimal


@dataclass(frozen=True, slots=True)
class MonthPath:
    """What the chart draws: the month, when the month so far ends, the spend of each day to
    date (today's, partial, last) and the path from there to month end (empty once it is over)."""

    month: Period
    as_of_ms: int
    daily_usd: tuple[Decimal, ...]
    path: tuple[PathPoint, ...]


def forecast_path(
    hourly_usd: Sequence[Decimal],
    *,
    elapsed_hours: float,
    days_in_month: int,
    metered_from_hours: float = 0.0,
) -> tuple[PathPoint, ...]:
    """The cumulative forecast at the end of each day left, from hourly spend since the month
    began (hour 0 first, the last hour partial when `elapsed_hours` is not whole). Each point is
    `forecast_month_end` for a month that ends with that day: the same history, fit and seed,
    so the last point is the month-end forecast itself and every band is that of the spend to
    that day (not the month-end band drawn in a straight line)."""
    days = int(elapsed_hours // HOURS_PER_DAY)
    if days >= days_in_month:
        return ()
    daily = [sum(hourly_usd[d * 24 : d * 24 + 24], _ZERO) for d in range(days)]
    today = sum(hourly_usd[days * 24 :], _ZERO)
    # The same hour-of-day profile as the forecast report's: the last 7 complete days.
    profile = [
        float(sum(hourly_usd[d * 24 + h] for d in range(max(0, days - 7), days)))
        for h in range(HOURS_PER_DAY)
    ]
    points = []
    for day in range(days + 1, days_in_month + 1):
        f = forecast_month_end(
            daily,
            today,
            hours_into_today=elapsed_hours - days * HOURS_PER_DAY,
            days_in_month=day,
            day_profile=profile if days else None,
            metered_from_hours=metered_from_hours,
        )
        points.append(
            PathPoint(day, f.total_usd, f.low80_usd, f.high80_usd, f.low95_usd, f.high95_usd)
        )
    return tuple(points)


def forecast_chart(data: MonthPath, width: int = 880, height: int = 260) -> str:
    """Bars: the spend from the month's start to the end of each day to date (a day's own spend
    in its tooltip). From the month so far to month end: the forecast line in the 80 % band in
    the 95 % band. A legend with the month-end figures follows the SVG."""
    if not any(data.daily_usd):
        return '<p class="empty">No GPU cost this month yet.</p>'
    n_days = (data.month.end_ms - data.month.start_ms) // DAY_MS
    left, plot_h = 60, height - PLOT_MARGIN
    slot = (width - left - 10) / n_days
    cumulative, running = [], _ZERO
    for usd in data.daily_usd:
        running += usd
        cumulative.append(running)
    peak = max([float(running)] + [float(p.high95_usd) for p in data.path])
    parts, top = chart_axes(
        "chart-forecast",
        "GPU spend this month to date and forecast to month end",
        "USD since the month began",
        peak,
        width,
        height,
        left,
    )

    def y_of(usd: Decimal) -> float:
        return PLOT_TOP + plot_h * (1 - float(usd) / top)

    as_of_day = (data.as_of_ms - data.month.start_ms) / DAY_MS
    for i, (usd, cum) in enumerate(zip(data.daily_usd, cumulative, strict=True)):
        date = format_ms(data.month.start_ms + i * DAY_MS)[:10]
        so_far = " (so far)" if i + 1 > as_of_day else ""
        tip = f"{date}{so_far}: {usd:,.2f} USD that day, {cum:,.2f} USD to date"
        parts.append(
            f'<rect class="bar" x="{left + i * slot + slot * 0.1:.1f}" y="{y_of(cum):.1f}" '
            f'width="{max(1.0, slot * 0.8):.1f}" height="{PLOT_TOP + plot_h - y_of(cum):.1f}" '
            f'fill="{PALETTE[0]}"><title>{escape(tip)}</title></rect>'
        )
    if data.path:
        x0 = left + as_of_day * slot
        xs = [x0] + [left + p.day * slot for p in data.path]

        def line(values: list[Decimal]) -> list[str]:
            return [f"{x:.1f},{y_of(v):.1f}" for x, v in zip(xs, values, strict=True)]

        def band(css: str, low: list[Decimal], high: list[Decimal], opacity: str) -> str:
            points = " ".join(line([running, *high]) + line([running, *low])[::-1])
            return (
                f'<polygon class="{css}" points="{points}" fill="{PALETTE[1]}" '
                f'fill-opacity="{opacity}" stroke="none"/>'
            )

        p = data.path
        parts.append(
            band("band95", [q.low95_usd for q in p], [q.high95_usd for q in p], "0.15")
            + band("band80", [q.low80_usd for q in p], [q.high80_usd for q in p], "0.3")
            + f'<polyline class="forecast-line" points="'
            f'{" ".join(line([running, *[q.point_usd for q in p]]))}" fill="none" '
            f'stroke="{PALETTE[1]}" stroke-width="2" stroke-dasharray="5,3"/>'
        )
    for i in range(0, n_days, _LABEL_EVERY_DAYS):
        x = left + i * slot
        parts.append(
            f'<line x1="{x:.1f}" y1="{PLOT_TOP + plot_h}" x2="{x:.1f}" '
            f'y2="{PLOT_TOP + plot_h + 4}" class="tick"/><text x="{x:.1f}" y="{height - 8}" '
            f'class="axis">{format_ms(data.month.start_ms + i * DAY_MS)[5:10]}</text>'
        )
    parts.append("</svg>")
    return "".join(parts) + _legend(data, running)


def _legend(data: MonthPath, month_to_date_usd: Decimal) -> str:
    keys = [(PALETTE[0], "1", f"spend to date: {month_to_date_usd:,.2f} USD")]
    if data.path:
        end = data.path[-1]
        keys += [
            (PALETTE[1], "1", f"forecast at month end: {end.point_usd:,.2f} USD"),
            (
                PALETTE[1],
                "0.45",
                f"80 % interval {end.low80_usd:,.2f}-{end.high80_usd:,.2f}",
            ),
            (
                PALETTE[1],
                "0.15",
                f"95 % interval {end.low95_usd:,.2f}-{end.high95_usd:,.2f}",
            ),
        ]
    spans = "".join(
        f'<span class="key"><i style="background:{colour};opacity:{opacity}"></i>'
        f"{escape(text)}</span>"
        for colour, opacity, text in keys
    )
    return f'<div class="legend">{spans}</div>'

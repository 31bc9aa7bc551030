"""Inline SVG charts of the HTML report, and the time buckets they use (chosen from the
period's length so short and long periods both show a useful number of bars). Pure: data in,
SVG text out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from html import escape

from streams.reports.limits import MAX_CHART_BUCKETS
from streams.reports.params import Period, format_ms
from streams.reports.render import display
from streams.reports.showback import ShowbackReport, gpu_hours_places
from streams.reports.tags import TagsReport
from streams.reports.unit_economics import UnitEconomicsReport

PALETTE = (
    "#3367d6",
    "#e8710a",
    "#1e8e3e",
    "#9334e6",
    "#d01884",
    "#12b5cb",
    "#f9ab00",
    "#5f6368",
    "#7cb342",
    "#c5221f",
)
IDLE_COLOUR = "#bdc1c6"
CHART_TEAMS = len(PALETTE) - 1  # teams drawn on their own; the rest are one series
OTHER_TEAMS = "__other_teams__"
_MINUTE_S, HOUR_S, _DAY_S, _WEEK_S = 60, 3600, 86_400, 604_800
_MONDAY_S = 4 * _DAY_S  # 1970-01-01 was a Thursday; weeks start on Mondays
# Label spacings tried in order; the first that gives at most _MAX_LABELS labels is used. The
# multiples of a week come last: only week buckets reach them.
_LABEL_STEPS_S = (
    60,
    120,
    300,
    600,
    900,
    1800,
    HOUR_S,
    2 * HOUR_S,
    3 * HOUR_S,
    6 * HOUR_S,
    12 * HOUR_S,
    _DAY_S,
    2 * _DAY_S,
    5 * _DAY_S,
    10 * _DAY_S,
    30 * _DAY_S,
    90 * _DAY_S,
    2 * _WEEK_S,
    4 * _WEEK_S,
    8 * _WEEK_S,
    13 * _WEEK_S,
    26 * _WEEK_S,
    52 * _WEEK_S,
)
_MAX_LABELS = 8


@dataclass(frozen=True, slots=True)
class ChartBucket:
    """The width of one bar in the charts over time."""

    name: str  # "minute", "5 minutes", "hour", "day", "week": reads after "per"
    seconds: int
    offset_s: int = 0  # buckets start at offset_s + k * seconds (Unix time): Mondays for weeks

    def sql(self, column: str) -> str:
        """The ClickHouse expression of the bucket a time column falls in, in Unix seconds."""
        return (
            f"(intDiv(toInt64(toUnixTimestamp({column})) - {self.offset_s}, {self.seconds}) "
            f"* {self.seconds} + {self.offset_s})"
        )


def chart_bucket(period: Period) -> ChartBucket:
    """1 minute up to 3 h, 5 minutes up to 12 h, an hour up to 7 days, a day while that gives
    at most MAX_CHART_BUCKETS bars, a week beyond (Monday to Monday), and several weeks where
    even weeks are too many: from 36 to 200 bars (a day of 10 minutes still gets 10 bars)."""
    hours = period.hours
    if hours <= 3:
        return ChartBucket("minute", _MINUTE_S)
    if hours <= 12:
        return ChartBucket("5 minutes", 5 * _MINUTE_S)
    if hours <= 7 * 24:
        return ChartBucket("hour", HOUR_S)
    day = ChartBucket("day", _DAY_S)
    if count_buckets(period, day) <= MAX_CHART_BUCKETS:
        return day
    week = ChartBucket("week", _WEEK_S, _MONDAY_S)
    weeks = count_buckets(period, week)
    if weeks <= MAX_CHART_BUCKETS:
        return week
    n = -(-weeks // MAX_CHART_BUCKETS)
    while True:  # one or two steps: a wider bucket may straddle one more boundary
        wide = ChartBucket(f"{n} weeks", n * _WEEK_S, _MONDAY_S)
        if count_buckets(period, wide) <= MAX_CHART_BUCKETS:
            return wide
        n += 1


def _first_bucket_ms(period: Period, bucket: ChartBucket) -> int:
    step_ms, offset_ms = bucket.seconds * 1000, bucket.offset_s * 1000
    return period.start_ms - (period.start_ms - offset_ms) % step_ms


def count_buckets(period: Period, bucket: ChartBucket) -> int:
    """How many buckets overlap the period, without listing them."""
    first, step_ms = _first_bucket_ms(period, bucket), bucket.seconds * 1000
    return max(0, -(-(period.end_ms - first) // step_ms))


def bucket_starts_ms(period: Period, bucket: ChartBucket) -> tuple[int, ...]:
    """Every bucket that overlaps the period, empty ones included, so gaps show as gaps."""
    return tuple(range(_first_bucket_ms(period, bucket), period.end_ms, bucket.seconds * 1000))


@dataclass(frozen=True, slots=True)
class HtmlData:
    period: Period
    bucket: ChartBucket
    buckets_ms: tuple[int, ...]
    team_cost: dict[str, tuple[float, ...]]  # team (and "idle") -> cost per bucket
    used_hours: tuple[float, ...]
    idle_hours: tuple[float, ...]
    idle_cost: tuple[float, ...]
    top_pods: tuple[tuple[str, str, str, Decimal], ...]  # namespace, pod, team, cost
    showback: ShowbackReport
    tags: TagsReport
    units: UnitEconomicsReport


def _label(ms: int, bucket: ChartBucket) -> str:
    """MM-DD HH:MM below a day, YYYY-MM-DD for days."""
    text = format_ms(ms)
    return text[5:16].replace("T", " ") if bucket.seconds < _DAY_S else text[:10]


def _axis_labels(buckets_ms: tuple[int, ...], bucket: ChartBucket) -> list[int]:
    """Indexes of the buckets to label: at round times, at most _MAX_LABELS of them."""
    if not buckets_ms:
        return []
    span_s = len(buckets_ms) * bucket.seconds
    step_s = next(
        (
            s
            for s in _LABEL_STEPS_S
            if s >= bucket.seconds and s % bucket.seconds == 0 and span_s / s <= _MAX_LABELS
        ),
        None,
    )
    if step_s is None:
        every = max(1, len(buckets_ms) // _MAX_LABELS)
        return list(range(0, len(buckets_ms), every))
    return [
        i for i, ms in enumerate(buckets_ms) if (ms // 1000 - bucket.offset_s) % step_s == 0
    ] or [0]


def _axis_number(value: float, top: float) -> str:
    """Tick text with enough decimals to tell the ticks apart (cents of a minute are small)."""
    if top >= 100:
        return f"{value:,.0f}"
    if top >= 1:
        return f"{value:,.2f}"
    if top >= 0.01:
        return f"{value:.3f}"
    return f"{value:.5f}"


def nice_axis_top(value: float) -> tuple[float, int]:
    """The top of a four-step y axis at or above `value`, with round steps (1, 1.5, 2, 2.5, 3 or 5 x
    10^k), and the decimals its tick labels need."""
    if value <= 0:
        return 1.0, 2
    exponent = math.floor(math.log10(value / 4))
    for mantissa in (1.0, 1.5, 2.0, 2.5, 3.0, 5.0, 10.0):
        step = mantissa * 10.0**exponent
        if step * 4 >= value * (1 - 1e-9):
            break
    places = max(
        0, -exponent + (1 if mantissa in (1.5, 2.5) else 0) - (1 if mantissa == 10.0 else 0)
    )
    return step * 4, places


def chart_axes(
    chart_id: str, title: str, y_unit: str, peak: float, width: int, height: int, left: int
) -> tuple[list[str], float]:
    """The SVG opening, the y-axis title and the horizontal grid lines with their values; and
    the value at the top of the plot."""
    top, places = nice_axis_top(peak)
    plot_h = height - PLOT_MARGIN
    parts = [
        f'<svg class="chart" id="{chart_id}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
        f'<text x="{left}" y="12" class="axis unit">{escape(y_unit)}</text>',
    ]
    for k in range(5):
        y = PLOT_TOP + plot_h * k / 4
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" '
            f'class="grid"/><text x="{left - 6}" y="{y + 4:.1f}" class="axis" '
            f'text-anchor="end">{top * (4 - k) / 4:,.{places}f}</text>'
        )
    return parts, top


def _time_labels(data: HtmlData, left: int, slot: float, height: int) -> list[str]:
    return [
        f'<line x1="{left + i * slot:.1f}" y1="{height - PLOT_MARGIN + PLOT_TOP}" '
        f'x2="{left + i * slot:.1f}" y2="{height - PLOT_MARGIN + PLOT_TOP + 4}" class="tick"/>'
        f'<text x="{left + i * slot:.1f}" y="{height - 8}" class="axis">'
        f"{escape(_label(data.buckets_ms[i], data.bucket))}</text>"
        for i in _axis_labels(data.buckets_ms, data.bucket)
    ]


PLOT_TOP = 22  # room for the y-axis unit above the plot
PLOT_MARGIN = 50  # top and bottom margins together


def _series_name(team: str) -> str:
    if team == OTHER_TEAMS:
        return "(other teams)"
    return "(idle GPU time)" if team == "(idle)" else display(team)


def stacked_bars(data: HtmlData, width: int = 880, height: int = 260) -> str:
    series = sorted(
        data.team_cost,
        key=lambda t: (t == "(idle)", t == OTHER_TEAMS, -sum(data.team_cost[t])),
    )
    n = len(data.buckets_ms)
    totals = [sum(data.team_cost[s][i] for s in series) for i in range(n)]
    if not any(totals):
        return '<p class="empty">No GPU cost in this period.</p>'
    left, plot_h = 60, height - PLOT_MARGIN
    slot = (width - left - 10) / n
    bar = max(1.0, slot * 0.8)
    parts, top = chart_axes(
        "chart-team-cost",
        "cost by team over time",
        f"USD per {data.bucket.name}",
        max(totals),
        width,
        height,
        left,
    )
    for i in range(n):
        y = float(PLOT_TOP + plot_h)
        for s_index, name in enumerate(series):
            value = data.team_cost[name][i]
            if value <= 0:
                continue
            h = plot_h * value / top
            y -= h
            colour = IDLE_COLOUR if name == "(idle)" else PALETTE[s_index % len(PALETTE)]
            label = (
                f"{_series_name(name)} {_label(data.buckets_ms[i], data.bucket)}: "
                f"${_axis_number(value, value)}"
            )
            parts.append(
                f'<rect class="bar" x="{left + i * slot:.1f}" y="{y:.1f}" '
                f'width="{bar:.1f}" height="{h:.1f}" fill="{colour}">'
                f"<title>{escape(label)}</title></rect>"
            )
    parts += _time_labels(data, left, slot, height)
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key"><i style="background:'
        f'{IDLE_COLOUR if s == "(idle)" else PALETTE[j % len(PALETTE)]}"></i>'
        f"{escape(_series_name(s))}</span>"
        for j, s in enumerate(series)
    )
    return "".join(parts) + f'<div class="legend">{legend}</div>'


def hbars(chart_id: str, items: list[tuple[str, float, str]], colour: str, width: int = 880) -> str:
    if not items:
        return '<p class="empty">Nothing to show for this period.</p>'
    row_h, label_w = 26, 260
    height = row_h * len(items) + 10
    top = max(v for _, v, _ in items) or 1.0
    parts = [
        f'<svg class="chart" id="{chart_id}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img">'
    ]
    for i, (label, value, text) in enumerate(items):
        y = 5 + i * row_h
        w = max(1.0, (width - label_w - 260) * value / top)
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 17}" text-anchor="end" class="label">'
            f"{escape(label)}</text>"
            f'<rect class="bar" x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" '
            f'fill="{colour}"><title>{escape(label)}: {escape(text)}</title></rect>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + 17}" class="value">{escape(text)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def utilisation_chart(data: HtmlData, width: int = 880, height: int = 240) -> str:
    n = len(data.buckets_ms)
    if n == 0 or (not any(data.used_hours) and not any(data.idle_hours)):
        return '<p class="empty">No GPU time in this period.</p>'
    # Bars are average GPUs (GPU-hours / bucket hours): the same scale for any bucket width.
    bucket_h = data.bucket.seconds / 3600
    peak = max(u + i for u, i in zip(data.used_hours, data.idle_hours, strict=True)) / bucket_h
    left, plot_h = 60, height - PLOT_MARGIN
    slot = (width - left - 10) / n
    bar = max(1.0, slot * 0.8)
    parts, top = chart_axes(
        "chart-utilisation",
        "GPUs allocated and idle over time",
        f"GPUs (average per {data.bucket.name})",
        peak,
        width,
        height,
        left,
    )
    places = gpu_hours_places(sum(data.used_hours) + sum(data.idle_hours))
    for i in range(n):
        used, idle = data.used_hours[i], data.idle_hours[i]
        total = used + idle
        if total <= 0:
            continue
        h_used, h_idle = plot_h * used / bucket_h / top, plot_h * idle / bucket_h / top
        x = left + i * slot
        tip = (
            f"{_label(data.buckets_ms[i], data.bucket)}: {used:,.{places}f} GPU-h allocated, "
            f"{idle:,.{places}f} GPU-h idle ({used / total * 100:.0f}% allocated), "
            f"idle burn ${_axis_number(data.idle_cost[i], data.idle_cost[i])}"
        )
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{PLOT_TOP + plot_h - h_used:.1f}" '
            f'width="{bar:.1f}" height="{h_used:.1f}" fill="{PALETTE[2]}">'
            f"<title>{escape(tip)}</title></rect>"
            f'<rect class="bar" x="{x:.1f}" y="{PLOT_TOP + plot_h - h_used - h_idle:.1f}" '
            f'width="{bar:.1f}" height="{h_idle:.1f}" fill="{IDLE_COLOUR}">'
            f"<title>{escape(tip)}</title></rect>"
        )
    parts += _time_labels(data, left, slot, height)
    parts.append("</svg>")
    legend = (
        f'<div class="legend"><span class="key"><i style="background:{PALETTE[2]}"></i>'
        f'allocated to pods and host processes</span><span class="key"><i style="background:'
        f'{IDLE_COLOUR}"></i>idle (paid for, unused)</span></div>'
    )
    return "".join(parts) + legend

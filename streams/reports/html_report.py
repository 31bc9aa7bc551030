"""The HTML report: one self-contained file, charts drawn as inline SVG (nothing is fetched when
it is viewed). `html_report(store, period)` reads the store; `render_html` is pure. Charts over
time bucket by the period's length (`chart_bucket`) so short and long periods both show a
useful number of bars."""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from html import escape

from streams.reports.params import Period, format_ms
from streams.reports.render import display, money, num, pct
from streams.reports.showback import (
    ALLOCATED,
    IDLE_LINE,
    NO_MODEL_LINE,
    ShowbackReport,
    gpu_hours_places,
    line_label,
    showback,
)
from streams.reports.sources import cost_source, read_plan
from streams.reports.tags import TagsReport, tag_compliance
from streams.reports.unit_economics import UnitEconomicsReport, unit_economics
from streams.rollups import ms_literal
from streams.store import ClickHouseStore

_CENT = Decimal("0.01")
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
_MINUTE_S, _HOUR_S, _DAY_S = 60, 3600, 86_400
# Label spacings tried in order; the first that gives at most _MAX_LABELS labels is used.
_LABEL_STEPS_S = (
    60,
    120,
    300,
    600,
    900,
    1800,
    _HOUR_S,
    2 * _HOUR_S,
    3 * _HOUR_S,
    6 * _HOUR_S,
    12 * _HOUR_S,
    _DAY_S,
    2 * _DAY_S,
    5 * _DAY_S,
    10 * _DAY_S,
    30 * _DAY_S,
    90 * _DAY_S,
)
_MAX_LABELS = 8


@dataclass(frozen=True, slots=True)
class ChartBucket:
    """The width of one bar in the charts over time."""

    name: str  # "minute", "5 minutes", "hour", "day": reads after "per"
    seconds: int


def chart_bucket(period: Period) -> ChartBucket:
    """1 minute up to 3 h, 5 minutes up to 12 h, an hour up to 7 days, a day beyond: from 36 to
    180 bars for periods in those ranges (a day of 10 minutes still gets 10 bars)."""
    hours = period.hours
    if hours <= 3:
        return ChartBucket("minute", _MINUTE_S)
    if hours <= 12:
        return ChartBucket("5 minutes", 5 * _MINUTE_S)
    if hours <= 7 * 24:
        return ChartBucket("hour", _HOUR_S)
    return ChartBucket("day", _DAY_S)


def bucket_starts_ms(period: Period, bucket: ChartBucket) -> tuple[int, ...]:
    """Every bucket that overlaps the period, empty ones included, so gaps show as gaps."""
    step_ms = bucket.seconds * 1000
    first = period.start_ms - period.start_ms % step_ms
    return tuple(range(first, period.end_ms, step_ms))


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


def html_report(store: ClickHouseStore, period: Period, *, use_rollups: bool = True) -> str:
    plan = read_plan(store, period.start_ms, period.end_ms, use_rollups=use_rollups)
    costs = cost_source(store.database, plan)
    bucket = chart_bucket(period)
    if bucket.seconds < _HOUR_S:
        # Finer than the hourly rollups: read the windows themselves (periods of 12 h at most).
        timed = (
            f"(SELECT window_start AS t0, kind, team, cost_usd, device_seconds "
            f"FROM {store.database}.gpu_cost_windows FINAL "
            f"WHERE window_start >= {ms_literal(period.start_ms)} "
            f"AND window_start < {ms_literal(period.end_ms)})"
        )
    else:
        timed = f"(SELECT hour AS t0, kind, team, cost_usd, device_seconds FROM {costs})"
    rows = store.query_rows(
        f"SELECT toUnixTimestamp(toStartOfInterval(t0, INTERVAL {bucket.seconds} SECOND)) AS b, "
        f"if(kind = 'idle', '(idle)', team) AS t, "
        f"toFloat64(sum(cost_usd)), sumIf(device_seconds, kind != 'idle'), "
        f"sumIf(device_seconds, kind = 'idle') FROM {timed} GROUP BY b, t ORDER BY b"
    )
    buckets = bucket_starts_ms(period, bucket)
    index = {v: i for i, v in enumerate(buckets)}
    team_cost: dict[str, list[float]] = {}
    used = [0.0] * len(buckets)
    idle = [0.0] * len(buckets)
    idle_cost = [0.0] * len(buckets)
    for bk, team, cost, used_s, idle_s in rows:
        i = index[int(bk) * 1000]
        team_cost.setdefault(team, [0.0] * len(buckets))[i] += cost
        used[i] += used_s / 3600
        idle[i] += idle_s / 3600
        if team == "(idle)":
            idle_cost[i] += cost
    pods = store.query_rows(
        f"SELECT namespace, pod, any(team), sum(cost_usd) AS c FROM {costs} "
        f"WHERE kind = 'usage' GROUP BY namespace, pod, pod_uid ORDER BY c DESC LIMIT 10"
    )
    return render_html(
        HtmlData(
            period=period,
            bucket=bucket,
            buckets_ms=buckets,
            team_cost={k: tuple(v) for k, v in team_cost.items()},
            used_hours=tuple(used),
            idle_hours=tuple(idle),
            idle_cost=tuple(idle_cost),
            top_pods=tuple((r[0], r[1], r[2], r[3]) for r in pods),
            showback=showback(store, period, "team", use_rollups=use_rollups),
            tags=tag_compliance(store, period, use_rollups=use_rollups),
            units=unit_economics(store, period, use_rollups=use_rollups),
        )
    )


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
    return [i for i, ms in enumerate(buckets_ms) if (ms // 1000) % step_s == 0] or [0]


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


def _axes(
    chart_id: str, title: str, y_unit: str, peak: float, width: int, height: int, left: int
) -> tuple[list[str], float]:
    """The SVG opening, the y-axis title and the horizontal grid lines with their values; and
    the value at the top of the plot."""
    top, places = nice_axis_top(peak)
    plot_h = height - _PLOT_MARGIN
    parts = [
        f'<svg class="chart" id="{chart_id}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
        f'<text x="{left}" y="12" class="axis unit">{escape(y_unit)}</text>',
    ]
    for k in range(5):
        y = _PLOT_TOP + plot_h * k / 4
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" '
            f'class="grid"/><text x="{left - 6}" y="{y + 4:.1f}" class="axis" '
            f'text-anchor="end">{top * (4 - k) / 4:,.{places}f}</text>'
        )
    return parts, top


def _time_labels(data: HtmlData, left: int, slot: float, height: int) -> list[str]:
    return [
        f'<line x1="{left + i * slot:.1f}" y1="{height - _PLOT_MARGIN + _PLOT_TOP}" '
        f'x2="{left + i * slot:.1f}" y2="{height - _PLOT_MARGIN + _PLOT_TOP + 4}" class="tick"/>'
        f'<text x="{left + i * slot:.1f}" y="{height - 8}" class="axis">'
        f"{escape(_label(data.buckets_ms[i], data.bucket))}</text>"
        for i in _axis_labels(data.buckets_ms, data.bucket)
    ]


_PLOT_TOP = 22  # room for the y-axis unit above the plot
_PLOT_MARGIN = 50  # top and bottom margins together


def _series_name(team: str) -> str:
    return "(idle GPU time)" if team == "(idle)" else display(team)


def stacked_bars(data: HtmlData, width: int = 880, height: int = 260) -> str:
    series = sorted(data.team_cost, key=lambda t: (t == "(idle)", -sum(data.team_cost[t])))
    n = len(data.buckets_ms)
    totals = [sum(data.team_cost[s][i] for s in series) for i in range(n)]
    if not any(totals):
        return '<p class="empty">No GPU cost in this period.</p>'
    left, plot_h = 60, height - _PLOT_MARGIN
    slot = (width - left - 10) / n
    bar = max(1.0, slot * 0.8)
    parts, top = _axes(
        "chart-team-cost",
        "cost by team over time",
        f"USD per {data.bucket.name}",
        max(totals),
        width,
        height,
        left,
    )
    for i in range(n):
        y = float(_PLOT_TOP + plot_h)
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
    left, plot_h = 60, height - _PLOT_MARGIN
    slot = (width - left - 10) / n
    bar = max(1.0, slot * 0.8)
    parts, top = _axes(
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
            f'<rect class="bar" x="{x:.1f}" y="{_PLOT_TOP + plot_h - h_used:.1f}" '
            f'width="{bar:.1f}" height="{h_used:.1f}" fill="{PALETTE[2]}">'
            f"<title>{escape(tip)}</title></rect>"
            f'<rect class="bar" x="{x:.1f}" y="{_PLOT_TOP + plot_h - h_used - h_idle:.1f}" '
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


def render_html(data: HtmlData) -> str:
    sb = data.showback
    span = f"{format_ms(data.period.start_ms)} to {format_ms(data.period.end_ms)}"
    # Tiles show the table's own cents, so they match the lines below to the cent.
    cents = sb.cents_by_kind()
    idle_share = float(sb.idle_usd / sb.total_usd * 100) if sb.total_usd else None
    places = gpu_hours_places(sb.gpu_hours)
    untagged_cents = data.tags.untagged_usd.quantize(_CENT)
    tiles = [
        ("Metered GPU cost", f"${money(sb.total_cents_usd)}"),
        ("Allocated to teams", f"${money(cents[ALLOCATED] + cents[NO_MODEL_LINE])}"),
        ("Idle burn", f"${money(cents[IDLE_LINE])} ({pct(idle_share)})"),
        (
            "Missing a required label",
            f"${money(untagged_cents)} ({pct(data.tags.untagged_share_of_total_pct)})",
        ),
        ("GPU-hours", num(sb.gpu_hours, places)),
    ]
    tile_html = "".join(
        f'<div class="tile"><div class="k">{escape(k)}</div><div class="v">{escape(v)}</div></div>'
        for k, v in tiles
    )
    rows = "".join(
        f'<tr class="{line.line_kind}"><td>{escape(line_label(line))}</td>'
        f"<td class=n>{money(line.cost_cents_usd)}</td><td class=n>{pct(line.share_pct)}</td>"
        f"<td class=n>{num(line.gpu_hours, places)}</td>"
        f"<td class=n>{pct(line.avg_sm_util_pct, 0)}</td>"
        f"<td class=n>{f'{line.tokens:,}' if line.tokens else '-'}</td><td class=n>"
        f"{money(line.cost_per_1m_tokens_usd) if line.cost_per_1m_tokens_usd is not None else '-'}"
        f"</td></tr>"
        for line in sb.lines
    )
    showback_table = (
        "<table><thead><tr><th>team</th><th>cost USD</th><th>share</th><th>GPU-hours</th>"
        "<th>avg SM</th><th>tokens</th><th>USD / 1M tokens</th></tr></thead>"
        f"<tbody>{rows}</tbody><tfoot><tr><td>total (all metered GPU cost)</td><td class=n>"
        f"{money(sb.total_cents_usd)}</td><td class=n>100.0%</td><td class=n>"
        f"{num(sb.gpu_hours, places)}</td><td></td><td></td><td></td></tr></tfoot></table>"
    )
    table_notes = "".join(
        f'<p class="note">{escape(note)}</p>' for tab in sb.table() for note in tab.notes
    )
    by_model: dict[str, list[Decimal]] = {}
    for line in data.units.lines:
        acc = by_model.setdefault(line.model, [Decimal(0), Decimal(0)])
        acc[0] += line.allocation.cost_usd
        acc[1] += line.tokens
    cpm = sorted(
        (
            (display(m), float(c / t * 1_000_000), f"${float(c / t * 1_000_000):,.2f} / 1M tokens")
            for m, (c, t) in by_model.items()
            if t
        ),
        key=lambda item: -item[1],
    )
    untagged = [
        (
            display(o.namespace),
            float(o.untagged_cost_usd),
            f"${money(o.untagged_cost_usd.quantize(_CENT))} · missing {', '.join(o.missing_keys)}",
        )
        for o in data.tags.namespaces[:10]
    ]
    pods = [
        (f"{ns}/{pod or '?'}", float(cost), f"${money(cost.quantize(_CENT))} · {display(team)}")
        for ns, pod, team, cost in data.top_pods
    ]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gpuledger GPU cost report, {escape(span)}</title>
<link rel="icon" href="data:,">
<style>
body{{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#202124;
margin:0;background:#f8f9fa}}
main{{max-width:920px;margin:0 auto;padding:24px}}
h1{{font-size:22px;margin:0 0 4px}} h2{{font-size:16px;margin:28px 0 8px}}
.sub{{color:#5f6368;margin-bottom:16px}}
.tiles{{display:flex;gap:10px;flex-wrap:wrap}}
.tile{{background:#fff;border:1px solid #dadce0;border-radius:8px;padding:10px 14px;flex:1;
min-width:110px}} .tile .k{{color:#5f6368;font-size:12px}} .tile .v{{font-size:18px;
font-weight:600}}
section{{background:#fff;border:1px solid #dadce0;border-radius:8px;padding:8px 16px 14px;
margin-top:16px}}
table{{border-collapse:collapse;width:100%}} th,td{{padding:4px 8px;border-bottom:1px solid
#eee;text-align:left}} td.n,th:not(:first-child){{text-align:right}}
tr.idle td,tr.untagged td,tr.host td{{color:#5f6368;font-style:italic}} tfoot td{{font-weight:600}}
svg .grid{{stroke:#eee}} svg .tick{{stroke:#9aa0a6}}
svg .axis,svg .value{{font-size:11px;fill:#5f6368}}
svg .label{{font-size:12px;fill:#202124}}
.legend{{margin-top:4px}} .key{{margin-right:14px;font-size:12px}}
.key i{{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}}
.empty{{color:#5f6368}} .note{{color:#5f6368;font-size:12px}}
</style></head>
<body><main>
<h1>GPU cost report</h1>
<div class="sub">{escape(span)} · USD, rounded to cents so lines add up to the total</div>
<div class="tiles">{tile_html}</div>
<section><h2>Cost by team over time (per {data.bucket.name})</h2>{stacked_bars(data)}</section>
<section><h2>Showback by team</h2>{showback_table}{table_notes}</section>
<section><h2>Cost per 1M tokens by model (allocation basis, idle included)</h2>
{hbars("chart-cost-per-token", cpm, PALETTE[0])}
<p class="note">Each bucket's idle cost is spread over the pods that ran in it, so these are
higher than the showback table's USD / 1M tokens (usage basis, idle excluded).</p></section>
<section><h2>GPUs allocated vs idle (per {data.bucket.name})</h2>{utilisation_chart(data)}
<p class="note">Idle burn: ${money(cents[IDLE_LINE])} for GPU time paid for and not used.</p>
</section>
<section><h2>Untagged cost by namespace</h2>
<p class="note">{pct(data.tags.untagged_share_of_total_pct)} of all GPU cost
(${money(untagged_cents)}) cannot be charged back: a required label (team, product,
cost-center) is missing.</p>
{hbars("chart-untagged", untagged, PALETTE[1])}</section>
<section><h2>Top pods by cost</h2>{hbars("chart-top-pods", pods, PALETTE[3])}</section>
</main></body></html>
"""

"""The HTML report: one self-contained file, charts drawn as inline SVG (nothing is fetched when
it is viewed). `html_report(store, period)` reads the store; `render_html` is pure."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from html import escape

from streams.reports.params import Period, format_ms
from streams.reports.render import display, money, pct
from streams.reports.showback import ShowbackReport, showback
from streams.reports.sources import cost_source, read_plan
from streams.reports.tags import TagsReport, tag_compliance
from streams.reports.unit_economics import UnitEconomicsReport, unit_economics
from streams.store import ClickHouseStore

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


@dataclass(frozen=True, slots=True)
class HtmlData:
    period: Period
    bucket: str
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
    bucket = "hour" if period.hours <= 72 else "day"
    b = "hour" if bucket == "hour" else "toStartOfDay(hour)"
    rows = store.query_rows(
        f"SELECT toUnixTimestamp({b}) AS b, if(kind = 'idle', '(idle)', team) AS t, "
        f"toFloat64(sum(cost_usd)), sumIf(device_seconds, kind != 'idle'), "
        f"sumIf(device_seconds, kind = 'idle') FROM {costs} GROUP BY b, t ORDER BY b"
    )
    buckets = sorted({int(r[0]) * 1000 for r in rows})
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
            buckets_ms=tuple(buckets),
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


def _label(ms: int, bucket: str) -> str:
    text = format_ms(ms)
    return text[5:16].replace("T", " ") if bucket == "hour" else text[:10]


def stacked_bars(data: HtmlData, width: int = 880, height: int = 260) -> str:
    series = sorted(data.team_cost, key=lambda t: (t == "(idle)", -sum(data.team_cost[t])))
    n = len(data.buckets_ms)
    if n == 0:
        return '<p class="empty">No GPU cost in this period.</p>'
    totals = [sum(data.team_cost[s][i] for s in series) for i in range(n)]
    top = max(totals) or 1.0
    left, plot_h = 60, height - 50
    slot = (width - left - 10) / n
    bar = max(1.0, slot * 0.8)
    parts = [
        f'<svg class="chart" id="chart-team-cost" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="cost by team over time">'
    ]
    for k in range(5):
        y = 10 + plot_h * k / 4
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" '
            f'class="grid"/><text x="{left - 6}" y="{y + 4:.1f}" class="axis" '
            f'text-anchor="end">{top * (4 - k) / 4:,.2f}</text>'
        )
    for i in range(n):
        y = 10 + plot_h
        for s_index, name in enumerate(series):
            value = data.team_cost[name][i]
            if value <= 0:
                continue
            h = plot_h * value / top
            y -= h
            colour = IDLE_COLOUR if name == "(idle)" else PALETTE[s_index % len(PALETTE)]
            label = f"{display(name)} {_label(data.buckets_ms[i], data.bucket)}: ${value:,.2f}"
            parts.append(
                f'<rect class="bar" x="{left + i * slot:.1f}" y="{y:.1f}" '
                f'width="{bar:.1f}" height="{h:.1f}" fill="{colour}">'
                f"<title>{escape(label)}</title></rect>"
            )
    step = max(1, n // 8)
    for i in range(0, n, step):
        parts.append(
            f'<text x="{left + i * slot:.1f}" y="{height - 8}" class="axis">'
            f"{escape(_label(data.buckets_ms[i], data.bucket))}</text>"
        )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key"><i style="background:'
        f'{IDLE_COLOUR if s == "(idle)" else PALETTE[j % len(PALETTE)]}"></i>'
        f"{escape(display(s))}</span>"
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
    if n == 0:
        return '<p class="empty">No GPU time in this period.</p>'
    top = max(u + i for u, i in zip(data.used_hours, data.idle_hours, strict=True)) or 1.0
    left, plot_h = 60, height - 50
    slot = (width - left - 10) / n
    bar = max(1.0, slot * 0.8)
    parts = [
        f'<svg class="chart" id="chart-utilisation" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img">'
    ]
    for k in range(5):
        y = 10 + plot_h * k / 4
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" '
            f'class="grid"/><text x="{left - 6}" y="{y + 4:.1f}" class="axis" '
            f'text-anchor="end">{top * (4 - k) / 4:,.2f}</text>'
        )
    for i in range(n):
        used, idle = data.used_hours[i], data.idle_hours[i]
        total = used + idle
        h_used, h_idle = plot_h * used / top, plot_h * idle / top
        x = left + i * slot
        busy = used / total * 100 if total else 0.0
        tip = (
            f"{_label(data.buckets_ms[i], data.bucket)}: {used:,.1f} GPU-h used, "
            f"{idle:,.1f} GPU-h idle ({busy:.0f}% busy), idle burn ${data.idle_cost[i]:,.2f}"
        )
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{10 + plot_h - h_used:.1f}" width="{bar:.1f}" '
            f'height="{h_used:.1f}" fill="{PALETTE[2]}"><title>{escape(tip)}</title></rect>'
            f'<rect class="bar" x="{x:.1f}" y="{10 + plot_h - h_used - h_idle:.1f}" '
            f'width="{bar:.1f}" height="{h_idle:.1f}" fill="{IDLE_COLOUR}">'
            f"<title>{escape(tip)}</title></rect>"
        )
    parts.append("</svg>")
    legend = (
        f'<div class="legend"><span class="key"><i style="background:{PALETTE[2]}"></i>'
        f'allocated GPU-hours</span><span class="key"><i style="background:{IDLE_COLOUR}">'
        f"</i>idle GPU-hours</span></div>"
    )
    return "".join(parts) + legend


def _row_name(key: str, line_kind: str) -> str:
    return display(key) if line_kind == "allocated" else f"({line_kind})"


def render_html(data: HtmlData) -> str:
    sb = data.showback
    span = f"{format_ms(data.period.start_ms)} to {format_ms(data.period.end_ms)}"
    idle_total = float(sb.idle_usd)
    total = float(sb.total_usd)
    tiles = [
        ("Metered GPU cost", f"${money(sb.total_cents_usd)}"),
        ("Allocated to teams", f"${money(sb.allocated_usd.quantize(Decimal('0.01')))}"),
        ("Idle burn", f"${idle_total:,.2f} ({pct(idle_total / total * 100 if total else None)})"),
        (
            "Untagged",
            f"${float(data.tags.untagged_usd):,.2f} ({pct(data.tags.untagged_share_of_total_pct)})",
        ),
        ("GPU-hours", f"{sb.gpu_hours:,.1f}"),
    ]
    tile_html = "".join(
        f'<div class="tile"><div class="k">{escape(k)}</div><div class="v">{escape(v)}</div></div>'
        for k, v in tiles
    )
    rows = "".join(
        f'<tr class="{line.line_kind}"><td>{escape(_row_name(line.key, line.line_kind))}</td>'
        f"<td class=n>{money(line.cost_cents_usd)}</td><td class=n>{pct(line.share_pct)}</td>"
        f"<td class=n>{line.gpu_hours:,.1f}</td><td class=n>{pct(line.avg_sm_util_pct, 0)}</td>"
        f"<td class=n>{line.tokens:,}</td><td class=n>"
        f"{money(line.cost_per_1m_tokens_usd) if line.cost_per_1m_tokens_usd is not None else '-'}"
        f"</td></tr>"
        for line in sb.lines
    )
    showback_table = (
        "<table><thead><tr><th>team</th><th>cost USD</th><th>share</th><th>GPU-hours</th>"
        "<th>avg SM</th><th>tokens</th><th>USD / 1M tokens</th></tr></thead>"
        f"<tbody>{rows}</tbody><tfoot><tr><td>total</td><td class=n>"
        f"{money(sb.total_cents_usd)}</td><td class=n>100%</td><td class=n>{sb.gpu_hours:,.1f}"
        "</td><td></td><td></td><td></td></tr></tfoot></table>"
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
            f"${float(o.untagged_cost_usd):,.2f} · missing {', '.join(o.missing_keys)}",
        )
        for o in data.tags.namespaces[:10]
    ]
    pods = [
        (f"{ns}/{pod or '?'}", float(cost), f"${float(cost):,.2f} · {display(team)}")
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
min-width:150px}} .tile .k{{color:#5f6368;font-size:12px}} .tile .v{{font-size:18px;
font-weight:600}}
section{{background:#fff;border:1px solid #dadce0;border-radius:8px;padding:8px 16px 14px;
margin-top:16px}}
table{{border-collapse:collapse;width:100%}} th,td{{padding:4px 8px;border-bottom:1px solid
#eee;text-align:left}} td.n,th:not(:first-child){{text-align:right}}
tr.idle td,tr.untagged td,tr.host td{{color:#5f6368;font-style:italic}} tfoot td{{font-weight:600}}
svg .grid{{stroke:#eee}} svg .axis,svg .value{{font-size:11px;fill:#5f6368}}
svg .label{{font-size:12px;fill:#202124}}
.legend{{margin-top:4px}} .key{{margin-right:14px;font-size:12px}}
.key i{{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}}
.empty{{color:#5f6368}} .note{{color:#5f6368;font-size:12px}}
</style></head>
<body><main>
<h1>GPU cost report</h1>
<div class="sub">{escape(span)} · USD, rounded to cents so lines add up to the total</div>
<div class="tiles">{tile_html}</div>
<section><h2>Cost by team over time (per {data.bucket})</h2>{stacked_bars(data)}</section>
<section><h2>Showback by team</h2>{showback_table}
<p class="note">allocated + untagged + host + idle = all metered GPU cost</p></section>
<section><h2>Cost per 1M tokens by model (allocation basis, idle included)</h2>
{hbars("chart-cost-per-token", cpm, PALETTE[0])}</section>
<section><h2>GPU utilisation vs idle burn (per {data.bucket})</h2>{utilisation_chart(data)}
</section>
<section><h2>Untagged cost by namespace</h2>
<p class="note">{pct(data.tags.untagged_share_of_total_pct)} of all GPU cost
(${float(data.tags.untagged_usd):,.2f}) cannot be charged back: required labels missing.</p>
{hbars("chart-untagged", untagged, PALETTE[1])}</section>
<section><h2>Top pods by cost</h2>{hbars("chart-top-pods", pods, PALETTE[3])}</section>
</main></body></html>
"""

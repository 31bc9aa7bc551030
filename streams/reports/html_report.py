"""The HTML report: one self-contained file, charts drawn as inline SVG (nothing is fetched when
it is viewed). `html_report(store, period)` reads the store; `render_html` is pure. Charts over
time bucket by the period's length (`chart_bucket`) so short and long periods both show a
useful number of bars. The planning sections (the month-end forecast of the month the period
ends in, budgets against it when a budgets file is given, request-based beside usage-based
cost) each have a function of their own (html_forecast.py, html_tables.py)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from html import escape

from streams.reports.budget_report import BudgetReport, assess_budgets
from streams.reports.budgets import Budgets
from streams.reports.charts import (
    CHART_TEAMS,
    HOUR_S,
    OTHER_TEAMS,
    PALETTE,
    HtmlData,
    bucket_starts_ms,
    chart_bucket,
    hbars,
    stacked_bars,
    utilisation_chart,
)
from streams.reports.forecast_report import forecast
from streams.reports.html_forecast import (
    ForecastView,
    forecast_section,
    read_forecast_view,
    report_month,
)
from streams.reports.html_tables import budgets_section, requests_section
from streams.reports.params import Period, check_period, format_ms
from streams.reports.render import display, money, num, pct
from streams.reports.requests_data import requests_report
from streams.reports.requests_report import RequestsReport
from streams.reports.showback import (
    ALLOCATED,
    IDLE_LINE,
    NO_MODEL_LINE,
    gpu_hours_places,
    line_label,
    showback,
)
from streams.reports.sources import cost_source, read_plan
from streams.reports.tags import tag_compliance
from streams.reports.unit_economics import unit_economics
from streams.rollups import ms_literal
from streams.store import ClickHouseStore

_CENT = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class Planning:
    """The sections that look past the period's own cost: each None when not shown."""

    forecast: ForecastView | None = None
    budgets: BudgetReport | None = None
    requests: RequestsReport | None = None


def html_report(
    store: ClickHouseStore,
    period: Period,
    *,
    use_rollups: bool = True,
    as_of_ms: int | None = None,
    budgets: Budgets | None = None,
    planning: bool = True,
) -> str:
    """The report of `period`, with the month-end forecast of the month the period ends in as
    of the period's end (or `as_of_ms`, when that is earlier: a period that ends in the future
    has no spend there yet), `budgets` against that forecast when given, and request-based
    beside usage-based cost by team over the period. `planning=False` leaves those three out:
    the forecast fits a model per team and per day left, seconds of CPU a report."""
    check_period(period)
    plan = read_plan(store, period.start_ms, period.end_ms, use_rollups=use_rollups)
    costs = cost_source(store.database, plan)
    bucket = chart_bucket(period)
    if bucket.seconds < HOUR_S:
        # Finer than the hourly rollups: read the windows themselves (periods of 12 h at most).
        timed = (
            f"(SELECT window_start AS t0, kind, team, cost_usd, device_seconds "
            f"FROM {store.database}.gpu_cost_windows FINAL "
            f"WHERE window_start >= {ms_literal(period.start_ms)} "
            f"AND window_start < {ms_literal(period.end_ms)})"
        )
    else:
        timed = f"(SELECT hour AS t0, kind, team, cost_usd, device_seconds FROM {costs})"
    # The costliest teams each have a series, the rest share one: a chart of at most
    # MAX_CHART_BUCKETS x (CHART_TEAMS + 2) bars, however many teams the labels name.
    top_teams = (
        f"SELECT team FROM {costs} WHERE kind != 'idle' GROUP BY team "
        f"ORDER BY sum(cost_usd) DESC, team LIMIT {CHART_TEAMS}"
    )
    rows = store.query_rows(
        f"SELECT {bucket.sql('t0')} AS b, if(kind = 'idle', '(idle)', "
        f"if(team IN ({top_teams}), team, '{OTHER_TEAMS}')) AS t, "
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
    sections = _planning(store, period, as_of_ms, budgets, use_rollups) if planning else Planning()
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
        ),
        sections,
    )


def _planning(
    store: ClickHouseStore,
    period: Period,
    as_of_ms: int | None,
    budgets: Budgets | None,
    use_rollups: bool,
) -> Planning:
    """The forecast of the month `period` ends in, budgets against it, requests vs usage."""
    forecast_as_of_ms = period.end_ms if as_of_ms is None else min(period.end_ms, as_of_ms)
    month = report_month(period)
    view = read_forecast_view(store, month, as_of_ms=forecast_as_of_ms, use_rollups=use_rollups)
    budget_lines = None
    if budgets is not None:
        # The team forecast is the section's own; other dimensions are forecast for their budgets.
        forecasts = {
            dim: view.report
            if dim == "team"
            else forecast(store, month, dim, now_ms=forecast_as_of_ms, use_rollups=use_rollups)
            for dim in budgets.dimensions
        }
        budget_lines = assess_budgets(budgets, forecasts, month, as_of_ms=view.report.as_of_ms)
    requests = requests_report(store, period, use_rollups=use_rollups)
    return Planning(view, budget_lines, requests)


def planning_sections(planning: Planning) -> str:
    """The forecast, budgets and request-vs-usage sections, in that order, those given."""
    parts = []
    if planning.forecast is not None:
        parts.append(forecast_section(planning.forecast))
    if planning.budgets is not None:
        parts.append(budgets_section(planning.budgets))
    if planning.requests is not None:
        parts.append(requests_section(planning.requests))
    return "\n".join(parts)


def render_html(data: HtmlData, planning: Planning | None = None) -> str:
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
td.ok{{color:#1e8e3e}} td.warn{{color:#b06000;font-weight:600}} td.bad{{color:#c5221f;
font-weight:600}}
</style></head>
<body><main>
<h1>GPU cost report</h1>
<div class="sub">{escape(span)} · USD, rounded to cents so lines add up to the total</div>
<div class="tiles">{tile_html}</div>
<section><h2>Cost by team over time (per {data.bucket.name})</h2>{stacked_bars(data)}</section>
<section><h2>Showback by team</h2>{showback_table}{table_notes}</section>
{planning_sections(planning or Planning())}
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

"""Writes gpuledger's Grafana dashboards (deploy/grafana/dashboards/*.json) from the panel SQL
(and, for the budgets dashboard, PromQL on the worker's gauges) below, so the queries live in
one readable place. The test suite runs every panel's SQL, with the
ClickHouse plugin's macros expanded, against the real ClickHouse engine, and checks that the
committed JSON is what this script writes.

    python deploy/grafana/generate_dashboards.py          # rewrite the JSON files
    python deploy/grafana/generate_dashboards.py --check  # exit 1 if they are stale

Every query reads the versioned tables with FINAL, so replays and corrections count once.
Filters use `'__all__' IN (${var:singlequote})`: the variables' "All" value is `__all__`, so
selecting All needs no list of every value.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams.billing.slices import KIND_NON_GPU, KIND_UNMETERED, latest_versions_sql

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"
PLUGIN_TYPE = "grafana-clickhouse-datasource"
DATASOURCE_UID = "gpuledger-clickhouse"  # deploy/grafana/provisioning/datasources/gpuledger.yaml
DATASOURCE = {"type": PLUGIN_TYPE, "uid": "${datasource}"}
ALL_VALUE = "__all__"
FORMAT_TIME_SERIES = 0
FORMAT_TABLE = 1

COSTS = "gpuledger.gpu_cost_windows FINAL"
TOKEN_COSTS = "gpuledger.cost_per_token_windows FINAL"
UNTAGGED_VALUES = "('__untagged__', '__unknown__')"
WINDOW_S = "dateDiff('millisecond', window_start, window_end) / 1000.0"
# The showback report's line labels: idle and host rows are lines of their own, not teams.
LINE = "multiIf(kind = 'idle', '(idle GPU time)', kind = 'host', '(host processes, no pod)', {dim})"
UNTAGGED_USAGE = (
    f"kind = 'usage' AND (team IN {UNTAGGED_VALUES} OR product IN {UNTAGGED_VALUES} "
    f"OR cost_center IN {UNTAGGED_VALUES})"
)
MISSING_KEYS = (
    "arrayStringConcat(arrayFilter(k -> has(groupUniqArrayArray(arrayFilter(x -> x != '', ["
    f"if(team IN {UNTAGGED_VALUES}, 'team', ''), "
    f"if(product IN {UNTAGGED_VALUES}, 'product', ''), "
    f"if(cost_center IN {UNTAGGED_VALUES}, 'cost-center', '')])), k), "
    "['team', 'product', 'cost-center']), ' ')"
)


# Provider bills: only the newest finished version of each bill slice counts.
BILLED = "gpuledger.billed_cost_hourly FINAL"
NEWEST = latest_versions_sql("gpuledger")
GPU_KINDS = "kind IN ('usage', 'idle', 'host')"
HOUR = "toStartOfHour(window_start)"
IN_BILL_PERIODS = (
    f"arrayExists(p -> {HOUR} >= p.1 AND {HOUR} < p.2, (SELECT "
    "groupArray((billing_period_start, billing_period_end)) FROM gpuledger.bill_versions FINAL "
    f"WHERE {NEWEST}))"
)


def var_filter(column: str, variable: str) -> str:
    values = f"${{{variable}:singlequote}}"
    return f"('{ALL_VALUE}' IN ({values}) OR {column} IN ({values}))"


def where(*variables: str, time_column: str = "window_start") -> str:
    parts = [f"$__timeFilter({time_column})"] + [var_filter(v, v) for v in variables]
    return " AND ".join(parts)


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # Grafana panel type
    sql: str
    query_format: int
    unit: str = "none"
    description: str = ""
    width: int = 12
    height: int = 8
    decimals: int | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Variable:
    name: str
    label: str
    sql: str


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    variables: tuple[Variable, ...]
    panels: tuple[Panel, ...]
    tags: tuple[str, ...] = ("gpuledger",)


def cluster_variable() -> Variable:
    return Variable(
        "cluster",
        "Cluster",
        f"SELECT DISTINCT cluster FROM {COSTS} WHERE $__timeFilter(window_start) ORDER BY cluster",
    )


def cost_variable(name: str, label: str) -> Variable:
    return Variable(
        name,
        label,
        f"SELECT DISTINCT {name} FROM {COSTS} WHERE {where('cluster')} ORDER BY {name}",
    )


def token_variable(name: str, label: str) -> Variable:
    return Variable(
        name,
        label,
        f"SELECT DISTINCT {name} FROM {TOKEN_COSTS} WHERE {where('cluster')} ORDER BY {name}",
    )


def showback() -> Dashboard:
    filters = where("cluster", "team", "product")
    by_over_time = (
        "SELECT $__timeInterval(window_start) AS time, {line} AS {dim}, "
        "sum(cost_usd) AS cost_usd FROM {src} WHERE {filters} "
        "GROUP BY time, {dim} ORDER BY time, {dim}"
    )
    share = (
        # `usd`, not `cost_usd`: an alias named like the column would be substituted into the
        # window function's sum(cost_usd) (ClickHouse: ILLEGAL_AGGREGATION).
        "SELECT {line} AS {dim}, sum(cost_usd) AS usd, "
        "100 * usd / sum(sum(cost_usd)) OVER () AS share_pct, "
        "sum(device_seconds) / 3600 AS gpu_hours FROM {src} WHERE {filters} "
        "GROUP BY {dim} ORDER BY usd DESC, {dim}"
    )
    return Dashboard(
        uid="gpuledger-showback",
        title="gpuledger / Showback",
        description="GPU cost by team and product: what each owner's pods used, plus the idle "
        "and host lines, which add up to all metered GPU cost.",
        variables=(
            cluster_variable(),
            cost_variable("team", "Team"),
            cost_variable("product", "Product"),
        ),
        panels=(
            Panel(
                "GPU cost in range",
                "stat",
                "SELECT sum(cost_usd) AS total_usd, "
                "sumIf(cost_usd, kind = 'usage' AND team NOT IN "
                f"{UNTAGGED_VALUES}) AS allocated_usd, "
                f"sumIf(cost_usd, kind = 'usage' AND team IN {UNTAGGED_VALUES}) AS untagged_usd, "
                "sumIf(cost_usd, kind = 'host') AS host_usd, "
                "sumIf(cost_usd, kind = 'idle') AS idle_usd "
                f"FROM {COSTS} WHERE {filters}",
                FORMAT_TABLE,
                unit="currencyUSD",
                description="allocated + untagged + host + idle = total",
                width=24,
                height=5,
                decimals=2,
            ),
            Panel(
                "Cost by team",
                "timeseries",
                by_over_time.format(
                    line=LINE.format(dim="team"), dim="team", src=COSTS, filters=filters
                ),
                FORMAT_TIME_SERIES,
                unit="currencyUSD",
                description="USD per interval; idle and host time are lines of their own.",
                options={"stacking": "normal"},
            ),
            Panel(
                "Cost by product",
                "timeseries",
                by_over_time.format(
                    line=LINE.format(dim="product"), dim="product", src=COSTS, filters=filters
                ),
                FORMAT_TIME_SERIES,
                unit="currencyUSD",
                description="USD per interval; idle and host time are lines of their own.",
                options={"stacking": "normal"},
            ),
            Panel(
                "Share by team",
                "table",
                share.format(line=LINE.format(dim="team"), dim="team", src=COSTS, filters=filters),
                FORMAT_TABLE,
                unit="currencyUSD",
            ),
            Panel(
                "Share by product",
                "table",
                share.format(
                    line=LINE.format(dim="product"), dim="product", src=COSTS, filters=filters
                ),
                FORMAT_TABLE,
                unit="currencyUSD",
            ),
            Panel(
                "Showback by team, product and cost centre",
                "table",
                "SELECT team, product, cost_center, sum(cost_usd) AS cost_usd, "
                "sum(device_seconds) / 3600 AS gpu_hours "
                f"FROM {COSTS} WHERE {filters} AND kind = 'usage' "
                "GROUP BY team, product, cost_center ORDER BY cost_usd DESC, team, product",
                FORMAT_TABLE,
                unit="currencyUSD",
                width=24,
            ),
        ),
    )


def unit_economics() -> Dashboard:
    filters = where("cluster", "team", "product", "model")
    per_1m = "sum(cost_usd) * 1000000 / nullIf(sum(prompt_tokens + completion_tokens), 0)"
    return Dashboard(
        uid="gpuledger-unit-economics",
        title="gpuledger / Unit economics",
        description="Cost per 1M tokens: the cost of the pods that served each model, divided by "
        "the tokens they served (sums divided, never ratios averaged).",
        variables=(
            cluster_variable(),
            token_variable("team", "Team"),
            token_variable("product", "Product"),
            token_variable("model", "Model"),
        ),
        panels=(
            Panel(
                "Cost per 1M tokens by model",
                "timeseries",
                "SELECT $__timeInterval(window_start) AS time, model, "
                f"{per_1m} AS usd_per_1m_tokens "
                f"FROM {TOKEN_COSTS} WHERE {filters} GROUP BY time, model ORDER BY time, model",
                FORMAT_TIME_SERIES,
                unit="currencyUSD",
            ),
            Panel(
                "Cost per 1M tokens by team",
                "timeseries",
                "SELECT $__timeInterval(window_start) AS time, team, "
                f"{per_1m} AS usd_per_1m_tokens "
                f"FROM {TOKEN_COSTS} WHERE {filters} GROUP BY time, team ORDER BY time, team",
                FORMAT_TIME_SERIES,
                unit="currencyUSD",
            ),
            Panel(
                "Tokens per second by model",
                "timeseries",
                "SELECT $__timeInterval(window_start) AS time, model, "
                "sum(prompt_tokens + completion_tokens) / $__interval_s AS tokens_per_s "
                f"FROM {TOKEN_COSTS} WHERE {filters} GROUP BY time, model ORDER BY time, model",
                FORMAT_TIME_SERIES,
                unit="short",
            ),
            Panel(
                "Cost per 1M tokens by model and team",
                "table",
                "SELECT model, team, sum(cost_usd) AS usd, sum(prompt_tokens) AS prompt, "
                "sum(completion_tokens) AS completion, sum(requests) AS request_count, "
                "usd * 1000000 / nullIf(prompt + completion, 0) AS usd_per_1m_tokens "
                f"FROM {TOKEN_COSTS} WHERE {filters} "
                "GROUP BY model, team ORDER BY usd DESC, model, team",
                FORMAT_TABLE,
                unit="currencyUSD",
            ),
        ),
    )


def gpu_efficiency() -> Dashboard:
    filters = where("cluster", "node")
    device_rows = f"{filters} AND kind = 'idle'"  # one idle row per (window, device)
    return Dashboard(
        uid="gpuledger-gpu-efficiency",
        title="gpuledger / GPU efficiency",
        description="How busy the GPUs are and what their idle time costs. Device-level figures "
        "come from the one idle row each (window, device) has.",
        variables=(cluster_variable(), cost_variable("node", "Node")),
        panels=(
            Panel(
                "SM utilisation by node",
                "timeseries",
                "SELECT $__timeInterval(window_start) AS time, node, "
                f"sum(sm_util_avg * {WINDOW_S}) / sum({WINDOW_S}) AS sm_util_pct "
                f"FROM {COSTS} WHERE {device_rows} GROUP BY time, node ORDER BY time, node",
                FORMAT_TIME_SERIES,
                unit="percent",
                description="Device SM utilisation, time-weighted over the node's GPUs and MIG "
                "instances.",
            ),
            Panel(
                "GPU memory in use by node",
                "timeseries",
                "SELECT $__timeInterval(window_start) AS time, node, "
                "sum(mem_bytes_avg) / uniqExact(window_start) AS mem_used_bytes "
                f"FROM {COSTS} WHERE {device_rows} GROUP BY time, node ORDER BY time, node",
                FORMAT_TIME_SERIES,
                unit="bytes",
                description="Average memory in use over the node's devices.",
            ),
            Panel(
                "Idle burn by node",
                "timeseries",
                "SELECT $__timeInterval(window_start) AS time, node, "
                "toFloat64(sum(idle_cost_usd)) * 3600 "
                f"/ (uniqExact(window_start) * max({WINDOW_S})) "
                f"AS idle_usd_per_hour FROM {COSTS} WHERE {filters} "
                "GROUP BY time, node ORDER BY time, node",
                FORMAT_TIME_SERIES,
                unit="currencyUSD",
                description="USD per hour that the node's GPUs cost while no process used them.",
            ),
            Panel(
                "Idle burn by device",
                "table",
                "SELECT node, device_uuid, gpu_model, mig_profile, "
                "sum(idle_cost_usd) AS idle_usd, "
                f"uniqExact(window_start) * max({WINDOW_S}) / 3600 AS hours_metered, "
                "toFloat64(sum(idle_cost_usd)) / hours_metered AS idle_usd_per_hour, "
                "100 * sum(idle_cost_usd) / nullIf(sum(cost_usd), 0) AS idle_share_pct "
                f"FROM {COSTS} WHERE {filters} "
                "GROUP BY node, device_uuid, gpu_model, mig_profile "
                "ORDER BY idle_usd_per_hour DESC, node, device_uuid",
                FORMAT_TABLE,
                unit="currencyUSD",
                width=24,
            ),
        ),
    )


def tag_compliance() -> Dashboard:
    filters = where("cluster")
    return Dashboard(
        uid="gpuledger-tag-compliance",
        title="gpuledger / Tag compliance",
        description="Pod cost that no team, product or cost-centre label accounts for, and the "
        "namespaces and pods it comes from.",
        variables=(cluster_variable(),),
        panels=(
            Panel(
                "Untagged pod cost",
                "stat",
                f"SELECT sumIf(cost_usd, {UNTAGGED_USAGE}) AS untagged_usd, "
                f"100 * sumIf(cost_usd, {UNTAGGED_USAGE}) / nullIf(sum(cost_usd), 0) "
                "AS share_of_total_pct, "
                f"100 * sumIf(cost_usd, {UNTAGGED_USAGE}) "
                "/ nullIf(sumIf(cost_usd, kind = 'usage'), 0) "
                f"AS share_of_pod_cost_pct FROM {COSTS} WHERE {filters}",
                FORMAT_TABLE,
                unit="none",
                width=24,
                height=5,
                decimals=2,
            ),
            Panel(
                "Untagged cost over time",
                "timeseries",
                "SELECT $__timeInterval(window_start) AS time, "
                f"sumIf(cost_usd, {UNTAGGED_USAGE}) AS untagged_usd, "
                f"sumIf(cost_usd, kind = 'usage') - untagged_usd AS tagged_usd "
                f"FROM {COSTS} WHERE {filters} GROUP BY time ORDER BY time",
                FORMAT_TIME_SERIES,
                unit="currencyUSD",
                width=24,
                options={"stacking": "normal"},
            ),
            Panel(
                "Top namespaces by untagged cost",
                "table",
                f"SELECT namespace, sum(cost_usd) AS untagged_usd, "
                "100 * untagged_usd / sum(sum(cost_usd)) OVER () AS share_of_untagged_pct, "
                f"uniqExact(pod_uid) AS pods, {MISSING_KEYS} AS missing_labels "
                f"FROM {COSTS} WHERE {filters} AND {UNTAGGED_USAGE} "
                "GROUP BY namespace ORDER BY untagged_usd DESC, namespace LIMIT 20",
                FORMAT_TABLE,
                unit="currencyUSD",
            ),
            Panel(
                "Top untagged pods",
                "table",
                f"SELECT namespace, pod, pod_uid, sum(cost_usd) AS untagged_usd, "
                f"{MISSING_KEYS} AS missing_labels "
                f"FROM {COSTS} WHERE {filters} AND {UNTAGGED_USAGE} "
                "GROUP BY namespace, pod, pod_uid ORDER BY untagged_usd DESC, namespace, pod "
                "LIMIT 50",
                FORMAT_TABLE,
                unit="currencyUSD",
            ),
        ),
    )


def billing_reconciliation() -> Dashboard:
    filters = where("cluster", "team", time_column="hour")
    gpu_rows = f"{BILLED} WHERE {NEWEST} AND {GPU_KINDS} AND {filters}"
    versus = (
        "sum(metered_cost_usd) AS metered_usd, sum(effective_cost) AS effective, "
        "effective - metered_usd AS variance, "
        "100 * variance / nullIf(metered_usd, 0) AS variance_pct"
    )
    return Dashboard(
        uid="gpuledger-billing-reconciliation",
        title="gpuledger / Billing reconciliation",
        description="The provider's bill (EffectiveCost, newest version of each bill slice) "
        "allocated over the metered GPU rows, beside their price-book cost; the bill's GPU "
        "instances nothing metered, the non-GPU part of GPU instances, and metered nodes the "
        "bill has no line for. Amounts in the bill's currency.",
        variables=(cluster_variable(), cost_variable("team", "Team")),
        panels=(
            Panel(
                "Bill in range",
                "stat",
                "SELECT billing_currency AS currency, sum(effective_cost) AS bill_total, "
                f"sumIf(effective_cost, {GPU_KINDS}) AS gpu_users, "
                f"sumIf(metered_cost_usd, {GPU_KINDS}) AS metered_usd, "
                f"sumIf(effective_cost, kind = '{KIND_NON_GPU}') AS non_gpu_part, "
                f"sumIf(effective_cost, kind = '{KIND_UNMETERED}') AS unmetered "
                f"FROM {BILLED} WHERE {NEWEST} AND {where('cluster', time_column='hour')} "
                "GROUP BY currency ORDER BY currency",
                FORMAT_TABLE,
                description="bill total = GPU users + non-GPU part + unmetered; metered: the "
                "price-book cost of the rows the GPU users' part was allocated over. With a "
                "cluster selected, unmetered instances (no cluster) drop out.",
                width=24,
                height=5,
                decimals=2,
            ),
            Panel(
                "Billed vs metered cost by team",
                "table",
                f"SELECT {LINE.format(dim='team')} AS team, billing_currency AS currency, "
                f"{versus}, sum(billed_cost) AS invoiced FROM {gpu_rows} "
                "GROUP BY team, currency ORDER BY effective DESC, team, currency",
                FORMAT_TABLE,
                description="Billed basis: each team's share of the bill's EffectiveCost (and "
                "BilledCost, invoiced) beside the price-book cost of the same rows.",
                width=24,
            ),
            Panel(
                "Billed vs metered over time",
                "timeseries",
                "SELECT $__timeInterval(hour) AS time, sum(effective_cost) AS billed, "
                f"sum(metered_cost_usd) AS metered FROM {gpu_rows} GROUP BY time ORDER BY time",
                FORMAT_TIME_SERIES,
                description="The GPU users' part of the bill and its price-book cost.",
            ),
            Panel(
                "Variance by GPU model and pricing class",
                "table",
                "SELECT gpu_model, mig_profile, pricing, billing_currency AS currency, "
                f"sum(device_seconds) / 3600 AS device_hours, {versus}, "
                "toFloat64(metered_usd) / nullIf(device_hours, 0) AS book_rate, "
                "toFloat64(effective) / nullIf(device_hours, 0) AS bill_rate "
                f"FROM {gpu_rows} GROUP BY gpu_model, mig_profile, pricing, currency "
                "ORDER BY abs(variance) DESC, gpu_model, mig_profile, pricing",
                FORMAT_TABLE,
                description="Rates per device-hour; variance = billed - metered, in percent "
                "of metered. Compare only where the bill is in the price book's currency.",
            ),
            Panel(
                "Unmetered GPU spend",
                "table",
                "SELECT resource_key, instance_type, billing_currency AS currency, "
                "uniqExact(hour) AS charge_hours, sum(effective_cost) AS effective "
                f"FROM {BILLED} WHERE {NEWEST} AND kind = '{KIND_UNMETERED}' "
                "AND $__timeFilter(hour) GROUP BY resource_key, instance_type, currency "
                "ORDER BY effective DESC, resource_key",
                FORMAT_TABLE,
                description="GPU instances on the bill with no metering: no agent ran there. "
                "charge_hours: hours in which a charge starts.",
            ),
            Panel(
                "Non-GPU part of GPU instances",
                "table",
                "SELECT cluster, node, resource_key, instance_type, billing_currency AS currency, "
                f"sum(effective_cost) AS effective FROM {BILLED} WHERE {NEWEST} "
                f"AND kind = '{KIND_NON_GPU}' AND {where('cluster', time_column='hour')} "
                "GROUP BY cluster, node, resource_key, instance_type, currency "
                "ORDER BY effective DESC, cluster, node",
                FORMAT_TABLE,
                description="What the non-GPU rule keeps off the GPU users (vCPUs, memory).",
            ),
            Panel(
                "Metered nodes without a bill line",
                "table",
                f"SELECT cluster, node, uniqExact({HOUR}) AS hours, sum(cost_usd) AS metered_usd "
                f"FROM {COSTS} WHERE {where('cluster')} AND {IN_BILL_PERIODS} "
                f"AND ({HOUR}, cluster, node) NOT IN (SELECT hour, cluster, node FROM {BILLED} "
                f"WHERE {NEWEST}) GROUP BY cluster, node ORDER BY metered_usd DESC, cluster, node",
                FORMAT_TABLE,
                unit="currencyUSD",
                description="Node-hours inside the imported bills' periods that the meter saw "
                "and no bill line covers (another account, or a bill not imported yet).",
            ),
            Panel(
                "Bill slices: newest version",
                "table",
                "SELECT slice, provider, billing_account_id, billing_period_start, "
                "billing_period_end, billing_currency AS currency, version AS newest_version, "
                "imported_at, lines AS bill_lines FROM gpuledger.bill_versions FINAL "
                f"WHERE {NEWEST} AND billing_period_end > $__fromTime "
                "AND billing_period_start <= $__toTime "
                "ORDER BY billing_period_start DESC, slice",
                FORMAT_TABLE,
                description="Per slice (provider, billing account, month), the newest finished "
                "import: what every panel here reads.",
                width=24,
            ),
        ),
    )


# --- the Prometheus dashboard: the worker's budget and forecast gauges (--budgets) -------------

PROM_TYPE = "prometheus"
PROM_DATASOURCE_UID = "gpuledger-prometheus"  # provisioning/datasources/gpuledger.yaml
PROM_DATASOURCE = {"type": PROM_TYPE, "uid": "${datasource}"}
OWNER = 'dimension=~"$dimension",owner=~"$owner"'


@dataclass(frozen=True)
class PromTarget:
    expr: str
    legend: str


@dataclass(frozen=True)
class PromPanel:
    title: str
    kind: str  # Grafana panel type
    targets: tuple[PromTarget, ...]
    unit: str = "currencyUSD"
    description: str = ""
    width: int = 12
    height: int = 8
    repeat: str | None = None  # a panel per value of this variable
    band: tuple[str, str] | None = None  # (upper, lower) series: fill between them


@dataclass(frozen=True)
class PromVariable:
    name: str
    label: str
    query: str  # label_values(...)


@dataclass(frozen=True)
class PromDashboard:
    uid: str
    title: str
    description: str
    variables: tuple[PromVariable, ...]
    panels: tuple[PromPanel, ...]
    tags: tuple[str, ...] = ("gpuledger",)


def budgets() -> PromDashboard:
    return PromDashboard(
        uid="gpuledger-budgets",
        title="gpuledger / Budgets and forecast",
        description="Each owner's month to date against its monthly budget, and the month-end "
        "forecast with its 80 % prediction interval, from the worker's gauges (worker option "
        "--budgets; `gpuledger report budget` for the same figures from the command line).",
        variables=(
            PromVariable(
                "dimension",
                "Dimension",
                "label_values(gpuledger_budget_month_to_date_usd, dimension)",
            ),
            PromVariable(
                "owner",
                "Owner",
                'label_values(gpuledger_budget_month_to_date_usd{dimension=~"$dimension"}, owner)',
            ),
        ),
        panels=(
            PromPanel(
                "Month to date vs budget",
                "timeseries",
                (
                    PromTarget(
                        f"gpuledger_budget_month_to_date_usd{{{OWNER}}}",
                        "{{dimension}} {{owner}}: to date",
                    ),
                    PromTarget(
                        f"gpuledger_budget_usd{{{OWNER}}}", "{{dimension}} {{owner}}: budget"
                    ),
                ),
                description="GPU cost this month so far, beside each budget (owners without a "
                "budget show their month to date alone).",
            ),
            PromPanel(
                "Budget used",
                "bargauge",
                (
                    PromTarget(
                        f"100 * gpuledger_budget_month_to_date_usd{{{OWNER}}} "
                        f"/ on (dimension, owner) gpuledger_budget_usd{{{OWNER}}}",
                        "{{dimension}} {{owner}}",
                    ),
                ),
                unit="percent",
                description="Month to date as a share of the monthly budget.",
            ),
            PromPanel(
                "Month-end forecast as % of budget",
                "bargauge",
                (
                    PromTarget(
                        f"100 * gpuledger_forecast_usd{{{OWNER}}} "
                        f"/ on (dimension, owner) gpuledger_budget_usd{{{OWNER}}}",
                        "{{dimension}} {{owner}}",
                    ),
                ),
                unit="percent",
                description="The month-end point forecast as a share of the budget; the alert "
                "GpuledgerBudgetForecastOverrun fires at each threshold it reaches.",
            ),
            PromPanel(
                "Since the last refresh",
                "stat",
                (
                    PromTarget(
                        "time() - max(gpuledger_budget_last_refresh_timestamp_seconds)",
                        "last refresh",
                    ),
                ),
                unit="s",
                description="How old the figures are: the worker refreshes them every "
                "--budget-interval (300 s by default) and keeps the last ones when a refresh "
                "fails (gpuledger_budget_refresh_failures_total).",
            ),
            PromPanel(
                "Month-end forecast: $owner",
                "timeseries",
                (
                    PromTarget(f"gpuledger_forecast_usd{{{OWNER}}}", "forecast"),
                    PromTarget(f"gpuledger_forecast_high80_usd{{{OWNER}}}", "80 % high"),
                    PromTarget(f"gpuledger_forecast_low80_usd{{{OWNER}}}", "80 % low"),
                    PromTarget(f"gpuledger_budget_usd{{{OWNER}}}", "budget"),
                    PromTarget(f"gpuledger_budget_month_to_date_usd{{{OWNER}}}", "to date"),
                ),
                description="The month-end point forecast with its 80 % prediction interval "
                "(shaded), the budget and the month to date, as each refresh saw them.",
                width=24,
                repeat="owner",
                band=("80 % high", "80 % low"),
            ),
        ),
    )


def prom_variable_json(var: PromVariable) -> dict[str, Any]:
    return {
        "name": var.name,
        "label": var.label,
        "type": "query",
        "datasource": PROM_DATASOURCE,
        "query": {"query": var.query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "definition": var.query,
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".+",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def prom_panel_json(panel: PromPanel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    overrides: list[dict[str, Any]] = []
    if panel.band is not None:
        upper, lower = panel.band
        overrides = [
            {
                "matcher": {"id": "byName", "options": upper},
                "properties": [
                    {"id": "custom.fillBelowTo", "value": lower},
                    {"id": "custom.lineWidth", "value": 0},
                ],
            },
            {
                "matcher": {"id": "byName", "options": lower},
                "properties": [{"id": "custom.lineWidth", "value": 0}],
            },
        ]
    options: dict[str, Any] = {}
    if panel.kind in ("bargauge", "stat"):
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    out: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": PROM_DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": panel.height},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": overrides},
        "options": options,
        "targets": [
            {
                "refId": chr(ord("A") + n),
                "datasource": PROM_DATASOURCE,
                "editorMode": "code",
                "expr": target.expr,
                "legendFormat": target.legend,
                "range": True,
            }
            for n, target in enumerate(panel.targets)
        ],
    }
    if panel.repeat:
        out |= {"repeat": panel.repeat, "repeatDirection": "h", "maxPerRow": 2}
    return out


DASHBOARDS = {
    "showback.json": showback,
    "unit-economics.json": unit_economics,
    "gpu-efficiency.json": gpu_efficiency,
    "tag-compliance.json": tag_compliance,
    "billing-reconciliation.json": billing_reconciliation,
    "budgets.json": budgets,
}


def variable_json(var: Variable) -> dict[str, Any]:
    return {
        "name": var.name,
        "label": var.label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": var.sql,
        "definition": var.sql,
        "refresh": 2,  # on time range change
        "multi": True,
        "includeAll": True,
        "allValue": ALL_VALUE,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def datasource_variable(prometheus: bool = False) -> dict[str, Any]:
    if prometheus:
        label, kind, text, uid = (
            "Prometheus",
            PROM_TYPE,
            "gpuledger Prometheus",
            PROM_DATASOURCE_UID,
        )
    else:
        label, kind, text, uid = "ClickHouse", PLUGIN_TYPE, "gpuledger ClickHouse", DATASOURCE_UID
    return {
        "name": "datasource",
        "label": label,
        "type": "datasource",
        "query": kind,
        "current": {"selected": True, "text": text, "value": uid},
        "hide": 0,
    }


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.decimals is not None:
        defaults["decimals"] = panel.decimals
    custom: dict[str, Any] = {}
    if "stacking" in panel.options:
        custom["stacking"] = {"mode": panel.options["stacking"], "group": "A"}
    if custom:
        defaults["custom"] = custom
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": panel.height},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {},
        "targets": [
            {
                "refId": "A",
                "datasource": DATASOURCE,
                "editorType": "sql",
                "format": panel.query_format,
                "queryType": "timeseries" if panel.query_format == FORMAT_TIME_SERIES else "table",
                "rawSql": panel.sql,
            }
        ],
    }


def dashboard_json(dash: Dashboard | PromDashboard) -> dict[str, Any]:
    panels = []
    x = y = row_height = 0
    prometheus = isinstance(dash, PromDashboard)
    for panel_id, panel in enumerate(dash.panels, start=1):
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        if isinstance(panel, PromPanel):
            panels.append(prom_panel_json(panel, panel_id, x, y))
        else:
            panels.append(panel_json(panel, panel_id, x, y))
        x += panel.width
        row_height = max(row_height, panel.height)
    return {
        "uid": dash.uid,
        "title": dash.title,
        "description": dash.description,
        "tags": list(dash.tags),
        "timezone": "utc",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "1m",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                datasource_variable(prometheus),
                *(
                    prom_variable_json(v) if isinstance(v, PromVariable) else variable_json(v)
                    for v in dash.variables
                ),
            ]
        },
        "annotations": {"list": []},
        "links": [
            {"type": "dashboards", "tags": ["gpuledger"], "asDropdown": True, "title": "gpuledger"}
        ],
        "panels": panels,
    }


def rendered() -> dict[str, str]:
    """File name -> the JSON text this script writes."""
    return {
        name: json.dumps(dashboard_json(build()), indent=2) + "\n"
        for name, build in DASHBOARDS.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if the JSON files are stale")
    args = parser.parse_args(argv)
    stale = []
    for name, text in rendered().items():
        path = DASHBOARD_DIR / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"stale dashboards: {', '.join(stale)}; run {Path(__file__).name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

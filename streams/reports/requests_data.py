"""The request-vs-usage report from ClickHouse: showback for the usage side; for the request
side, each node-hour's GPU money per device class (the cost source showback reads, rollups or
base rows), the pods' GPU requests (pod_gpu_requests) and the nodes' capacity (node_events),
read a day at a time with bounded queries and split by streams.reports.requests."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

from streams.reports.limits import MAX_SOURCE_ROWS, query_bounded
from streams.reports.params import DAY_MS, Period, check_choice, check_period
from streams.reports.requests import (
    CapacityReport,
    DevicePool,
    RequestAllocation,
    RequestEvent,
    allocate_requests,
    holds_from_events,
)
from streams.reports.requests_report import REQUEST_DIMENSIONS, RequestsReport, build_report
from streams.reports.showback import showback
from streams.reports.sources import ReadPlan, cost_source, read_plan
from streams.rollups import HOUR_MS, ms_literal
from streams.store import ClickHouseStore

_NARROW = "give a shorter period"


def requests_report(
    store: ClickHouseStore, period: Period, by: str = "team", *, use_rollups: bool = True
) -> RequestsReport:
    """Per owner (`by`: team, product, namespace or cost_center): showback's cost beside the
    request-based cost of the same money, the difference, and the (unrequested) line."""
    check_choice(by, REQUEST_DIMENSIONS, "--by")
    check_period(period)
    usage = showback(store, period, by, use_rollups=use_rollups)
    plan = read_plan(store, period.start_ms, period.end_ms, use_rollups=use_rollups)
    allocation = RequestAllocation()
    for day_start, day_end in _days(period):
        allocation = allocation.plus(
            allocate_requests(
                _pools(store, clip_plan(plan, day_start, day_end), period),
                holds_from_events(_request_events(store, by, day_start, day_end), day_end),
                _capacities(store, day_start, day_end),
            )
        )
    notes: list[str] = []
    if not _any_requests(store, period):
        notes.append(
            "no GPU requests recorded before the period ends (table pod_gpu_requests): every "
            "device reads as unrequested; the pod watcher and worker record them"
        )
    return build_report(period, by, usage, allocation, notes)


def _days(period: Period) -> Iterator[tuple[int, int]]:
    start = period.start_ms
    while start < period.end_ms:
        end = min(period.end_ms, start - start % DAY_MS + DAY_MS)
        yield start, end
        start = end


def clip_plan(plan: ReadPlan, start_ms: int, end_ms: int) -> ReadPlan:
    """The part of `plan` inside [start_ms, end_ms): the same rows, a day at a time."""
    r_from, r_to = max(plan.rollup_from_ms, start_ms), min(plan.rollup_to_ms, end_ms)
    if r_to <= r_from:
        r_from = r_to = start_ms
    base = tuple(
        (max(a, start_ms), min(b, end_ms))
        for a, b in plan.base_ranges_ms
        if min(b, end_ms) > max(a, start_ms)
    )
    return ReadPlan(r_from, r_to, base)


def _pools(store: ClickHouseStore, plan: ReadPlan, period: Period) -> list[DevicePool]:
    """Each (cluster, node, hour, device class)'s money, as showback's total counts it, and
    its distinct devices; the span is the hour inside the period."""
    rows = query_bounded(
        store,
        "SELECT cluster, node, mig_profile, toInt64(toUnixTimestamp(hour)) * 1000 AS hour_ms, "
        f"sum(cost_usd), uniqExact(device_uuid) FROM {cost_source(store.database, plan)} "
        "GROUP BY cluster, node, mig_profile, hour_ms ORDER BY cluster, node, hour_ms, "
        "mig_profile",
        limit=MAX_SOURCE_ROWS,
        what="the request-based cost of one day (node, hour, device class)",
        narrow=_NARROW,
    )
    return [
        DevicePool(
            str(cluster),
            str(node),
            str(profile),
            max(int(hour_ms), period.start_ms),
            min(int(hour_ms) + HOUR_MS, period.end_ms),
            Decimal(cost or 0),
            int(devices),
        )
        for cluster, node, profile, hour_ms, cost, devices in rows
    ]


def _request_events(
    store: ClickHouseStore, by: str, start_ms: int, end_ms: int
) -> list[RequestEvent]:
    """The requests in force when the day starts (each pod's latest event at or before it,
    when it holds something) and every event during the day."""
    db = store.database
    latest = "(time, event_id)"
    rows = query_bounded(
        store,
        f"SELECT c, n, u, o, r, t FROM ("
        f"SELECT cluster AS c, argMax(node, {latest}) AS n, pod_uid AS u, "
        f"argMax({by}, {latest}) AS o, argMax(requests, {latest}) AS r, "
        f"toUnixTimestamp64Milli(max(time)) AS t, '' AS e "
        f"FROM {db}.pod_gpu_requests FINAL WHERE time <= {ms_literal(start_ms)} "
        "GROUP BY cluster, pod_uid HAVING notEmpty(r) "
        f"UNION ALL SELECT cluster, node, pod_uid, {by}, requests, "
        f"toUnixTimestamp64Milli(time), event_id FROM {db}.pod_gpu_requests FINAL "
        f"WHERE time > {ms_literal(start_ms)} AND time < {ms_literal(end_ms)}"
        ") ORDER BY c, u, t, e",
        limit=MAX_SOURCE_ROWS,
        what="the GPU requests of one day (pod events)",
        narrow=_NARROW,
    )
    return [
        RequestEvent(
            str(cluster),
            str(node),
            str(pod_uid),
            str(owner),
            tuple(sorted((str(k), int(v)) for k, v in dict(requests).items())),
            int(time_ms),
        )
        for cluster, node, pod_uid, owner, requests, time_ms in rows
    ]


def _capacities(
    store: ClickHouseStore, start_ms: int, end_ms: int
) -> dict[tuple[str, str], list[CapacityReport]]:
    """Each node's capacity report in force when the day starts and those during the day."""
    db = store.database
    latest = "(time, event_id)"
    rows = query_bounded(
        store,
        f"SELECT c, n, t, g FROM ("
        f"SELECT cluster AS c, node AS n, toUnixTimestamp64Milli(max(time)) AS t, "
        f"argMax(gpu_capacity, {latest}) AS g FROM {db}.node_events FINAL "
        f"WHERE time <= {ms_literal(start_ms)} GROUP BY cluster, node "
        f"UNION ALL SELECT cluster, node, toUnixTimestamp64Milli(time), gpu_capacity "
        f"FROM {db}.node_events FINAL WHERE time > {ms_literal(start_ms)} "
        f"AND time < {ms_literal(end_ms)}) ORDER BY c, n, t",
        limit=MAX_SOURCE_ROWS,
        what="the node capacity reports of one day",
        narrow=_NARROW,
    )
    out: dict[tuple[str, str], list[CapacityReport]] = {}
    for cluster, node, time_ms, capacity in rows:
        report = CapacityReport(
            str(cluster),
            str(node),
            int(time_ms),
            tuple(sorted((str(k), int(v)) for k, v in dict(capacity).items())),
        )
        out.setdefault((report.cluster, report.node), []).append(report)
    return out


def _any_requests(store: ClickHouseStore, period: Period) -> bool:
    rows = store.query_rows(
        f"SELECT count() > 0 FROM {store.database}.pod_gpu_requests "
        f"WHERE time < {ms_literal(period.end_ms)} LIMIT 1"
    )
    return bool(rows and rows[0][0])

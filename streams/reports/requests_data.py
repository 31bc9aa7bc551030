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
    profile_class,
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
    # What is in force when the period starts is read once; each day then reads its own
    # events, (day start, day end], and carries the latest state into the next day.
    pods = {(e.cluster, e.pod_uid): e for e in _requests_in_force(store, by, period.start_ms)}
    nodes = {(c.cluster, c.node): c for c in _capacity_in_force(store, period.start_ms)}
    allocation = RequestAllocation()
    for day_start, day_end in _days(period):
        events = _request_events(store, by, day_start, day_end)
        reports = _capacity_reports(store, day_start, day_end)
        capacities: dict[tuple[str, str], list[CapacityReport]] = {}
        for report in (*nodes.values(), *reports):
            capacities.setdefault((report.cluster, report.node), []).append(report)
        allocation = allocation.plus(
            allocate_requests(
                _pools(store, clip_plan(plan, day_start, day_end), period),
                holds_from_events([*pods.values(), *events], day_end),
                capacities,
            )
        )
        pods.update(((e.cluster, e.pod_uid), e) for e in events)  # time order: the last wins
        pods = {key: e for key, e in pods.items() if e.requests}
        nodes.update(((c.cluster, c.node), c) for c in reports)
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
            profile_class(str(profile)),
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
    """Every pod event in (start_ms, end_ms], in time order."""
    window = f"time > {ms_literal(start_ms)} AND time <= {ms_literal(end_ms)}"
    return _events(
        store,
        f"SELECT cluster, node, pod_uid, {by}, requests, toUnixTimestamp64Milli(time) AS t, "
        f"event_id FROM {store.database}.pod_gpu_requests FINAL WHERE {window} "
        "ORDER BY cluster, pod_uid, t, event_id",
        what="the GPU requests of one day (pod events)",
    )


def _requests_in_force(store: ClickHouseStore, by: str, at_ms: int) -> list[RequestEvent]:
    """Each pod's latest event at or before `at_ms`, when it holds something then."""
    latest = "(time, event_id)"
    return _events(
        store,
        f"SELECT cluster, argMax(node, {latest}), pod_uid, argMax({by}, {latest}), "
        f"argMax(requests, {latest}) AS held, toUnixTimestamp64Milli(max(time)) "
        f"FROM {store.database}.pod_gpu_requests FINAL WHERE time <= {ms_literal(at_ms)} "
        "GROUP BY cluster, pod_uid HAVING notEmpty(held) ORDER BY cluster, pod_uid",
        what="the GPU requests in force when the period starts (pods)",
    )


def _events(store: ClickHouseStore, sql: str, *, what: str) -> list[RequestEvent]:
    rows = query_bounded(store, sql, limit=MAX_SOURCE_ROWS, what=what, narrow=_NARROW)
    return [
        RequestEvent(
            str(row[0]),
            str(row[1]),
            str(row[2]),
            str(row[3]),
            tuple(sorted((str(k), int(v)) for k, v in dict(row[4]).items())),
            int(row[5]),
        )
        for row in rows
    ]


def _capacity_reports(store: ClickHouseStore, start_ms: int, end_ms: int) -> list[CapacityReport]:
    """The nodes' capacity reports in (start_ms, end_ms], in time order."""
    window = f"time > {ms_literal(start_ms)} AND time <= {ms_literal(end_ms)}"
    return _capacity(
        store,
        f"SELECT cluster, node, toUnixTimestamp64Milli(time) AS t, gpu_capacity "
        f"FROM {store.database}.node_events FINAL WHERE {window} ORDER BY cluster, node, t, "
        "event_id",
        what="the node capacity reports of one day",
    )


def _capacity_in_force(store: ClickHouseStore, at_ms: int) -> list[CapacityReport]:
    """Each node's latest report at or before `at_ms`."""
    latest = "(time, event_id)"
    return _capacity(
        store,
        f"SELECT cluster, node, toUnixTimestamp64Milli(max(time)), "
        f"argMax(gpu_capacity, {latest}) FROM {store.database}.node_events FINAL "
        f"WHERE time <= {ms_literal(at_ms)} GROUP BY cluster, node ORDER BY cluster, node",
        what="the node capacity reports in force when the period starts",
    )


def _capacity(store: ClickHouseStore, sql: str, *, what: str) -> list[CapacityReport]:
    rows = query_bounded(store, sql, limit=MAX_SOURCE_ROWS, what=what, narrow=_NARROW)
    return [
        CapacityReport(
            str(cluster),
            str(node),
            int(time_ms),
            tuple(sorted((str(k), int(v)) for k, v in dict(capacity).items())),
        )
        for cluster, node, time_ms, capacity in rows
    ]


def _any_requests(store: ClickHouseStore, period: Period) -> bool:
    rows = store.query_rows(
        f"SELECT count() > 0 FROM {store.database}.pod_gpu_requests "
        f"WHERE time < {ms_literal(period.end_ms)} LIMIT 1"
    )
    return bool(rows and rows[0][0])

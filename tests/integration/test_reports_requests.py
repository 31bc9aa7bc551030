"""`streams.reports.requests_data.requests_report` on the embedded ClickHouse, over a generated
month (November 2026, 720 hours) whose answers are known, with cost rows, pod GPU requests and
node capacity reports inserted directly:

- n1: 2 whole H100s at 4.00/h, capacity 2. alpha's pod uses GPU 1 and requests 1; zeta's pod
  requests 1 and uses none (GPU 2 is idle all month).
- ts: 8 GPUs at 2.00/h time-sliced 4 ways, capacity 32 of nvidia.com/gpu. beta's pod requests
  16 replicas (half the node) and uses one GPU; the other 7 are idle. Pending before it starts.
- m1: an A100 as two 3g.40gb MIG instances at 1.50/h. gamma's pod requests one and uses it;
  delta's pod uses the other with no GPU request at all.
- n3: 1 GPU at 3.00/h, no capacity reported. eps's pod requests it from the month's start and
  finishes at 10:30 on day one; the GPU is idle after that.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from row_builders import cost_row
from test_reports_data import HOUR_MS, MIN_MS, T0_MS, fresh_store

from runtime.errors import ConfigError
from streams.reports.params import Period
from streams.reports.render import to_csv, to_json, to_table
from streams.reports.requests_data import requests_report
from streams.reports.showback import showback
from streams.rollups import seal_hours
from streams.rows import HOST, IDLE, UNTAGGED, CostRow
from streams.store import ClickHouseStore

HOURS = 720
MONTH = Period(T0_MS, T0_MS + HOURS * HOUR_MS)
GPU, MIG = "nvidia.com/gpu", "nvidia.com/mig-3g.40gb"
POD_OWNERS = {  # pod_uid: (namespace, team)
    "u-alpha": ("serve", "alpha"),
    "u-zeta": ("serve", "zeta"),
    "u-beta": ("train", "beta"),
    "u-gamma": ("serve", "gamma"),
    "u-delta": ("lab", "delta"),
    "u-eps": ("batch", "eps"),
}
USAGE = {
    "alpha": Decimal(2880),
    "beta": Decimal(1440),
    "gamma": Decimal(1080),
    "delta": Decimal(1080),
    "eps": Decimal("31.5"),
}
IDLE_USD = Decimal(2880) + Decimal(10080) + Decimal("2128.5")
REQUESTS = {
    "alpha": Decimal(2880),
    "zeta": Decimal(2880),
    "beta": Decimal(5760),
    "gamma": Decimal(1080),
    "eps": Decimal("31.5"),
}
UNREQUESTED = Decimal(5760) + Decimal(1080) + Decimal("2128.5")
TOTAL = Decimal(21600)  # 30.00 an hour for 720 hours


def _row(hour: int, node: str, device: str, cost: str, pod_uid: str = "", **kw: Any) -> CostRow:
    start = T0_MS + hour * HOUR_MS
    minutes = kw.pop("minutes", 60)
    if pod_uid:
        namespace, team = POD_OWNERS[pod_uid]
        owner = dict(namespace=namespace, pod=pod_uid[2:], team=team, kind="usage")
    else:
        owner = dict(namespace=IDLE, pod=IDLE, team=IDLE, kind="idle")
    columns: dict[str, Any] = dict(
        window_end_ms=start + minutes * MIN_MS,
        node=node,
        pod_uid=pod_uid or IDLE,
        product=UNTAGGED,
        cost_center=UNTAGGED,
        device_seconds=60.0 * minutes,
        cost_usd=Decimal(cost),
    )
    return cost_row(start, device, **{**columns, **owner, **kw})


def month_cost_rows() -> list[CostRow]:
    rows: list[CostRow] = []
    for h in range(HOURS):
        rows += [_row(h, "n1", "n1-g1", "4", "u-alpha"), _row(h, "n1", "n1-g2", "4")]
        rows.append(_row(h, "ts", "ts-g0", "2", "u-beta"))
        rows += [_row(h, "ts", f"ts-g{i}", "2") for i in range(1, 8)]
        mig = dict(gpu_uuid="m1-a100", mig_profile="3g.40gb", gpu_model="A100")
        rows.append(_row(h, "m1", "m1-mig1", "1.5", "u-gamma", **mig))
        rows.append(_row(h, "m1", "m1-mig2", "1.5", "u-delta", **mig))
        if h < 10:
            rows.append(_row(h, "n3", "n3-g1", "3", "u-eps"))
        elif h == 10:  # eps finished at 10:30: its half hour and the idle half
            rows += [
                _row(h, "n3", "n3-g1", "1.5", "u-eps", minutes=30),
                _row(h, "n3", "n3-g1", "1.5"),
            ]
        else:
            rows.append(_row(h, "n3", "n3-g1", "3"))
    return rows


REQUEST_COLUMNS = [
    "cluster", "node", "namespace", "pod", "pod_uid", "team", "product", "cost_center",
    "requests", "time", "event_id",
]  # fmt: skip


def request_values() -> list[tuple[Any, ...]]:
    def event(uid: str, node: str, requests: dict[str, int], at_ms: int, n: int) -> tuple[Any, ...]:
        namespace, team = POD_OWNERS[uid]
        return ("c1", node, namespace, uid[2:], uid, team, UNTAGGED, UNTAGGED, requests, at_ms,
                f"e{n}")  # fmt: skip

    return [
        event("u-alpha", "n1", {GPU: 1}, T0_MS - HOUR_MS, 1),  # created before the month
        event("u-zeta", "n1", {GPU: 1}, T0_MS, 2),
        event("u-beta", "", {GPU: 16}, T0_MS - 10 * MIN_MS, 3),  # pending: on no node yet
        event("u-beta", "ts", {GPU: 16}, T0_MS, 4),
        event("u-gamma", "m1", {MIG: 1}, T0_MS - 3 * 86_400_000, 5),
        event("u-eps", "n3", {GPU: 1}, T0_MS, 6),
        event("u-eps", "n3", {}, T0_MS + 10 * HOUR_MS + 30 * MIN_MS, 7),  # finished mid-hour
        event("u-alpha", "n1", {GPU: 1}, T0_MS + 15 * 86_400_000, 8),  # a later event, same
    ]


NODE_COLUMNS = [
    "cluster", "node", "provider_id", "instance_type", "gpus", "cpu_millicores", "memory_bytes",
    "deleted", "time", "event_id", "gpu_capacity",
]  # fmt: skip


def node_values() -> list[tuple[Any, ...]]:
    before, day_two = T0_MS - 2 * 86_400_000, T0_MS + 86_400_000
    n1 = ("c1", "n1", "aws:///n1", "p5.4xlarge", 2, 16000, 2**36, 0)
    return [
        (*n1, before, "n1", {GPU: 2}),
        ("c1", "ts", "aws:///ts", "p4d.24xlarge", 8, 96000, 2**40, 0, before, "ts", {GPU: 32}),
        ("c1", "m1", "aws:///m1", "p4de.24xlarge", 1, 8000, 2**35, 0, before, "m1", {MIG: 2}),
        (*n1, day_two, "n1b", {GPU: 2}),  # reported again: the same capacity
    ]


def load_month(store: ClickHouseStore) -> None:
    store.insert_rows(month_cost_rows())
    store.insert_values("pod_gpu_requests", REQUEST_COLUMNS, request_values())
    store.insert_values("node_events", NODE_COLUMNS, node_values())


@pytest.fixture(scope="module")
def month() -> Iterator[ClickHouseStore]:
    store = fresh_store()
    load_month(store)
    try:
        yield store
    finally:
        store.command(f"DROP DATABASE IF EXISTS {store.database}")
        store.close()


def by_key(report: Any) -> dict[tuple[str, str], tuple[Decimal, Decimal]]:
    return {(line.line_kind, line.key): (line.usage_usd, line.request_usd) for line in report.lines}


def test_the_month_by_team_has_the_known_answers(month: ClickHouseStore) -> None:
    report = requests_report(month, MONTH, "team", use_rollups=False)
    lines = by_key(report)
    for team in ("alpha", "beta", "gamma", "delta", "eps", "zeta"):
        assert lines[("allocated", team)] == (
            USAGE.get(team, Decimal(0)),
            REQUESTS.get(team, Decimal(0)),
        ), team
    assert lines[("idle", "")] == (IDLE_USD, Decimal(0))
    assert lines[("unrequested", "")] == (Decimal(0), UNREQUESTED)
    assert report.usage_total_usd == report.request_total_usd == TOTAL
    assert report.reconciles and report.unrequested_usd == UNREQUESTED
    assert report.totals["request_usd"] == report.totals["usage_usd"] == TOTAL
    # The usage column is showback's, line for line.
    sb = showback(month, MONTH, "team", use_rollups=False)
    assert {(s.line_kind, s.key): s.cost_usd for s in sb.lines} == {
        k: u for k, (u, _) in lines.items() if u
    }
    beta = next(line for line in report.lines if line.key == "beta")
    assert beta.difference_usd == Decimal(4320) and beta.request_to_usage == Decimal("4.00")
    text = "\n".join(report.notes)
    assert "team beta requests far more than it uses" in text and "(4.00x)" in text
    assert "team delta used 1,080.00 of GPU time with no GPU request" in text
    assert "team zeta holds GPU requests it never used: 2,880.00 under requests" in text
    assert [line.request_to_usage for line in report.lines if line.line_kind != "allocated"] == [
        None,
        None,
    ]
    assert "no capacity reported for n3 nvidia.com/gpu (11 node-hour(s))" in text
    assert "beyond the node's capacity" not in text


def test_rollups_give_the_same_answer(month: ClickHouseStore) -> None:
    seal_hours(month, T0_MS + 400 * HOUR_MS + 3_600_000)  # seals the first 400 hours
    base = requests_report(month, MONTH, "team", use_rollups=False)
    rolled = requests_report(month, MONTH, "team")
    assert rolled.lines == base.lines and rolled.reconciles


def test_a_partial_day_and_the_pod_that_finished_mid_hour(month: ClickHouseStore) -> None:
    # 08:00 to 12:00 on day one: n3's 12.00 goes 7.50 to eps (2 hours and the half of hour 10
    # it held its GPU) and 4.50 unrequested.
    period = Period(T0_MS + 8 * HOUR_MS, T0_MS + 12 * HOUR_MS)
    report = requests_report(month, period, "team", use_rollups=False)
    lines = by_key(report)
    assert lines[("allocated", "eps")] == (Decimal("7.5"), Decimal("7.5"))
    # ts's unrequested half (32.00), m1's second instance (6.00) and n3's 4.50.
    assert lines[("unrequested", "")] == (Decimal(0), Decimal("42.5"))
    assert report.usage_total_usd == report.request_total_usd == Decimal(120) and report.reconciles


def test_by_namespace_and_cost_center(month: ClickHouseStore) -> None:
    report = requests_report(month, MONTH, "namespace", use_rollups=False)
    lines = by_key(report)
    assert lines[("allocated", "serve")] == (Decimal(2880 + 1080), Decimal(2880 * 2 + 1080))
    assert lines[("allocated", "lab")] == (Decimal(1080), Decimal(0))
    assert report.reconciles
    centres = requests_report(month, MONTH, "cost_center", use_rollups=False)
    # Every pod lacks a cost-centre label: one untagged line on both sides.
    assert by_key(centres)[("untagged", UNTAGGED)] == (
        sum(USAGE.values(), Decimal(0)),
        sum(REQUESTS.values(), Decimal(0)),
    )
    assert centres.reconciles


def test_time_sliced_oversubscription_is_scaled_down() -> None:
    store = fresh_store()
    try:
        store.insert_rows([_row(0, "ts", f"ts-g{i}", "2") for i in range(8)])
        store.insert_values("node_events", NODE_COLUMNS, node_values()[1:2])
        store.insert_values(
            "pod_gpu_requests",
            REQUEST_COLUMNS,
            [
                ("c1", "ts", "train", "b", "u-b", "beta", "", "", {GPU: 32}, T0_MS, "1"),
                ("c1", "ts", "serve", "a", "u-a", "alpha", "", "", {GPU: 16}, T0_MS, "2"),
            ],
        )
        report = requests_report(store, Period(T0_MS, T0_MS + HOUR_MS), "team")
        lines = by_key(report)
        # 48 replicas requested of 32: 32:16 of the node's 16.00, to the last 1e-15.
        assert lines[("allocated", "beta")][1] == Decimal("10.666666666666667")
        assert lines[("allocated", "alpha")][1] == Decimal("5.333333333333333")
        assert lines[("unrequested", "")][1] == 0 and report.reconciles
        assert any("ts nvidia.com/gpu up to 1.50x capacity" in n for n in report.notes)
    finally:
        store.command(f"DROP DATABASE IF EXISTS {store.database}")
        store.close()


def test_renders_and_refuses_bad_arguments(month: ClickHouseStore) -> None:
    report = requests_report(month, MONTH, "team", use_rollups=False)
    table = to_table(report)
    assert "(unrequested)" in table and "(idle GPU time)" in table and "+4,320.00" in table
    assert "21,600.00" in table and "reconciles" in table
    assert "beta,beta,allocated,1440" in to_csv(report).replace(".000000000000000", "")
    assert '"request_usd": "5760' in to_json(report)
    with pytest.raises(ConfigError, match="--by"):
        requests_report(month, MONTH, "model")
    with pytest.raises(ConfigError, match="400 days"):
        requests_report(month, Period(T0_MS, T0_MS + 401 * 86_400_000))


def test_no_requests_recorded_reads_all_unrequested() -> None:
    store = fresh_store()
    try:
        idle = _row(0, "n1", "n1-g1", "1")
        host = replace(idle, kind="host", pod_uid=HOST, pod=HOST, namespace=HOST, team=HOST)
        store.insert_rows([_row(0, "n1", "n1-g1", "3", "u-alpha"), host])
        report = requests_report(store, Period(T0_MS, T0_MS + HOUR_MS), "team")
        lines = by_key(report)
        assert lines[("host", "")] == (Decimal(1), Decimal(0))  # as showback shows it
        assert lines[("unrequested", "")] == (Decimal(0), Decimal(4))
        assert "(host processes, no pod)" in to_table(report)
        assert any("no GPU requests recorded" in n for n in report.notes)
    finally:
        store.command(f"DROP DATABASE IF EXISTS {store.database}")
        store.close()


def test_an_event_at_midnight_takes_effect_on_the_next_day() -> None:
    # Two days of n1 (8.00 an hour); alpha's pod holds 1 GPU, then 2 from midnight on day two.
    store = fresh_store()
    try:
        store.insert_rows(
            [_row(h, "n1", f"n1-g{g}", "4", "u-alpha") for h in range(48) for g in (1, 2)]
        )
        store.insert_values("node_events", NODE_COLUMNS, node_values()[:1])
        alpha = ("c1", "n1", "serve", "alpha", "u-alpha", "alpha", "", "")
        store.insert_values(
            "pod_gpu_requests",
            REQUEST_COLUMNS,
            [(*alpha, {GPU: 1}, T0_MS, "1"), (*alpha, {GPU: 2}, T0_MS + 86_400_000, "2")],
        )
        report = requests_report(store, Period(T0_MS, T0_MS + 2 * 86_400_000), "team")
        lines = by_key(report)
        assert lines[("allocated", "alpha")] == (Decimal(384), Decimal(96 + 192))
        assert lines[("unrequested", "")] == (Decimal(0), Decimal(96)) and report.reconciles
    finally:
        store.command(f"DROP DATABASE IF EXISTS {store.database}")
        store.close()

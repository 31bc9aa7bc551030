"""Every report checked against totals computed here, independently, from the raw rows; with
replays and corrections, rollups on and off, empty and idle-only periods, non-ASCII labels."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections import defaultdict
from decimal import ROUND_HALF_UP, Decimal

import pytest
from test_reports_data import HOUR_MS, MIN_MS, T0_MS, cluster_rows, corrected, fresh_store

from streams.reports.chargeback import ExportTotals, chargeback, invoice
from streams.reports.focus_columns import COLUMNS
from streams.reports.focus_files import FORMATS as FOCUS_FORMATS
from streams.reports.focus_files import export_bytes, read_rows
from streams.reports.focus_rules import check_rows
from streams.reports.http import handle_report_request
from streams.reports.params import Period, parse_month
from streams.reports.render import to_csv, to_json, to_table
from streams.reports.showback import showback
from streams.reports.tags import tag_compliance
from streams.reports.unit_economics import unit_economics
from streams.rollups import read_horizon, seal_hours, unseal_from
from streams.rows import CostRow, Row, TokenCostRow
from streams.store import ClickHouseStore

HOURS = 5
PERIOD = Period(T0_MS, T0_MS + HOURS * HOUR_MS)
CENT = Decimal("0.01")


def latest(rows: list[Row]) -> list[Row]:
    """What FINAL shows: per table and key, the row with the highest version (last wins)."""
    best: dict[tuple[str, str], Row] = {}
    for r in rows:
        k = (r.TABLE, r.key)
        if k not in best or r.version >= best[k].version:
            best[k] = r
    return list(best.values())


@pytest.fixture(scope="module")
def loaded() -> tuple[ClickHouseStore, list[Row]]:
    store = fresh_store()
    original = cluster_rows(hours=HOURS)
    replay = original[: len(original) // 2]  # a replay: same keys, same version
    fix = corrected(original[len(original) // 3 :])  # corrections: higher version
    for batch in (original, replay, fix):
        store.insert_rows(batch)
    return store, latest(original + replay + fix)


def expected_by(rows: list[Row], dim: str, period: Period = PERIOD) -> dict[str, Decimal]:
    out: dict[str, Decimal] = defaultdict(Decimal)
    for r in rows:
        if isinstance(r, CostRow) and period.start_ms <= r.window_start_ms < period.end_ms:
            if r.kind == "idle":
                out["(idle)"] += r.cost_usd
            elif r.kind == "host":
                out["(host)"] += r.cost_usd
            else:
                out[getattr(r, dim)] += r.cost_usd
    return dict(out)


def report_by(report: object) -> dict[str, Decimal]:
    out: dict[str, Decimal] = defaultdict(Decimal)
    for line in report.lines:  # type: ignore[attr-defined]
        name = {"idle": "(idle)", "host": "(host)"}.get(line.line_kind, line.key)
        out[name] += line.cost_usd
    return dict(out)


@pytest.mark.parametrize("use_rollups", [False, True])
@pytest.mark.parametrize("dim", ["team", "product", "namespace", "cost_center"])
def test_showback_matches_raw_rows(loaded, dim: str, use_rollups: bool) -> None:
    store, rows = loaded
    if use_rollups:
        seal_hours(store, T0_MS + 3 * HOUR_MS + HOUR_MS)  # hours 0-2 sealed, 3-4 base rows
    report = showback(store, PERIOD, dim, use_rollups=use_rollups)
    assert report_by(report) == expected_by(rows, dim)
    total = sum(r.cost_usd for r in rows if isinstance(r, CostRow))
    assert report.total_usd == total
    assert report.reconciles
    assert sum(line.cost_cents_usd for line in report.lines) == total.quantize(CENT, ROUND_HALF_UP)
    secs = sum(r.device_seconds for r in rows if isinstance(r, CostRow))
    assert report.gpu_hours == pytest.approx(secs / 3600)


def test_showback_by_model_splits_pod_cost_by_token_rows(loaded) -> None:
    store, rows = loaded
    report = showback(store, PERIOD, "model")
    got = report_by(report)
    for model in ("llama-3-70b", "mistral-7b", "llama-3-8b"):
        want = sum(r.cost_usd for r in rows if isinstance(r, TokenCostRow) and r.model == model)
        assert got[model] == want
        tokens = sum(
            r.prompt_tokens + r.completion_tokens
            for r in rows
            if isinstance(r, TokenCostRow) and r.model == model
        )
        line = next(x for x in report.lines if x.key == model)
        assert line.tokens == tokens
    assert report.total_usd == sum(r.cost_usd for r in rows if isinstance(r, CostRow))
    assert report.reconciles
    # Pods that served no tokens are their own line, counted as allocated, not untagged.
    no_token_pods = {r.pod_uid for r in rows if isinstance(r, CostRow)} - {
        r.pod_uid for r in rows if isinstance(r, TokenCostRow)
    }
    no_model = [line for line in report.lines if line.line_kind == "no_model"]
    assert len(no_model) == 1 and no_model[0].key == "__no_model__"
    want_no_model = sum(
        r.cost_usd
        for r in rows
        if isinstance(r, CostRow) and r.kind == "usage" and r.pod_uid in no_token_pods
    )
    assert no_model[0].cost_usd == report.no_model_usd == want_no_model
    assert report.untagged_usd == 0
    usage = sum(r.cost_usd for r in rows if isinstance(r, CostRow) and r.kind == "usage")
    assert report.allocated_usd == usage
    text = to_table(report)
    assert "(no model)" in text and "(untagged)" not in text
    assert f"no model {no_model[0].cost_cents_usd}" in text and "reconciles" in text


def test_corrections_are_not_double_counted_by_rollups(loaded) -> None:
    store, rows = loaded
    seal_hours(store, T0_MS + 10 * HOUR_MS)
    seal_hours(store, T0_MS + 10 * HOUR_MS)  # again: idempotent
    assert read_horizon(store) == T0_MS + 9 * HOUR_MS
    # one more correction of an already sealed hour, then unseal and reseal that hour
    target = next(r for r in rows if isinstance(r, CostRow) and r.kind == "usage")
    bumped = dataclasses.replace(target, cost_usd=target.cost_usd + 1, version=target.version + 5)
    store.insert_rows([bumped])
    unseal_from(store, target.window_start_ms)
    seal_hours(store, T0_MS + 10 * HOUR_MS)
    new_rows = latest([*rows, bumped])
    for use_rollups in (True, False):
        report = showback(store, PERIOD, "team", use_rollups=use_rollups)
        assert report_by(report) == expected_by(new_rows, "team")
    store.insert_rows(
        [dataclasses.replace(bumped, cost_usd=target.cost_usd, version=bumped.version + 1)]
    )
    unseal_from(store, target.window_start_ms)
    seal_hours(store, T0_MS + 10 * HOUR_MS)


def test_partial_hours_read_base_rows() -> None:
    store = fresh_store()
    rows = cluster_rows(hours=3)
    store.insert_rows(rows)
    seal_hours(store, T0_MS + 5 * HOUR_MS)
    period = Period(T0_MS + 17 * MIN_MS, T0_MS + 2 * HOUR_MS + 29 * MIN_MS)
    a = showback(store, period, "team", use_rollups=True)
    b = showback(store, period, "team", use_rollups=False)
    assert report_by(a) == report_by(b) == expected_by(rows, "team", period)


def test_short_period_showback_reads_as_a_finops_table() -> None:
    """Ten minutes of a cluster: GPU-hours to the thousandth, no SM average on idle time, and
    the summary line made of the displayed cents."""
    store = fresh_store()
    rows = [
        r
        for r in cluster_rows(hours=1, window_minutes_step=1)
        if r.window_start_ms < T0_MS + 10 * MIN_MS
    ]
    store.insert_rows(rows)
    period = Period(T0_MS, T0_MS + 10 * MIN_MS)
    costs = [r for r in rows if isinstance(r, CostRow)]
    for dim in ("team", "model"):
        report = showback(store, period, dim)
        total = sum(r.cost_usd for r in costs)
        assert report.total_usd == total and report.reconciles
        assert sum(line.cost_cents_usd for line in report.lines) == total.quantize(
            CENT, ROUND_HALF_UP
        )
        assert report.gpu_hours == pytest.approx(sum(r.device_seconds for r in costs) / 3600)
        idle = next(line for line in report.lines if line.line_kind == "idle")
        assert idle.avg_sm_util_pct is None
        tab = report.table()[0]
        idle_row = next(row for row in tab.rows if row[0] == "(idle GPU time)")
        assert idle_row[3] == f"{idle.gpu_hours:.3f}" and idle_row[4] == "-"
        assert tab.footer[0][3] == f"{report.gpu_hours:.3f}"
        cents = report.cents_by_kind()
        assert sum(cents.values()) == report.total_cents_usd
        summary = tab.notes[0]
        assert f"idle {cents['idle']}" in summary and f"= {report.total_cents_usd}" in summary
        parsed = json.loads(to_json(report))
        assert Decimal(parsed["totals"]["total_usd"]) == total
        by_label = {r["label"]: r for r in csv.DictReader(io.StringIO(to_csv(report)))}
        assert by_label["(idle GPU time)"]["avg_sm_util_pct"] == ""
        assert sum(Decimal(r["cost_usd"]) for r in by_label.values()) == total


def test_empty_period(loaded) -> None:
    store, _ = loaded
    empty = Period(T0_MS - 10 * HOUR_MS, T0_MS - 9 * HOUR_MS)
    report = showback(store, empty, "team")
    assert report.lines == () and report.total_usd == 0 and report.reconciles
    assert "total" in to_json(report)
    assert tag_compliance(store, empty).untagged_usd == 0
    assert unit_economics(store, empty).lines == ()
    assert list(chargeback(store, Period(empty.start_ms, empty.end_ms))) == []


def test_idle_only_period() -> None:
    store = fresh_store()
    idle = [r for r in cluster_rows(hours=1) if isinstance(r, CostRow) and r.kind == "idle"]
    store.insert_rows(idle)
    report = showback(store, PERIOD, "team")
    assert [line.line_kind for line in report.lines] == ["idle"]
    assert report.idle_usd == report.total_usd == sum(r.cost_usd for r in idle)
    rows = list(chargeback(store, parse_month("2026-11")))
    assert rows and {r["x_CostKind"] for r in rows} == {"idle"}
    assert all(r["AllocatedResourceId"] is None for r in rows)
    assert all(r["AllocatedMethodId"] is not None for r in rows)
    assert check_rows(rows) == []
    assert unit_economics(store, PERIOD).lines == ()


def test_tags_report_matches_raw_rows(loaded) -> None:
    store, rows = loaded
    report = tag_compliance(store, PERIOD)
    usage = [r for r in rows if isinstance(r, CostRow) and r.kind == "usage"]
    untagged = [r for r in usage if "__untagged__" in (r.team, r.product, r.cost_center)]
    assert report.untagged_usd == sum(r.cost_usd for r in untagged)
    assert report.usage_usd == sum(r.cost_usd for r in usage)
    missing = {k.label_key: k.cost_usd for k in report.missing_keys}
    assert missing["team"] == sum(r.cost_usd for r in usage if r.team == "__untagged__")
    assert missing["cost-center"] == sum(
        r.cost_usd for r in usage if r.cost_center == "__untagged__"
    )
    assert report.pods[0].pod == "notebook-7"
    assert report.pods[0].missing_keys[-1] == "cost-center"
    assert [n.namespace for n in report.namespaces] == ["sandbox"]


def test_unit_economics_matches_raw_rows(loaded) -> None:
    store, rows = loaded
    report = unit_economics(store, PERIOD)
    cpt = [r for r in rows if isinstance(r, TokenCostRow)]
    costs = [r for r in rows if isinstance(r, CostRow)]
    usage = sum(r.cost_usd for r in costs if r.kind == "usage")
    idle = sum(r.cost_usd for r in costs if r.kind == "idle")
    # Per hour: allocation basis = token cost x (usage + idle) / usage of that hour.
    want_alloc = Decimal(0)
    for h in range(HOURS):
        lo, hi = T0_MS + h * HOUR_MS, T0_MS + (h + 1) * HOUR_MS
        u = sum(r.cost_usd for r in costs if r.kind == "usage" and lo <= r.window_start_ms < hi)
        i = sum(r.cost_usd for r in costs if r.kind == "idle" and lo <= r.window_start_ms < hi)
        t = sum(r.cost_usd for r in cpt if lo <= r.window_start_ms < hi)
        want_alloc += t * (u + i) / u
    got_alloc = sum(line.allocation.cost_usd for line in report.lines)
    assert abs(got_alloc - want_alloc) < Decimal("1e-9")
    assert sum(line.usage.cost_usd for line in report.lines) == sum(r.cost_usd for r in cpt)
    assert usage > 0 and idle > 0
    line = next(x for x in report.lines if x.model == "llama-3-70b")
    tokens = sum(r.prompt_tokens + r.completion_tokens for r in cpt if r.model == "llama-3-70b")
    requests = sum(r.requests for r in cpt if r.model == "llama-3-70b")
    assert line.tokens == tokens and line.requests == requests
    assert line.usage.cost_per_1m_tokens_usd == (line.usage.cost_usd * 1_000_000 / tokens).quantize(
        Decimal("1e-6"), ROUND_HALF_UP
    )
    assert line.split_basis == "time"
    assert len(line.trend) == HOURS
    assert "ESTIMATE" in "".join(n for t in report.table() for n in t.notes)


def test_chargeback_adds_up_to_the_raw_rows(loaded) -> None:
    store, rows = loaded
    totals = ExportTotals()
    export = list(chargeback(store, parse_month("2026-11"), totals=totals))
    assert check_rows(export) == []
    costs = [r for r in rows if isinstance(r, CostRow)]
    metered = sum(r.cost_usd for r in costs)
    assert totals.metered_usd == metered == sum(r["x_MeteredCost"] for r in export)
    billed = sum(r["BilledCost"] for r in export)
    assert billed == totals.total_usd
    origins = {(r["ResourceId"], r["ChargePeriodStart"], r["SkuPriceId"]) for r in export}
    # price x quantity in 1e-12 device-hours differs from the meter's sums by less than a
    # quantity step per origin charge
    assert abs(billed - metered) <= Decimal("7e-12") * len(origins)
    assert {r["ChargePeriodStart"][11:] for r in export} == {f"{h:02}:00:00Z" for h in range(HOURS)}
    kinds: dict[str, Decimal] = defaultdict(Decimal)
    for row in export:
        kinds[row["x_CostKind"]] += row["x_MeteredCost"]
    assert kinds["idle"] == sum(r.cost_usd for r in costs if r.kind == "idle")
    assert kinds["host"] == sum(r.cost_usd for r in costs if r.kind == "host")
    by_model: dict[str | None, Decimal] = defaultdict(Decimal)
    for row in export:
        by_model[row["x_Model"]] += row["x_MeteredCost"]
    cpt = [r for r in rows if isinstance(r, TokenCostRow)]
    assert by_model["llama-3-70b"] == sum(r.cost_usd for r in cpt if r.model == "llama-3-70b")
    assert any(r["x_Team"] == "récommandations" and r["x_Product"] == "猫-feed" for r in export)
    # tokens of every model land on exactly one charge per hour
    for model in ("llama-3-70b", "mistral-7b", "llama-3-8b"):
        want = sum(r.prompt_tokens for r in cpt if r.model == model)
        assert sum(r["x_PromptTokens"] for r in export if r["x_Model"] == model) == want
    # the corrected untagged pod is billed to its late team; untagged rows carry no owner
    assert any(r["x_Team"] == "sandbox-team" for r in export)
    assert all(r["AllocatedResourceId"] is None for r in export if r["x_CostKind"] != "allocated")


def test_invoice_lines_add_up_to_the_rounded_total_of_the_file(loaded) -> None:
    store, _ = loaded
    export = list(chargeback(store, parse_month("2026-11")))
    exact = sum(r["BilledCost"] for r in export)
    for by in ("team", "cost_center"):
        bill = invoice(store, parse_month("2026-11"), by=by)
        assert bill.exact_total_usd == exact
        assert bill.total_usd == exact.quantize(CENT, ROUND_HALF_UP)
        assert sum(line.amount_usd for line in bill.lines) == bill.total_usd
        for line in bill.lines:
            assert line.amount_usd == line.amount_usd.quantize(CENT)
            assert abs(line.amount_usd - line.exact_usd) < CENT
        assert bill.invoice_id == "gpuledger-2026-11" == export[0]["InvoiceId"]
    by_team = {line.label: line for line in invoice(store, parse_month("2026-11")).lines}
    want = sum(r["BilledCost"] for r in export if r["x_Team"] == "search")
    assert by_team["search"].exact_usd == want
    assert {"(idle GPU time)", "(host processes)"} <= set(by_team)


@pytest.mark.parametrize("fmt", FOCUS_FORMATS)
def test_chargeback_files_hold_the_same_rows_and_pass_the_1_3_rules(loaded, fmt: str) -> None:
    store, _ = loaded
    month = parse_month("2026-11")
    rows = list(chargeback(store, month))
    written = read_rows(export_bytes(chargeback(store, month), fmt), fmt)
    assert check_rows(written) == []
    assert len(written) == len(rows)
    assert list(written[0]) == list(COLUMNS)
    for got, want in zip(written, rows, strict=True):
        for column, value in want.items():
            if isinstance(value, int) and not isinstance(value, bool):
                value = Decimal(value)
            assert got[column] == value, (fmt, column)
    assert any("猫-feed" in (r["AllocatedTags"] or "") for r in written)


@pytest.mark.parametrize("fmt", FOCUS_FORMATS)
def test_an_empty_month_is_a_valid_empty_file(loaded, fmt: str) -> None:
    store, _ = loaded
    data = export_bytes(chargeback(store, parse_month("2026-10")), fmt)
    assert read_rows(data, fmt) == []
    if fmt == "focus-csv":
        assert data.decode().splitlines() == [",".join(COLUMNS)]
    elif fmt == "focus-parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        assert table.num_rows == 0 and table.column_names == list(COLUMNS)
        assert table.schema.metadata[b"focus_version"] == b"1.3"
    else:
        assert data == b""


def test_focus_rules_catch_a_broken_export(loaded) -> None:
    store, _ = loaded
    broken = [dict(r) for r in chargeback(store, parse_month("2026-11"))]
    broken[0]["ChargeCategory"] = "Use"
    broken[1]["BillingPeriodStart"] = "2026-11-01"
    broken[2]["ListCost"] += Decimal("1e-27")
    del broken[3]["BilledCost"]
    broken[4]["ContractedUnitPrice"] = Decimal("9.99")
    problems = check_rows(broken)
    assert any("ChargeCategory" in p for p in problems)
    assert any("BillingPeriodStart" in p for p in problems)
    assert any("ListCost" in p and "exactly" in p for p in problems)
    assert any("mandatory column BilledCost" in p for p in problems)
    assert any("differ in ContractedUnitPrice" in p for p in problems)


def test_http_handler(loaded) -> None:
    store, _ = loaded
    status, ctype, body = handle_report_request(
        store,
        "/report/showback",
        {"from": "2026-11-01", "to": "2026-11-01T05:00:00Z", "by": "team", "format": "csv"},
    )
    assert status == 200 and ctype.startswith("text/csv")
    assert to_csv(showback(store, PERIOD, "team")) == body.decode()
    status, _, body = handle_report_request(store, "/report/showback", {"by": "colour"})
    assert status == 400 and body.decode().count("\n") == 1 and "colour" in body.decode()
    status, _, _ = handle_report_request(
        store, "/report/tags", {"from": "2026-11-02", "to": "2026-11-01"}
    )
    assert status == 400
    status, ctype, body = handle_report_request(
        store, "/export/chargeback", {"period": "2026-11", "format": "focus-parquet"}
    )
    assert status == 200 and body[:4] == b"PAR1"
    status, ctype, body = handle_report_request(
        store, "/export/invoice", {"period": "2026-11", "by": "cost_center", "format": "json"}
    )
    assert status == 200 and ctype == "application/json"
    assert json.loads(body)["invoice_id"] == "gpuledger-2026-11"
    status, _, body = handle_report_request(
        store, "/export/invoice", {"period": "2026-11", "by": "x"}
    )
    assert status == 400 and b"--by" in body
    assert (
        handle_report_request(store, "/report/html", {"from": "2026-11-01", "to": "2026-11-02"})[0]
        == 200
    )
    assert handle_report_request(store, "/nope", {})[0] == 404

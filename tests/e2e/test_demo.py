"""`gpuledger demo` through the command line, as a user runs it: a short demo to the end, and
one stopped with Ctrl-C. The data folder is read afterwards from another process (chDB opens
one folder per process)."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from focus_validator import GPULEDGER_CRITERIA, run_validator

from agents.demo_nodes import demo_nodes
from streams.reports.focus_files import read_rows
from streams.reports.focus_rules import check_rows

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

TOTAL_LINE = re.compile(r"total \(all metered GPU cost\)\W+([\d,]+\.\d{2})")

FOLDER_FACTS = """
import json, sys
from streams.store import ClickHouseStore
store = ClickHouseStore(sys.argv[1])
db = store.database
def one(sql):
    return store.query_rows(sql)[0][0]
cost = f"{db}.gpu_cost_windows FINAL"
usage = f"(SELECT * FROM {cost} WHERE kind = 'usage')"
print(json.dumps({
    "total_usd": str(one(f"SELECT sum(cost_usd) FROM {cost}")),
    "nodes": one(f"SELECT uniqExact(node) FROM {cost}"),
    "devices": one(f"SELECT uniqExact(device_uuid) FROM {cost}"),
    "mig_devices": one(f"SELECT uniqExact(device_uuid) FROM {cost} WHERE mig_profile != ''"),
    "pods": one(f"SELECT uniqExact(pod_uid) FROM {usage}"),
    "teams": one(f"SELECT uniqExact(team) FROM {usage} WHERE team != '__untagged__'"),
    "products": one(f"SELECT uniqExact(product) FROM {usage} WHERE product != '__untagged__'"),
    "untagged_namespaces": one(
        f"SELECT uniqExact(namespace) FROM {usage} WHERE team = '__untagged__'"),
    "host_rows": one(f"SELECT count() FROM {cost} WHERE kind = 'host'"),
    "idle_rows": one(f"SELECT count() FROM {cost} WHERE kind = 'idle'"),
    "idle_gap_rows": one(f"SELECT count() FROM {usage} WHERE sm_util_avg = 0"),
    "models_with_tokens": one(
        f"SELECT uniqExact(model) FROM {db}.token_windows FINAL "
        "WHERE prompt_tokens + completion_tokens > 0"),
    "node_events": [list(r) for r in store.query_rows(
        f"SELECT node, provider_id, instance_type, gpus, cpu_millicores, memory_bytes, deleted "
        f"FROM {db}.node_events FINAL ORDER BY node, time")],
}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def demo_command(tmp: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gpuledger.cli",
        "demo",
        "--data",
        str(tmp / "data"),
        "--report",
        str(tmp / "report.html"),
        "--port",
        str(free_port()),
        *args,
    ]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("GPULEDGER_")}


def folder_facts(data: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", FOLDER_FACTS, f"chdb://{data}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    facts: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return facts


def shown_total(stdout: str) -> Decimal:
    match = TOTAL_LINE.search(stdout)
    assert match, stdout
    return Decimal(match.group(1).replace(",", ""))


def assert_self_contained_report(path: Path) -> None:
    html = path.read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html")
    assert "<svg" in html
    # Nothing is fetched when it is viewed: every link is inline data or an anchor.
    links = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html)
    assert all(link.startswith(("data:", "#")) for link in links), links
    assert "@import" not in html and "url(http" not in html


def test_demo_runs_to_the_end_and_reconciles(tmp_path: Path) -> None:
    result = subprocess.run(
        demo_command(tmp_path, "--minutes", "3", "--speed", "30"),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(),
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    out = result.stdout
    assert "GPU showback by team" in out and "reconciles" in out
    assert "DOES NOT RECONCILE" not in out
    assert f"HTML report: {tmp_path / 'report.html'}" in out
    facts = folder_facts(tmp_path / "data")
    # The table's total is the stored rows' total, to the cent.
    stored = Decimal(facts["total_usd"]).quantize(Decimal("0.01"))
    assert shown_total(out) == stored > 0
    assert facts["nodes"] >= 3
    assert facts["devices"] >= 12 and facts["mig_devices"] >= 1
    assert facts["pods"] >= 10
    assert facts["teams"] >= 4 and facts["products"] >= 3
    assert facts["untagged_namespaces"] >= 1
    assert facts["host_rows"] > 0 and facts["idle_rows"] > 0 and facts["idle_gap_rows"] > 0
    assert facts["models_with_tokens"] >= 3
    # The simulated cluster's nodes, through the pod watcher and the worker, one row each.
    assert facts["node_events"] == [
        [n.name, n.provider_id, n.instance_type, n.gpus, n.cpu_millicores, n.memory_bytes, 0]
        for n in demo_nodes()
    ]
    assert_self_contained_report(tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    for section in (
        "Month-end forecast",
        "GPU spend against budgets",
        "usage-based (gpuledger) vs request-based",
    ):
        assert section in html, section
    assert_month_exports(out, tmp_path)
    assert_billed_basis(out, tmp_path)
    assert_planning(out, tmp_path, stored)


def assert_billed_basis(stdout: str, tmp: Path) -> None:
    """The demo's generated cloud bill: its billed-basis showback adds up exactly to the bill's
    EffectiveCost of its GPU instances, unmetered spend on its own line; the printed commands
    read the same, and importing the bill again changes nothing."""
    assert "GPU showback by team, billed basis" in stdout
    assert "(unmetered GPU spend)" in stdout
    (line,) = [ln for ln in stdout.splitlines() if "billed basis total" in ln]
    words = line.split()
    total, wanted = Decimal(words[3]), Decimal(words[12])
    assert words[4] == "=" and total == wanted > 0, line
    bill_rows = list(csv.DictReader((tmp / "gpuledger-demo-bill.csv").open(encoding="utf-8")))
    gpu_lines = [
        r for r in bill_rows if r["ResourceId"].startswith("i-") and "Usage" in r["ChargeCategory"]
    ]
    assert (
        sum(
            (Decimal(r["EffectiveCost"]) for r in bill_rows if r["ResourceId"].startswith("i-")),
            Decimal(0),
        )
        == wanted
        and gpu_lines
    )

    def run(command: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, capture_output=True, text=True, cwd=tmp, env=clean_env(), timeout=120
        )

    showback = run([*printed_command(stdout, "Billed basis: "), "--format", "json"])
    assert showback.returncode == 0, showback.stderr
    totals = json.loads(showback.stdout)["totals"]
    assert Decimal(totals["total_usd"]) == wanted and totals["reconciles"] is True
    assert Decimal(totals["unmetered_usd"]) > 0
    variance = run([*printed_command(stdout, "Price book vs bill: "), "--format", "json"])
    assert variance.returncode == 0, variance.stderr
    assert json.loads(variance.stdout)["lines"]
    again = run([*printed_command(stdout, "Import it again (nothing changes): "), "--format",
                 "json"])  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert [s["status"] for s in json.loads(again.stdout)] == ["unchanged"]


def assert_planning(stdout: str, tmp: Path, stored: Decimal) -> None:
    """The demo's planning answers, read again with the commands it prints: the forecast's
    month to date is the metered total, the plan names a cheapest fit, the demo's budgets give
    the statuses they were set for (largest team over, next forecast over, next at risk, the
    rest on track), and request-based cost adds up to the same total as usage-based."""
    for title in (
        "Month-end GPU spend forecast by team",
        "Plan for ",
        "GPU spend against budgets",
        "usage-based (gpuledger) vs request-based",
    ):
        assert title in stdout, title

    def run(prefix: str) -> Any:
        command = [*printed_command(stdout, prefix), "--format", "json"]
        result = subprocess.run(
            command, capture_output=True, text=True, cwd=tmp, env=clean_env(), timeout=120
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    fc = run("Forecast: ")
    month_start = fc["month"] + "-01T00:00:00Z"
    span = printed_command(stdout, "Requests vs usage: ")
    if span[span.index("--from") + 1] >= month_start:  # the demo ran within one month
        assert cents(Decimal(fc["total"]["month_to_date_usd"])) == stored
    assert Decimal(fc["total"]["forecast_usd"]) > Decimal(fc["total"]["month_to_date_usd"])
    plan = run("Scale a model: ")
    assert plan["growth"] == 3 and plan["cheapest"] is not None
    assert plan["options"] and all(option["devices"] >= 1 for option in plan["options"])
    assert sum(1 for option in plan["options"] if option["cheapest"]) == 1
    budgets = run("Budgets: ")
    statuses = [line["status"] for line in budgets["lines"]]
    assert len(statuses) >= 4
    assert statuses == ["over", "forecast_over", "at_risk"] + ["on_track"] * (len(statuses) - 3)
    requests = run("Requests vs usage: ")
    totals = requests["totals"]
    assert totals["reconciles"] is True
    assert Decimal(totals["usage_usd"]) == Decimal(totals["request_usd"])
    assert Decimal(totals["total_usd_cents"]) == stored
    assert Decimal(totals["unrequested_usd"]) > 0


def cents(amount: Decimal) -> Decimal:
    return amount.quantize(Decimal("0.01"))  # as `stored` is rounded


def printed_command(stdout: str, prefix: str) -> list[str]:
    line = next(ln for ln in stdout.splitlines() if ln.startswith(prefix))
    words = line.removeprefix(prefix).split()
    assert words[0] == "gpuledger"
    return [sys.executable, "-m", "gpuledger.cli", *words[1:]]


def assert_month_exports(stdout: str, tmp: Path) -> None:
    """The chargeback and invoice commands the demo prints work on its folder: the FOCUS file
    passes the FOCUS validator and the 1.3 rules, and the invoice adds up to it."""

    def run(command: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, capture_output=True, text=True, cwd=tmp, env=clean_env(), timeout=120
        )

    export = run(printed_command(stdout, "Chargeback (FOCUS 1.3): "))
    assert export.returncode == 0, export.stderr
    (path,) = tmp.glob("gpuledger-chargeback-*.csv")
    rows = read_rows(path.read_bytes(), "focus-csv")
    assert rows and check_rows(rows) == []
    assert {r["ResourceType"] for r in rows} == {"GPU", "MIG instance"}
    assert {r["x_CostKind"] for r in rows} == {"allocated", "untagged", "host", "idle"}
    report = run_validator(path, criteria=GPULEDGER_CRITERIA)
    assert report.passed > 0 and not report.unexpected_failures(), report.summary()
    bill = run([*printed_command(stdout, "Invoice: "), "--format", "json"])
    assert bill.returncode == 0, bill.stderr
    doc = json.loads(bill.stdout)
    exact = sum((r["BilledCost"] for r in rows), Decimal(0))
    assert Decimal(doc["exact_total"]) == exact
    assert sum(Decimal(line["amount"]) for line in doc["lines"]) == Decimal(doc["total"])


def test_ctrl_c_stops_cleanly_and_still_reports(tmp_path: Path) -> None:
    data = tmp_path / "data"
    process = subprocess.Popen(
        demo_command(tmp_path, "--minutes", "10", "--speed", "10"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=clean_env(),
    )
    try:
        assert process.stdout is not None
        url = ""
        deadline = time.monotonic() + 90
        while not url and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, "the demo ended before it served its dashboard"
            found = re.search(r"dashboard (http://127\.0\.0\.1:\d+)", line)
            url = found.group(1) if found else ""
        assert url
        time.sleep(4)  # some simulated minutes
        # While it runs, the demo owns the folder: a report elsewhere is pointed at its URL.
        report = ["report", "showback", "--clickhouse", f"chdb://{data}"]
        held = subprocess.run(
            [sys.executable, "-m", "gpuledger.cli", *report],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=clean_env(),
            timeout=60,
            check=False,
        )
        assert held.returncode != 0 and url in held.stderr, held.stderr
        process.send_signal(signal.SIGINT)
        rest, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "Traceback" not in err, err
    assert "Stopped early" in rest and "reconciles" in rest
    stored = Decimal(folder_facts(data)["total_usd"]).quantize(Decimal("0.01"))
    assert shown_total(rest) == stored > 0
    assert_self_contained_report(tmp_path / "report.html")


def test_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "ledger.csv").write_text("keep me\n")
    result = subprocess.run(
        demo_command(tmp_path, "--minutes", "1"),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "did not write" in result.stderr
    assert (data / "ledger.csv").read_text() == "keep me\n" and result.stdout == ""

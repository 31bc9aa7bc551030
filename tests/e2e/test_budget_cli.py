"""`gpuledger report budget` through the command line, in subprocesses: a generated month with
a constant daily spend, its known statuses in every format, and one-line errors."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

LOAD = f"""
import sys
sys.path[:0] = [{str(ROOT / "tests" / "integration")!r}, {str(ROOT / "tests")!r}]
from test_reports_budget import month_rows
from streams.store import ClickHouseStore
store = ClickHouseStore(sys.argv[1])
store.create_schema()
store.insert_rows(month_rows())
"""
BUDGETS = """\
budgets:
  - {team: search, monthly_usd: 4000}
  - {team: recs, monthly_usd: 1470}
  - {cost_center: cc-1, monthly_usd: 1000}
"""
AS_OF = ("--period", "2026-11", "--as-of", "2026-11-11T00:00:00Z")


def gpuledger(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPULEDGER_")}
    return subprocess.run(
        [sys.executable, "-m", "gpuledger.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("budget-cli") / "data"
    dsn = f"chdb://{folder}"
    subprocess.run([sys.executable, "-c", LOAD, dsn], check=True, cwd=ROOT, timeout=120)
    return dsn


@pytest.fixture(scope="module")
def budgets_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("budgets") / "budgets.yaml"
    path.write_text(BUDGETS)
    return path


def test_budget_report_in_every_format(dsn: str, budgets_file: Path, tmp_path: Path) -> None:
    common = ("report", "budget", "--clickhouse", dsn, "--budgets", str(budgets_file), *AS_OF)
    table = gpuledger(*common)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == (
        f"GPU spend against budgets ({budgets_file}), 2026-11, as of 2026-11-11T00:00:00Z"
    )
    rows = [[c.strip() for c in line.split("  ") if c.strip()] for line in lines[4:7]]
    cells = {row[1]: row for row in rows}
    assert cells["search"] == [
        "team", "search", "forecast over", "80%", "4,000.00", "1,200.00", "30.0%",
        "3,600.00", "3,600.00-3,600.00", "90.0%", "-",
    ]  # fmt: skip
    assert cells["recs"][2:4] == ["forecast over", "100%"]
    assert lines[5].endswith("122.4%      2026-11-25")
    assert cells["cc-1"][:4] == ["cost center", "cc-1", "over", "100%"]

    out = tmp_path / "budget.csv"
    assert gpuledger(*common, "--format", "csv", "-o", str(out)).returncode == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [(r["owner"], r["status"], r["reaches_budget_on"]) for r in rows] == [
        ("search", "forecast_over", ""),
        ("recs", "forecast_over", "2026-11-25"),
        ("cc-1", "over", ""),
    ]
    assert rows[1]["month_to_date_usd"] == "600.000000000000000"

    doc = json.loads(gpuledger(*common, "--format", "json").stdout)
    assert doc["report"] == "budget" and doc["as_of"] == "2026-11-11T00:00:00Z"
    assert [line["forecast_pct"] for line in doc["lines"]] == ["90.00", "122.45", "360.00"]


def test_one_line_errors(dsn: str, budgets_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("budgets:\n  - {team: a, monthly_usd: 1}\n  - {team: a, monthly_usd: -1}\n")
    for args, code, words in [
        (("--budgets", str(bad)), 2, f"{bad}:3: monthly_usd must be more than 0"),
        (("--budgets", str(tmp_path / "none.yaml")), 2, "none.yaml: cannot read"),
        (("--budgets", str(budgets_file), "--period", "2026-13"), 2, "is not a month"),
        (("--budgets", str(budgets_file), "--format", "xml"), 2, "--format 'xml' is not one of"),
        (("--budgets", str(budgets_file), "--as-of", "soon"), 2, "--as-of 'soon' is not"),
    ]:
        result = gpuledger("report", "budget", "--clickhouse", dsn, *args)
        assert result.returncode == code, (args, result.stderr)
        [line] = result.stderr.splitlines()
        assert line.startswith("gpuledger report budget: ") and words in line, line
    missing = gpuledger("report", "budget", "--clickhouse", dsn)
    assert missing.returncode == 2
    assert missing.stderr == ("gpuledger report budget: give the budgets file: --budgets FILE\n")


HOLD = """
import json, os, sys, time
from pathlib import Path
from streams.store import ClickHouseStore
store = ClickHouseStore(sys.argv[1])
store.create_schema()
folder = Path(sys.argv[1].removeprefix("chdb://"))
(folder / ".gpuledger-owner.json").write_text(
    json.dumps({"pid": os.getpid(), "url": "http://127.0.0.1:9464"}))
print("ready", flush=True)
time.sleep(60)
"""


def test_a_held_folder_says_to_stop_its_owner(tmp_path: Path, budgets_file: Path) -> None:
    dsn = f"chdb://{tmp_path / 'held'}"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, dsn], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        result = gpuledger("report", "budget", "--clickhouse", dsn, "--budgets", str(budgets_file))
        assert result.returncode == 3, result.stderr
        [line] = result.stderr.splitlines()
        assert line.endswith(f"(pid {holder.pid}); stop it to run the budget report on the folder")
    finally:
        holder.kill()
        holder.wait()

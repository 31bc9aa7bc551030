"""`gpuledger bill import|trueup|list` and `report showback --basis billed` through the command
line, in subprocesses that own their chDB folder as in production."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from test_report_cli import gpuledger

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

LOAD = f"""
import sys
sys.path[:0] = [{str(ROOT / "tests" / "integration")!r}, {str(ROOT / "tests")!r}]
from test_reports_data import cluster_rows
from test_bill_import import bill, node_events, write_csv
from pathlib import Path
from streams.store import ClickHouseStore
store = ClickHouseStore(sys.argv[1])
store.create_schema()
store.insert_rows(cluster_rows(hours=3))
node_events(store)
rows = bill()
write_csv(Path(sys.argv[2]) / "bill.csv", rows)
write_csv(Path(sys.argv[2]) / "restated.csv", bill("64.5"))
rows[3]["BilledCost"] = "twelve"
write_csv(Path(sys.argv[2]) / "bad.csv", rows)
"""
SPAN = ("--from", "2026-11-01", "--to", "2026-11-02")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    files = tmp_path_factory.mktemp("bills")
    dsn = f"chdb://{files / 'data'}"
    subprocess.run([sys.executable, "-c", LOAD, dsn, str(files)], check=True, cwd=ROOT, timeout=120)
    return dsn, files


def test_import_once_then_unchanged_then_restated(folder: tuple[str, Path]) -> None:
    dsn, files = folder
    bad = gpuledger("bill", "import", str(files / "bad.csv"), "--clickhouse", dsn)
    assert bad.returncode == 1
    assert f"bad row: {files / 'bad.csv'}:5: BilledCost: not a number: 'twelve'" in bad.stderr
    assert "nothing imported" in bad.stderr
    first = gpuledger(
        "bill", "import", str(files / "bill.csv"), "--clickhouse", dsn, "--format", "json"
    )
    assert first.returncode == 0, first.stderr
    (done,) = json.loads(first.stdout)
    assert (done["status"], done["version"]) == ("new", 1)
    assert Decimal(done["unmetered_cost"]) == Decimal("36.75")
    again = gpuledger("bill", "import", str(files / "bill.csv"), "--clickhouse", dsn)
    assert again.returncode == 0 and "unchanged" in again.stdout
    showback = gpuledger(
        "report", "showback", "--clickhouse", dsn, *SPAN, "--basis", "billed", "--format", "json"
    )
    assert showback.returncode == 0, showback.stderr
    totals = json.loads(showback.stdout)["totals"]
    assert Decimal(totals["total_usd"]) == Decimal(done["gpu_effective_cost"])
    assert totals["reconciles"] is True
    table = gpuledger("report", "showback", "--clickhouse", dsn, *SPAN, "--basis", "billed")
    assert "(unmetered GPU spend)" in table.stdout and "36.75" in table.stdout
    variance = gpuledger("report", "variance", "--clickhouse", dsn, *SPAN, "--format", "json")
    assert variance.returncode == 0, variance.stderr
    assert json.loads(variance.stdout)["lines"]
    table = gpuledger("report", "variance", "--clickhouse", dsn, *SPAN)
    assert "price-book entry" in table.stdout, table.stdout
    refused = gpuledger("report", "variance", "--clickhouse", dsn, *SPAN, "--threshold", "-1")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    restated = gpuledger(
        "bill", "import", str(files / "restated.csv"), "--clickhouse", dsn, "--format", "json"
    )
    (v2,) = json.loads(restated.stdout)
    assert (v2["status"], v2["version"], v2["changed_hours"]) == ("restated", 2, 1)
    listed = gpuledger("bill", "list", "--clickhouse", dsn, "--format", "json")
    (slice_,) = json.loads(listed.stdout)
    assert (slice_["provider"], slice_["version"], slice_["lines"]) == ("AWS", 2, 13)
    trueup = gpuledger(
        "bill", "trueup", "--clickhouse", dsn, "--non-gpu-rule", "weights", "--format", "json"
    )
    (v3,) = json.loads(trueup.stdout)
    assert v3["status"] == "recomputed" and Decimal(v3["non_gpu_cost"]) > 0
    assert Decimal(v3["gpu_effective_cost"]) == Decimal(v2["gpu_effective_cost"])


def test_bad_flags_are_one_line(folder: tuple[str, Path]) -> None:
    dsn, files = folder
    result = gpuledger(
        "bill", "import", str(files / "bill.csv"), "--clickhouse", dsn, "--gpu-weights", "1,2"
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--gpu-weights" in result.stderr
    missing = gpuledger("bill", "import", str(files / "nope.csv"), "--clickhouse", dsn)
    assert missing.returncode == 2 and "no such file" in missing.stderr

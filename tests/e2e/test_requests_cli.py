"""`gpuledger report requests` through the command line, in subprocesses (each owns its chDB
folder), on the generated month of tests/integration/test_reports_requests.py."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

LOAD = f"""
import sys
sys.path[:0] = [{str(ROOT / "tests" / "integration")!r}, {str(ROOT / "tests")!r}]
from test_reports_requests import load_month
from streams.store import ClickHouseStore
store = ClickHouseStore(sys.argv[1])
store.create_schema()
load_month(store)
"""

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

MONTH = ("--from", "2026-11-01", "--to", "2026-12-01")


def gpuledger(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPULEDGER_")}
    return subprocess.run(
        [sys.executable, "-m", "gpuledger.cli", "report", "requests", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=180,
        check=False,
    )


@pytest.fixture(scope="module")
def dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("requests") / "data"
    dsn = f"chdb://{folder}"
    subprocess.run([sys.executable, "-c", LOAD, dsn], check=True, cwd=ROOT, timeout=180)
    return dsn


def test_table_csv_json_and_output_file(dsn: str, tmp_path: Path) -> None:
    table = gpuledger("--clickhouse", dsn, *MONTH)
    assert table.returncode == 0, table.stderr
    beta = next(line for line in table.stdout.splitlines() if line.startswith("beta "))
    assert beta.split() == ["beta", "1,440.00", "5,760.00", "+4,320.00", "4.00x"]
    assert "(unrequested)" in table.stdout and "8,968.50" in table.stdout
    assert "team beta requests far more than it uses" in table.stdout
    out = tmp_path / "requests.csv"
    as_csv = gpuledger("--clickhouse", dsn, *MONTH, "--by", "namespace", "--format", "csv",
                       "-o", str(out), "--base-only")  # fmt: skip
    assert as_csv.returncode == 0 and as_csv.stdout == "", as_csv.stderr
    rows = {r["label"]: r for r in csv.DictReader(io.StringIO(out.read_text(encoding="utf-8")))}
    assert (
        rows["lab"]["usage_usd_cents"] == "1080.00" and rows["lab"]["request_usd_cents"] == "0.00"
    )
    assert rows["serve"]["request_usd_cents"] == "6840.00"
    as_json = gpuledger("--clickhouse", dsn, *MONTH, "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["report"] == "requests" and doc["totals"]["reconciles"] is True
    assert doc["totals"]["usage_usd"] == doc["totals"]["request_usd"] == "21600.000000000000000"
    assert doc["totals"]["unrequested_usd"] == "8968.500000000000000"


def test_errors_are_one_line(dsn: str) -> None:
    for bad, word in (
        (("--by", "model"), "--by"),
        (("--format", "xml"), "--format"),
        (("--from", "2026-12-01", "--to", "2026-11-01"), "before it starts"),
        (("--from", "yesterday"), "--from"),
    ):
        result = gpuledger("--clickhouse", dsn, *bad)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert word in result.stderr and result.stderr.startswith("gpuledger report requests: ")


def test_held_folder(tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'held'}"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, dsn], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        result = gpuledger("--clickhouse", dsn, *MONTH)
        assert result.returncode == 3 and result.stderr.count("\n") == 1
        assert "in use by another gpuledger process" in result.stderr
        assert "stop it to run the requests report on the folder" in result.stderr
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)

"""`gpuledger report` and `gpuledger export` through the command line, in subprocesses (each
owns its chDB folder, as in production)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

LOAD = f"""
import sys
sys.path[:0] = [{str(ROOT / "tests" / "integration")!r}, {str(ROOT / "tests")!r}]
from test_reports_data import cluster_rows
from streams.store import ClickHouseStore
store = ClickHouseStore(sys.argv[1])
store.create_schema()
store.insert_rows(cluster_rows(hours=2))
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
    folder = tmp_path_factory.mktemp("cli") / "data"
    dsn = f"chdb://{folder}"
    subprocess.run([sys.executable, "-c", LOAD, dsn], check=True, cwd=ROOT, timeout=120)
    return dsn


def test_showback_csv_and_table(dsn: str) -> None:
    span = ("--from", "2026-11-01", "--to", "2026-11-02")
    result = gpuledger("report", "showback", "--clickhouse", dsn, *span, "--format", "csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert {r["line_kind"] for r in rows} == {"allocated", "untagged", "host", "idle"}
    by_model = gpuledger(
        "report", "showback", "--clickhouse", dsn, *span, "--by", "model", "--format", "csv"
    )
    assert by_model.returncode == 0, by_model.stderr
    model_rows = list(csv.DictReader(io.StringIO(by_model.stdout)))
    assert {r["line_kind"] for r in model_rows} == {"allocated", "no_model", "host", "idle"}
    assert "(no model)" in {r["label"] for r in model_rows}
    table = gpuledger("report", "showback", "--clickhouse", dsn, *span, "--by", "product")
    assert table.returncode == 0 and "猫-feed" in table.stdout and "reconciles" in table.stdout


def test_export_parquet_and_reports(dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "nov.parquet"
    result = gpuledger(
        "export",
        "chargeback",
        "--clickhouse",
        dsn,
        "--period",
        "2026-11",
        "--format",
        "focus-parquet",
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:4] == b"PAR1"
    tags = gpuledger(
        "report",
        "tags",
        "--clickhouse",
        dsn,
        "--from",
        "2026-11-01",
        "--to",
        "2026-11-02",
        "--format",
        "json",
    )
    assert json.loads(tags.stdout)["untagged_usd"] != "0"
    units = gpuledger(
        "report",
        "unit-economics",
        "--clickhouse",
        dsn,
        "--from",
        "2026-11-01",
        "--to",
        "2026-11-02",
    )
    assert units.returncode == 0 and "llama-3-70b" in units.stdout


def test_export_invoice_adds_up_to_the_chargeback_file(dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "nov.jsonl"
    export = gpuledger(
        "export", "chargeback", "--clickhouse", dsn, "--period", "2026-11",
        "--format", "focus-jsonl", "-o", str(out), "--host-provider", "Amazon Web Services",
    )  # fmt: skip
    assert export.returncode == 0, export.stderr
    rows = [json.loads(line, parse_float=Decimal) for line in out.read_text().splitlines()]
    assert rows and {r["HostProviderName"] for r in rows} == {"Amazon Web Services"}
    assert {r["InvoiceIssuerName"] for r in rows} == {"Internal GPU platform"}
    exact = sum(r["BilledCost"] for r in rows)
    assert f"{len(rows):,} charges, EffectiveCost total {exact.normalize():f} USD" in export.stderr
    assert not list(tmp_path.glob(".*partial"))
    bill = gpuledger(
        "export", "invoice", "--clickhouse", dsn, "--period", "2026-11", "--by", "team",
        "--format", "json",
    )  # fmt: skip
    assert bill.returncode == 0, bill.stderr
    doc = json.loads(bill.stdout, parse_float=Decimal)
    assert Decimal(doc["exact_total"]) == exact
    assert sum(Decimal(line["amount"]) for line in doc["lines"]) == Decimal(doc["total"])
    assert Decimal(doc["total"]) == exact.quantize(Decimal("0.01"), ROUND_HALF_UP)
    table = gpuledger("export", "invoice", "--clickhouse", dsn, "--period", "2026-11")
    assert table.returncode == 0 and "gpuledger-2026-11" in table.stdout
    assert "(idle GPU time)" in table.stdout
    wrong = gpuledger("export", "invoice", "--clickhouse", dsn, "--period", "2026-11", "--by", "x")
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "--by" in wrong.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("report", "showback", "--by", "colour"), "--by 'colour'"),
        (("report", "showback", "--from", "2026-11-05", "--to", "2026-11-01"), "before it starts"),
        (("report", "tags", "--format", "xml"), "--format 'xml'"),
        (("export", "chargeback", "--period", "November"), "--period 'November'"),
        (("export", "chargeback", "--period", "2026-11", "--format", "xlsx"), "--format"),
        (("report", "html", "--from", "2000-01-01", "--to", "2026-11-01"), "at most 400 days"),
        (("report", "showback", "--to", "9" * 30), "outside the times a report reads"),
        (("report", "tags", "--from", "2026-11-01T00:00:00"), "RFC 3339 time with an offset"),
        (("export", "chargeback", "--period", "9999-12"), "--period '9999-12'"),
    ],
)
def test_bad_arguments_give_one_line(dsn: str, args: tuple[str, ...], needle: str) -> None:
    result = gpuledger(*args, "--clickhouse", dsn)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and needle in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("bad_dsn", ["not-a-dsn", "http://127.0.0.1:1/gpuledger"])
def test_unreadable_dsn_gives_one_line(bad_dsn: str) -> None:
    result = gpuledger("report", "showback", "--clickhouse", bad_dsn)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_held_folder_names_the_owner_url(tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'held'}"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, dsn], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        result = gpuledger(
            "report", "showback", "--clickhouse", dsn, "--by", "model", "--from", "2026-11-01"
        )
        assert result.returncode == 3
        assert result.stderr.count("\n") == 1
        assert "http://127.0.0.1:9464/report/showback?from=2026-11-01&by=model" in result.stderr
        export = gpuledger("export", "chargeback", "--clickhouse", dsn, "--period", "2026-11")
        assert export.returncode == 3
        assert "/export/chargeback?period=2026-11&format=focus-csv" in export.stderr
        billed = gpuledger(
            "export", "invoice", "--clickhouse", dsn, "--period", "2026-11", "--basis", "billed"
        )
        assert "/export/invoice?period=2026-11&by=team&format=table&basis=billed" in billed.stderr
        bill_file = tmp_path / "bill.csv"
        bill_file.write_text("BilledCost\n1\n", encoding="utf-8")
        imported = gpuledger("bill", "import", str(bill_file), "--clickhouse", dsn)
        assert imported.returncode == 3 and imported.stderr.count("\n") == 1
        assert "stop it to import or true up a bill" in imported.stderr
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)

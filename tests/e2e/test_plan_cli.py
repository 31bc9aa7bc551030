"""`gpuledger plan` through the command line, in subprocesses (each owns its chDB folder), on
the cluster of tests/integration/test_plan_data.py: model `m` serves 1,000 tokens/s per H100 (on
demand, 4.00 USD/h) and 300 per 3g.40gb MIG instance (spot, 2.25 x 3/7 USD/h)."""

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

from gpuledger.cli import COMMAND_MODULES

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

LOAD = f"""
import sys
sys.path[:0] = [{str(ROOT / "tests" / "integration")!r}, {str(ROOT / "tests")!r}]
from test_plan_data import plan_rows
from streams.store import ClickHouseStore
store = ClickHouseStore(sys.argv[1])
store.create_schema()
store.insert_rows(plan_rows())
"""

# Until gpuledger/cli.py lists streams.plan_cli: the same parser setup, with `plan` alone.
PLAN_ONLY = """
import argparse, os, sys
from runtime.options import gpuledger_env
from streams import plan_cli
parser = argparse.ArgumentParser(prog="gpuledger")
plan_cli.register(parser.add_subparsers(dest="command"), gpuledger_env(os.environ))
args = parser.parse_args(sys.argv[1:])
sys.exit(int(args.handler(args)))
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

WIRED = any(module == "streams.plan_cli" for module, _ in COMMAND_MODULES)
SPAN = ("--from", "2026-11-01", "--to", "2026-11-01T12:00:00Z")


def gpuledger(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPULEDGER_")}
    entry = ["-m", "gpuledger.cli", "plan"] if WIRED else ["-c", PLAN_ONLY, "plan"]
    return subprocess.run(
        [sys.executable, *entry, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("plan") / "data"
    dsn = f"chdb://{folder}"
    subprocess.run([sys.executable, "-c", LOAD, dsn], check=True, cwd=ROOT, timeout=120)
    return dsn


def test_plan_table_csv_and_json(dsn: str) -> None:
    table = gpuledger("--clickhouse", dsn, "--model", "m", "--tokens-per-s", "10400", *SPAN)
    assert table.returncode == 0, table.stderr
    assert "cheapest fit: NVIDIA H100 80GB HBM3 3g.40gb (spot), 35 devices, 24,637.50 USD" in (
        table.stdout
    )
    assert "32,120.00" in table.stdout  # 11 H100 x 4.00 x 730 h
    as_csv = gpuledger(
        "--clickhouse", dsn, "--model", "m", "--growth", "300%", *SPAN, "--format", "csv"
    )
    assert as_csv.returncode == 0, as_csv.stderr
    rows = {r["mig_profile"]: r for r in csv.DictReader(io.StringIO(as_csv.stdout))}
    # observed 7,416,000 tokens over 12 h = 171.67/s; 3x = 515/s: 1 H100, 2 MIG instances
    assert rows[""]["devices"] == "1" and rows["3g.40gb"]["devices"] == "2"
    assert rows["3g.40gb"]["cheapest"] == "True"
    as_json = gpuledger(
        "--clickhouse", dsn, "--model", "m", "--growth", "3x", *SPAN, "--format", "json"
    )
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["report"] == "plan" and doc["growth"] == 3.0 and doc["hours_per_month"] == 730
    assert doc["cheapest"]["mig_profile"] == "3g.40gb"


def test_errors_are_one_line(dsn: str) -> None:
    unknown = gpuledger("--clickhouse", dsn, "--model", "gpt-9", "--tokens-per-s", "5", *SPAN)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert "model 'gpt-9' was not seen" in unknown.stderr and "'m' (7,416,000 tokens)" in (
        unknown.stderr
    )
    bad = gpuledger("--clickhouse", dsn, "--model", "m", "--growth", "lots", *SPAN)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--growth" in bad.stderr
    both = gpuledger("--clickhouse", dsn, "--model", "m", "--growth", "3", "--tokens-per-s", "1")
    assert both.returncode == 2 and "not allowed with" in both.stderr
    fmt = gpuledger("--clickhouse", dsn, "--model", "m", "--growth", "3", "--format", "xml")
    assert fmt.returncode == 2 and fmt.stderr.count("\n") == 1


def test_held_folder(tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'held'}"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, dsn], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        result = gpuledger("--clickhouse", dsn, "--model", "m", "--growth", "2")
        assert result.returncode == 3 and result.stderr.count("\n") == 1
        assert "in use by another gpuledger process" in result.stderr
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)

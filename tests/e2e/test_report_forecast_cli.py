"""`gpuledger report forecast` through the command line, in subprocesses (each owns its chDB
folder), on a generated month: from 2026-11-01 (a Sunday) team `search` spends 2 USD/h, team
`recs` 1.50 USD/h and idle GPUs 0.25 USD/h, every hour for 10 days."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
DAYS = 10
RATES_USD_H = {"search": Decimal(2), "recs": Decimal("1.5"), "": Decimal("0.25")}

LOAD = f"""
import sys
from decimal import Decimal
from streams.rows import CostRow
from streams.store import ClickHouseStore
T0_MS, HOUR_MS = 1_793_491_200_000, 3_600_000
store = ClickHouseStore(sys.argv[1])
store.create_schema()
rows = []
for h in range({DAYS} * 24):
    w0 = T0_MS + h * HOUR_MS
    for team, rate in {{"search": "2", "recs": "1.5", "": "0.25"}}.items():
        rows.append(CostRow(
            w0, w0 + 60_000, "c1", "n1", f"GPU-{{team or 'idle'}}", "GPU-1", "H100", "",
            "ns" if team else "", "p" if team else "", f"uid-{{team}}" if team else "",
            team or "__idle__", "prod" if team else "", "cc" if team else "",
            "usage" if team else "idle", 60.0, 50.0, 0.0, Decimal(rate), Decimal(0),
            Decimal("4.0"), "on_demand", 1))
store.insert_rows(rows)
"""


def gpuledger(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPULEDGER_")}
    return subprocess.run(
        [sys.executable, "-m", "gpuledger.cli", "report", "forecast", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("forecast-cli") / "data"
    dsn = f"chdb://{folder}"
    subprocess.run([sys.executable, "-c", LOAD, dsn], check=True, cwd=ROOT, timeout=120)
    return dsn


def test_table_names_the_month_the_time_each_team_and_the_method(dsn: str) -> None:
    result = gpuledger("--clickhouse", dsn, "--period", "2026-11", "--as-of", "2026-11-11")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Month-end GPU spend forecast by team, 2026-11, as of 2026-11-11T00:00:00Z" in out
    for label in ("search", "recs", "(idle GPU time)", "total (all metered GPU cost)"):
        assert label in out
    # 30 days x 48 USD: the constant day to month end, with an interval of a cent at most
    [search] = [line for line in out.splitlines() if line.lstrip().startswith("search")]
    assert "1,440.00" in search and "ets_trend" in search
    assert "total: ETS(A," in out and "by AICc" in out


def test_csv_gives_the_exact_month_to_date_and_the_known_month_end(dsn: str) -> None:
    result = gpuledger(
        "--clickhouse", dsn, "--period", "2026-11", "--as-of", "2026-11-11", "--format", "csv"
    )
    assert result.returncode == 0, result.stderr
    rows = {r["label"]: r for r in csv.DictReader(io.StringIO(result.stdout))}
    assert set(rows) == {"search", "recs", "(idle GPU time)", "total (all metered GPU cost)"}
    for team, rate in RATES_USD_H.items():
        [row] = [r for r in rows.values() if r["team"] == team and r["line_kind"] != "total"]
        assert Decimal(row["month_to_date_usd"]) == rate * DAYS * 24  # exact
        assert abs(Decimal(row["forecast_usd"]) - rate * 720) <= Decimal("0.01")
        assert Decimal(row["high95_usd"]) - Decimal(row["low95_usd"]) <= Decimal("0.01")
        assert row["method"] == "ets_trend" and row["days_of_history"] == str(DAYS)
    total = rows["total (all metered GPU cost)"]
    assert Decimal(total["month_to_date_usd"]) == Decimal("3.75") * DAYS * 24
    assert abs(Decimal(total["forecast_usd"]) - Decimal("3.75") * 720) <= Decimal("0.01")


def test_json_as_of_day_3_noon_uses_the_run_rate_and_says_why(dsn: str) -> None:
    result = gpuledger(
        "--clickhouse", dsn, "--period", "2026-11", "--as-of", "2026-11-03T12:00:00Z",
        "--format", "json", "--by", "team",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["report"] == "forecast" and report["month"] == "2026-11"
    assert report["as_of"] == "2026-11-03T12:00:00Z" and report["by"] == "team"
    total = report["total"]
    assert total["method"] == "run_rate"
    assert total["fallback"] == "fewer than 3 complete days of history"
    assert Decimal(total["month_to_date_usd"]) == Decimal("3.75") * 60
    # Days alike: the month's hours at the rate, exactly, and no spread
    assert Decimal(total["forecast_usd"]) == Decimal("3.75") * 720
    assert total["low95_usd"] == total["forecast_usd"] == total["high95_usd"]
    search = next(line for line in report["lines"] if line["team"] == "search")
    assert Decimal(search["forecast_usd"]) == 2 * 720


def test_the_as_of_picks_the_month_when_no_period_is_given(dsn: str) -> None:
    result = gpuledger("--clickhouse", dsn, "--as-of", "2026-11-06", "--format", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["month"] == "2026-11" and report["as_of"] == "2026-11-06T00:00:00Z"
    assert Decimal(report["total"]["month_to_date_usd"]) == Decimal("3.75") * 5 * 24


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--period", "2026-13"), "--period '2026-13' is not a month like 2026-11"),
        (("--period", "November"), "--period 'November' is not a month like 2026-11"),
        (("--as-of", "yesterday"), "--as-of 'yesterday' is not a date (2026-11-01)"),
        (("--by", "colour"), "--by 'colour' is not one of team, product, model"),
        (("--format", "xml"), "--format 'xml' is not one of table, csv, json"),
    ],
)
def test_a_bad_option_is_one_line_and_exit_2(dsn: str, args: tuple[str, ...], message: str) -> None:
    result = gpuledger("--clickhouse", dsn, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpuledger report forecast: "), lines
    assert message in lines[0]

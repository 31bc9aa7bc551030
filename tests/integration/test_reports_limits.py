"""Reports over HTTP against an embedded store, under hostile parameters: periods too long to
serve, times no date can hold, results too large to build, and any text in any parameter. Each
answer is a status with a body (200, or 400 with one line, 404, 503); nothing raises. Tenant
text that a spreadsheet would run comes out of every CSV as text."""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from datetime import datetime
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_reports_data import T0_MS, cluster_rows, fresh_store

from streams.reports import chargeback, showback, tags, unit_economics
from streams.reports.http import REPORT_PATHS, handle_report_request
from streams.rows import TokenCostRow, TokenRow
from streams.store import ClickHouseStore

HOSTILE_MODEL = '=HYPERLINK("http://x","y")'
NOW_MS = T0_MS + 3 * 3_600_000


@pytest.fixture(scope="module")
def store() -> ClickHouseStore:
    store = fresh_store()
    rows = [
        dataclasses.replace(r, model=HOSTILE_MODEL)
        if isinstance(r, TokenRow | TokenCostRow) and r.model == "llama-3-70b"
        else r
        for r in cluster_rows(hours=3)
    ]
    store.insert_rows(rows)
    return store


def ask(store: ClickHouseStore, path: str, **query: str) -> tuple[int, str]:
    status, _, body = handle_report_request(store, path, query, now_ms=NOW_MS)
    return status, body.decode("utf-8", "replace")


def assert_one_line_400(answer: tuple[int, str], *words: str) -> None:
    status, text = answer
    assert status == 400, text[:300]
    assert text.endswith("\n") and text.count("\n") == 1, text
    for word in words:
        assert word in text, text


def test_a_report_over_centuries_is_refused_at_once(store: ClickHouseStore) -> None:
    # was: 9.6 s and 700 MB of chart buckets, then a 200
    started = time.perf_counter()
    answer = ask(store, "/report/html", **{"from": "0", "to": "253402300799000"})
    assert time.perf_counter() - started < 1.0
    assert_one_line_400(answer, "--to", "outside the times a report reads")
    assert_one_line_400(
        ask(store, "/report/html", **{"from": "2000-01-01", "to": "2026-11-01"}),
        "at most 400 days",
    )


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/report/showback", {"to": "10000000000000000"}),  # was MemoryError
        ("/report/showback", {"to": "9" * 30}),  # was OverflowError
        ("/report/tags", {"from": "0001-01-01T00:00:00+23:59"}),  # was a 500
        ("/report/unit-economics", {"from": "²"}),
        ("/report/showback", {"from": ""}),
        ("/export/chargeback", {"period": "0000-01"}),  # was a 500
        ("/export/chargeback", {"period": "9999-12"}),  # was a 500
        ("/export/chargeback", {"period": "2026-11", "format": "x" * 10_000}),
    ],
)
def test_parameter_errors_are_400s(
    store: ClickHouseStore, path: str, query: dict[str, str]
) -> None:
    answer = ask(store, path, **query)
    assert_one_line_400(answer)
    assert len(answer[1]) < 300


def test_a_long_period_charts_by_week(store: ClickHouseStore) -> None:
    status, text = ask(store, "/report/html", **{"from": "2026-01-01", "to": "2027-01-01"})
    assert status == 200
    assert "per week" in text


@pytest.mark.parametrize(
    ("path", "module", "query", "words"),
    [
        ("/report/showback", showback, {"by": "namespace"}, ("showback by namespace", "--by")),
        ("/report/tags", tags, {}, ("tags report", "shorter period")),
        ("/report/unit-economics", unit_economics, {}, ("unit economics", "shorter period")),
        ("/export/chargeback", chargeback, {"period": "2026-11"}, ("chargeback of 2026-11",)),
    ],
)
def test_results_past_the_row_limit_are_refused(
    store: ClickHouseStore,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    module: object,
    query: dict[str, str],
    words: tuple[str, ...],
) -> None:
    span = {"from": "2026-11-01", "to": "2026-11-01T03:00:00Z"}
    assert ask(store, path, **span, **query)[0] == 200
    for name in ("MAX_RESULT_ROWS", "MAX_SERIES_POINTS", "MAX_SOURCE_ROWS"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, 0)
    assert_one_line_400(ask(store, path, **span, **query), "more than 0 rows", *words)


def test_hostile_model_names_are_text_in_every_csv(store: ClickHouseStore) -> None:
    span = {"from": "2026-11-01", "to": "2026-11-01T03:00:00Z"}
    status, text = ask(store, "/report/showback", **span, by="model", format="csv")
    assert status == 200
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert "'" + HOSTILE_MODEL in {r["model"] for r in rows}
    assert not any(r["label"].startswith("=") for r in rows)
    status, text = ask(store, "/report/unit-economics", **span, format="csv")
    assert status == 200
    assert "'" + HOSTILE_MODEL in {r["model"] for r in csv.DictReader(io.StringIO(text))}
    status, text = ask(store, "/export/chargeback", period="2026-11", format="focus-csv")
    assert status == 200
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert "'" + HOSTILE_MODEL in {r["x_Model"] for r in rows}
    for row in rows:
        assert not any(cell.startswith(("=", "+", "@")) for cell in row.values()), row
        Decimal(row["BilledCost"])
        Decimal(row["x_MeteredCost"])


def _offset(minutes: int) -> str:
    return (
        "Z"
        if minutes == 0
        else f"{'+' if minutes > 0 else '-'}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    )


_RFC3339 = st.builds(
    lambda moment, minutes: moment.isoformat() + _offset(minutes),
    st.one_of(  # naive: the offset is added as text
        st.datetimes(),
        st.datetimes(max_value=datetime(1, 1, 2)),  # an offset pushes these before year 1
        st.datetimes(min_value=datetime(9999, 12, 30)),  # or past year 9999
    ),
    st.integers(min_value=-1439, max_value=1439),
)
_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(categories=["Nd", "No"]), max_size=16),  # any script's digits
)
_TIMES = st.one_of(
    _TEXT,
    _RFC3339,
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.integers(min_value=10**12, max_value=10**40).map(str),  # Unix ms too large to be a time
    st.dates().map(str),
    st.sampled_from(["2026-11-01", "2026-11-01T02:00:00Z", "1793491200000", ""]),
)
_MONTHS = st.one_of(
    _TEXT,
    st.builds(lambda y, m: f"{y:04d}-{m:02d}", st.integers(0, 9999), st.integers(0, 13)),
    st.just("2026-11"),
)
_CHOICES = st.one_of(
    _TEXT,
    st.sampled_from(["team", "model", "csv", "json", "table", "focus-csv", "focus-parquet"]),
)
_QUERIES = st.one_of(
    st.fixed_dictionaries({"from": _TIMES}),
    st.fixed_dictionaries({"to": _TIMES}),
    st.fixed_dictionaries({"period": _MONTHS}),
    st.fixed_dictionaries(
        {},
        optional={
            "from": _TIMES,
            "to": _TIMES,
            "by": _CHOICES,
            "format": _CHOICES,
            "period": _MONTHS,
        },
    ),
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(path=st.sampled_from([*REPORT_PATHS, "/report/nope"]), query=_QUERIES)
@example(path="/report/showback", query={"to": "9" * 30})
@example(path="/report/tags", query={"from": "0001-01-01T00:00:00+23:59"})
@example(path="/export/chargeback", query={"period": "9999-12"})
def test_any_text_in_any_parameter_is_answered(
    store: ClickHouseStore, path: str, query: dict[str, str]
) -> None:
    status, content_type, body = handle_report_request(store, path, query, now_ms=NOW_MS)
    assert status in (200, 400, 404, 503)
    # The store is up: a 503 here would be a bad parameter that reached ClickHouse.
    assert status != 503, body
    if status == 400:
        assert body.decode().count("\n") == 1 and content_type.startswith("text/plain")

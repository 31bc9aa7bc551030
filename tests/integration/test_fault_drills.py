"""The fault drills of tests/drills/drills.py, each a test, on the real Kafka broker and the real
ClickHouse engine, with short durations (ClickHouse down 5 s, the broker down 1 s).

For each: the per-team totals (FINAL, exact Decimal) equal those of one undisturbed worker run
over the same good events (shared by the session, and itself checked against the allocation
core), no row lost or counted twice, every bad input dead-lettered exactly once with its
reason, every worker alive until told to stop. `tests/drills/run_drills.py` runs the same drills
at full length (ClickHouse down 60 s) and prints them as one table.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from schemas.events import Rejected, decode_event

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "drills"))

import drills
from kafka_broker import DEFAULT_LIBS_DIR, KAFKA_VERSION, fetch_kafka_libs

DRILL_MARKS = (pytest.mark.kafka, pytest.mark.slow)

# Drills that fail only because the worker lacks a feature, with what is missing. Strict: once
# the feature lands the drill passes, the xfail fails, and the entry must go.
MISSING: dict[str, str] = {}


@pytest.fixture(scope="session")
def drill_env(chdb_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[drills.DrillEnv]:
    if not (DEFAULT_LIBS_DIR / f"kafka_2.13-{KAFKA_VERSION}.jar").exists():
        fetch_kafka_libs()
    env = drills.DrillEnv(chdb_dsn, tmp_path_factory.mktemp("drills"), drills.QUICK)
    yield env
    env.close()


@pytest.fixture(scope="session")
def baseline(drill_env: drills.DrillEnv) -> drills.Baseline:
    return asyncio.run(drills.compute_baseline(drill_env))


@pytest.mark.kafka
@pytest.mark.slow
def test_the_undisturbed_run_is_what_the_allocation_core_computes(
    baseline: drills.Baseline,
) -> None:
    differences = drills.total_differences(baseline.oracle, baseline.ledger)
    assert baseline.ledger == baseline.oracle, (
        differences,
        drills.diff(baseline.oracle, baseline.ledger),
    )


def _case(drill: drills.Drill) -> object:
    reason = MISSING.get(drill.slug)
    marks = [*DRILL_MARKS, *([pytest.mark.xfail(strict=True, reason=reason)] if reason else [])]
    return pytest.param(drill.slug, id=drill.slug, marks=marks)


@pytest.mark.parametrize("slug", [_case(d) for d in drills.DRILLS])
def test_drill(slug: str, drill_env: drills.DrillEnv, baseline: drills.Baseline) -> None:
    result = asyncio.run(drills.drill(slug).run(drill_env, baseline))
    assert result.failures() == [], result.report()


# The drills' judges, on made-up input: a drill that cannot fail proves nothing.


def test_a_missing_row_is_lost_and_an_extra_or_larger_one_counted_twice() -> None:
    want = drills.oracle_ledger()
    rows = dict(want.rows)
    cost_keys = [k for k in rows if k[0] == drills.COST_TABLE]
    gone, grown = cost_keys[:2]
    lost_usd = rows.pop(gone)[1]
    team, cost, prompt, completion = rows[grown]
    rows[grown] = (team, cost + Decimal("0.5"), prompt, completion)
    rows[(drills.COST_TABLE, (0, "GPU-extra", "uid-extra"))] = ("x", Decimal(2), 0, 0)
    got = drills.Ledger(want.cost_by_team, want.token_cost_by_team, rows)
    assert drills.diff(want, got) == drills.Diff(1, lost_usd, 2, Decimal("2.5"), 0)
    assert drills.diff(want, want) == drills.Diff()
    moved = {**want.cost_by_team, "search": want.cost_by_team["search"] + 1}
    differences = drills.total_differences(want, drills.Ledger(moved, want.token_cost_by_team, {}))
    assert differences == [
        f"gpu_cost_windows search: {moved['search']} (expected {want.cost_by_team['search']})"
    ]


def test_each_bad_input_must_be_dead_lettered_exactly_once_for_its_reason() -> None:
    def bad(label: str, offset: int, *reasons: str) -> drills.BadInput:
        return drills.BadInput(label, "t", 0, offset, frozenset(reasons))

    def letter(offset: int, reason: str, partition: int = 0) -> dict[str, object]:
        return {"topic": "t", "partition": partition, "offset": offset, "reason": reason}

    expected = [
        bad("once", 1, "invalid_json"),
        bad("twice", 2, "invalid_json"),
        bad("wrong reason", 3, "empty"),
        bad("never", 4, "empty"),
        bad("either", 5, "too_late", "clock_skew"),
    ]
    letters = [
        letter(1, "invalid_json"),
        letter(2, "invalid_json"),
        letter(2, "invalid_json"),
        letter(3, "invalid_json"),
        letter(5, "clock_skew"),
        letter(9, "empty", partition=1),
    ]
    assert drills.dead_letter_problems(expected, letters) == [
        "twice (t): dead-lettered 2 times",
        "wrong reason (t): reason invalid_json, expected empty",
        "never (t): dead-lettered 0 times",
        "unexpected dead letter t|1|9: empty",
    ]


def test_the_poison_is_refused_for_the_reasons_the_drill_expects() -> None:
    for record, label, reasons in drills.input_poison():
        decoded = decode_event(record.value)
        if isinstance(decoded, Rejected):
            assert decoded.reason in reasons, (record.topic, label, decoded)
        else:  # a well-formed event of another topic's type
            assert reasons == {"wrong_topic"}, (record.topic, label, decoded)
            assert drills.record_of(decoded.event).topic != record.topic

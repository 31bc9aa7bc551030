"""The budgets file: what loads, and the one-line error (file:line) for every bad entry."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import ConfigError
from streams.reports.budgets import (
    DEFAULT_THRESHOLDS_PCT,
    EXAMPLE_BUDGETS,
    BudgetsError,
    load_budgets,
    parse_budgets,
)


def test_the_example_loads_with_its_thresholds_and_exact_amounts() -> None:
    budgets = load_budgets(EXAMPLE_BUDGETS)
    assert budgets.dimensions == ("team", "cost_center", "product")
    by_owner = {(b.dimension, b.owner): b for b in budgets.budgets}
    assert by_owner["team", "search"].monthly_usd == Decimal(12000)
    assert by_owner["team", "search"].thresholds_pct == (Decimal(80), Decimal(100))
    assert by_owner["team", "recs"].thresholds_pct == (Decimal(50), Decimal(90), Decimal(100))
    assert by_owner["product", "chat"].monthly_usd == Decimal("15000.50")
    assert by_owner["team", "recs"].threshold_usd(Decimal(90)) == Decimal(7200)
    assert [b.owner for b in budgets.of("team")] == ["search", "recs", "platform"]


def test_defaults_file_thresholds_and_unquoted_numbers() -> None:
    budgets = parse_budgets(
        "thresholds_pct: [100, 75.5]\n"
        "budgets:\n"
        "  - {cost_center: 1001, monthly_usd: '999.99'}\n"
        "  - {namespace: llm, monthly_usd: 10, thresholds_pct: [120]}\n"
    )
    first, second = budgets.budgets
    assert (first.owner, first.monthly_usd) == ("1001", Decimal("999.99"))
    assert first.thresholds_pct == (Decimal("75.5"), Decimal(100))
    assert second.thresholds_pct == (Decimal(120),)
    assert parse_budgets("budgets: [{team: a, monthly_usd: 1}]").budgets[0].thresholds_pct == (
        DEFAULT_THRESHOLDS_PCT
    )


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("budgets:\n  - {team: a, monthly_usd: 1}\n  - {team: a, monthly_usd: 2}\n", 3,
         "duplicate budget for team 'a' (also on line 2)"),
        ("budgets:\n  - {team: a, monthly_usd: -5}\n", 2, "monthly_usd must be more than 0"),
        ("budgets:\n  - {team: a, monthly_usd: 0}\n", 2, "monthly_usd must be more than 0"),
        ("budgets:\n  - {team: a, monthly_usd: lots}\n", 2, "monthly_usd must be a number"),
        ("budgets:\n  - {team: a, monthly_usd: .nan}\n", 2, "monthly_usd must be a number"),
        ("budgets:\n  - {team: a}\n", 2, "monthly_usd is required"),
        ("budgets:\n  - {department: a, monthly_usd: 1}\n", 2, "unknown dimension or key"
         " 'department'"),
        ("budgets:\n  - {model: x, monthly_usd: 1}\n", 2, "unknown dimension or key 'model'"),
        ("budgets:\n  - {team: a, product: b, monthly_usd: 1}\n", 2, "exactly one owner"),
        ("budgets:\n  - {monthly_usd: 1}\n", 2, "exactly one owner"),
        ("budgets:\n  - {team: '', monthly_usd: 1}\n", 2, "team must be a name"),
        ("budgets:\n  - {team: a, monthly_usd: 1, thresholds_pct: [0]}\n", 2, "out of range"),
        ("budgets:\n  - {team: a, monthly_usd: 1, thresholds_pct: [1001]}\n", 2, "out of range"),
        ("budgets:\n  - {team: a, monthly_usd: 1,\n     thresholds_pct: [80, 80]}\n", 3,
         "threshold 80 is given twice"),
        ("budgets:\n  - {team: a, monthly_usd: 1, thresholds_pct: 80}\n", 2, "must be a list"),
        ("thresholds_pct: [-1]\nbudgets: []\n", 1, "out of range"),
        ("currency: EUR\nbudgets: []\n", 1, "currency must be USD"),
        ("budget: []\n", 1, "unknown key 'budget'"),
        ("budgets:\n  team: a\n", 1, "budgets must be a list"),
        ("budgets:\n  - team\n", 2, "each budget must be a mapping"),
        ("budgets:\n  - {team: a, team: b, monthly_usd: 1}\n", 2, "key 'team' is given twice"),
        ("budgets: [\n", 2, "not valid YAML"),
        ("- 1\n", 1, "expected a mapping"),
    ],
)  # fmt: skip
def test_a_bad_entry_is_one_line_naming_file_and_line(text: str, line: int, words: str) -> None:
    with pytest.raises(BudgetsError) as caught:
        parse_budgets(text, source="budgets.yaml")
    message = str(caught.value)
    assert message.startswith(f"budgets.yaml:{line}: "), message
    assert words in message and "\n" not in message
    assert isinstance(caught.value, ConfigError) and caught.value.line == line


def test_an_unreadable_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(BudgetsError, match=r"missing\.yaml: cannot read"):
        load_budgets(tmp_path / "missing.yaml")
    (tmp_path / "latin1.yaml").write_bytes(b"budgets: [{team: \xe9, monthly_usd: 1}]")
    with pytest.raises(BudgetsError, match=r"latin1\.yaml: cannot read"):
        load_budgets(tmp_path / "latin1.yaml")


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**15), max_value=10**15),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["USD", "12000", "-1", "1e999", "NaN", "80", "\uff11\uff12", "team"]),
)
_KEYS = st.sampled_from(
    ["team", "cost_center", "product", "namespace", "model", "monthly_usd", "thresholds_pct",
     "budgets", "currency", "x"]
)  # fmt: skip
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_KEYS, _VALUES, max_size=4))
def test_any_yaml_document_loads_or_raises_the_one_error(doc: dict[str, object]) -> None:
    text = yaml.safe_dump(doc, allow_unicode=True)
    try:
        budgets = parse_budgets(text, source="b.yaml")
    except BudgetsError as exc:
        assert str(exc).startswith("b.yaml:") and "\n" not in str(exc)
        return
    for budget in budgets.budgets:
        assert budget.monthly_usd > 0 and budget.thresholds_pct
        assert all(0 < pct <= 1000 for pct in budget.thresholds_pct)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_text_loads_or_raises_the_one_error(text: str) -> None:
    try:
        parse_budgets(text, source="b.yaml")
    except BudgetsError as exc:
        assert str(exc).startswith("b.yaml")


def test_unquoted_numbers_of_other_bases_stay_names() -> None:
    # YAML 1.1 would read cost centre 0123 as 83 and team 0x1F as 31.
    budgets = parse_budgets(
        "budgets:\n  - {cost_center: 0123, monthly_usd: 1}\n  - {team: 0x1F, monthly_usd: 1}\n"
    )
    assert [b.owner for b in budgets.budgets] == ["0123", "0x1F"]
    with pytest.raises(BudgetsError, match="monthly_usd must be a number"):
        parse_budgets("budgets:\n  - {team: a, monthly_usd: 1:30}\n")

"""The budgets file: a monthly amount in USD per owner (team, cost centre, product or
namespace) and the alert thresholds, as percentages of it, that the budget report and the
worker's gauges compare the month to date and its forecast with.

Loaded once from YAML; every bad entry raises BudgetsError naming the file and line."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from runtime.errors import ConfigError

BUDGET_DIMENSIONS = ("team", "cost_center", "product", "namespace")
DEFAULT_THRESHOLDS_PCT: tuple[Decimal, ...] = (Decimal(80), Decimal(100))
MAX_THRESHOLD_PCT = Decimal(1000)  # ten times the budget: beyond it a threshold means nothing
MAX_AMOUNT_USD = Decimal(10) ** 12  # a trillion dollars a month: past it, a typo
MAX_OWNER_CHARS = 256
MAX_BUDGETS = 10_000  # the most lines a report returns (streams/reports/limits.py)
EXAMPLE_BUDGETS = Path(__file__).resolve().parents[2] / "schemas" / "budgets.example.yaml"
_ENTRY_KEYS = {"monthly_usd", "thresholds_pct", *BUDGET_DIMENSIONS}
_TOP_KEYS = {"currency", "thresholds_pct", "budgets"}
_DECIMAL = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?")


class BudgetsError(ConfigError):
    """The budgets file is unreadable or invalid; the message names the file and line."""

    def __init__(self, message: str, *, path: str, line: int | None = None) -> None:
        where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"{where}{message}")
        self.path = path
        self.line = line


@dataclass(frozen=True, slots=True)
class Budget:
    """One owner's monthly budget. `thresholds_pct` ascending, each in (0, 1000]."""

    dimension: str  # one of BUDGET_DIMENSIONS
    owner: str  # the value of that dimension, as showback names it
    monthly_usd: Decimal
    thresholds_pct: tuple[Decimal, ...] = DEFAULT_THRESHOLDS_PCT
    line: int = 0  # where the file gives it

    def threshold_usd(self, pct: Decimal) -> Decimal:
        return self.monthly_usd * pct / 100


@dataclass(frozen=True, slots=True)
class Budgets:
    source: str
    budgets: tuple[Budget, ...]

    @property
    def dimensions(self) -> tuple[str, ...]:
        """The dimensions the file budgets, in BUDGET_DIMENSIONS order."""
        used = {b.dimension for b in self.budgets}
        return tuple(d for d in BUDGET_DIMENSIONS if d in used)

    def of(self, dimension: str) -> tuple[Budget, ...]:
        return tuple(b for b in self.budgets if b.dimension == dimension)


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping and sequence."""


_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
# YAML 1.1 reads 0123 as octal 83, 0x1F as 31, 1_000 as 1000 and 1:30 as 90: a cost centre
# 0123 must stay "0123". Only plain decimal numbers are numbers here.
_LineLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_LineLoader.add_implicit_resolver(
    _INT_TAG, re.compile(r"^[-+]?(0|[1-9][0-9]*)$"), list("-+0123456789")
)
_LineLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^[-+]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$"
        r"|^\.(nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


class _LineDict(dict[Any, Any]):
    line: int = 0


class _LineList(list[Any]):
    line: int = 0


def _mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineDict:
    loader.flatten_mapping(node)
    mapping = _LineDict()
    mapping.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise _Bad("a key must be text", key_node.start_mark.line + 1) from None
        if key in mapping:
            raise _Bad(f"key {_shown(key)} is given twice", key_node.start_mark.line + 1)
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


def _sequence(loader: _LineLoader, node: yaml.SequenceNode) -> _LineList:
    items = _LineList(loader.construct_object(child, deep=True) for child in node.value)
    items.line = node.start_mark.line + 1
    return items


class _Bad(Exception):
    """Raised inside the loader, where the file's name is not known."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.message, self.line = message, line


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)


def load_budgets(path: str | Path) -> Budgets:
    """Read and check a budgets file; BudgetsError names the line of a bad entry."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise BudgetsError(f"cannot read the budgets file: {reason}", path=str(path)) from exc
    return parse_budgets(text, source=str(path))


def parse_budgets(text: str, *, source: str = "<budgets>") -> Budgets:
    doc = _load_yaml(text, source)
    if not isinstance(doc, _LineDict):
        raise BudgetsError("expected a mapping with a budgets list at the top", path=source, line=1)

    def fail(message: str, line: int) -> BudgetsError:
        return BudgetsError(message, path=source, line=line)

    unknown = sorted(str(k) for k in doc if k not in _TOP_KEYS)
    if unknown:
        raise fail(f"unknown key {unknown[0]!r}: expected {', '.join(sorted(_TOP_KEYS))}", doc.line)
    currency = doc.get("currency", "USD")
    if currency != "USD":
        raise fail(f"currency must be USD, the ledger's currency, not {_shown(currency)}", doc.line)
    defaults = DEFAULT_THRESHOLDS_PCT
    if "thresholds_pct" in doc:
        defaults = _thresholds(doc["thresholds_pct"], doc.line, fail)
    entries = doc.get("budgets")
    if not isinstance(entries, _LineList):
        raise fail("budgets must be a list of {team|cost_center|...: owner, monthly_usd}", doc.line)
    if len(entries) > MAX_BUDGETS:
        raise fail(f"more than {MAX_BUDGETS:,} budgets", entries.line)
    budgets: list[Budget] = []
    seen: dict[tuple[str, str], int] = {}
    for item in entries:
        if not isinstance(item, _LineDict):
            raise fail("each budget must be a mapping such as {team: search, monthly_usd: 12000}",
                       entries.line)  # fmt: skip
        budget = _budget(item, defaults, fail)
        key = (budget.dimension, budget.owner)
        if key in seen:
            raise fail(
                f"duplicate budget for {budget.dimension} {budget.owner!r} (also on line "
                f"{seen[key]})",
                item.line,
            )
        seen[key] = item.line
        budgets.append(budget)
    return Budgets(source, tuple(budgets))


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_LineLoader)
    except _Bad as exc:
        raise BudgetsError(exc.message, path=source, line=exc.line) from None
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise BudgetsError(f"not valid YAML: {exc.problem}", path=source, line=line) from None
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as exc:
        # SafeLoader's constructors raise ValueError (a bad date) or TypeError (an unhashable
        # key), and deep nesting recurses: each is a bad file, not a crash.
        raise BudgetsError(f"not valid YAML: {exc}", path=source) from None


def _budget(item: _LineDict, defaults: tuple[Decimal, ...], fail: Any) -> Budget:
    unknown = sorted(str(k) for k in item if k not in _ENTRY_KEYS)
    if unknown:
        raise fail(
            f"unknown dimension or key {unknown[0]!r}: a budget names one of "
            f"{', '.join(BUDGET_DIMENSIONS)}, its monthly_usd and optionally thresholds_pct",
            item.line,
        )
    named = [d for d in BUDGET_DIMENSIONS if d in item]
    if len(named) != 1:
        raise fail(
            f"a budget names exactly one owner: one of {', '.join(BUDGET_DIMENSIONS)}"
            + (f" (this one names {', '.join(named)})" if named else ""),
            item.line,
        )
    dimension = named[0]
    owner = item[dimension]
    if isinstance(owner, int) and not isinstance(owner, bool):
        owner = str(owner)  # an unquoted cost centre such as 1001
    if not isinstance(owner, str) or not owner.strip() or len(owner) > MAX_OWNER_CHARS:
        raise fail(f"{dimension} must be a name of 1 to {MAX_OWNER_CHARS} characters", item.line)
    amount = _amount(item.get("monthly_usd"), item.line, fail)
    thresholds = defaults
    if "thresholds_pct" in item:
        thresholds = _thresholds(item["thresholds_pct"], item.line, fail)
    return Budget(dimension, owner, amount, thresholds, item.line)


def _number(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    if isinstance(value, str) and not _DECIMAL.fullmatch(value.strip()):
        return None  # Decimal() would also take digits of other scripts and "NaN"
    try:
        # repr: a float as written in the file (12000.1), not its binary expansion
        number = Decimal(repr(value) if isinstance(value, float) else str(value).strip())
    except (InvalidOperation, ValueError):
        return None
    return number if number.is_finite() else None


def _amount(value: Any, line: int, fail: Any) -> Decimal:
    if value is None:
        raise fail("monthly_usd is required: the budget in USD a month", line)
    amount = _number(value)
    if amount is None:
        raise fail(f"monthly_usd must be a number of USD, not {_shown(value)}", line)
    if amount <= 0:
        raise fail(f"monthly_usd must be more than 0, not {amount}", line)
    if amount > MAX_AMOUNT_USD:
        raise fail(f"monthly_usd {amount} is more than {MAX_AMOUNT_USD:,} USD", line)
    return amount


def _thresholds(value: Any, line: int, fail: Any) -> tuple[Decimal, ...]:
    where = value.line if isinstance(value, _LineList) else line
    if not isinstance(value, list) or not value:
        raise fail("thresholds_pct must be a list of percentages of the budget, e.g. [80, 100]",
                   where)  # fmt: skip
    found: set[Decimal] = set()
    for raw in value:
        pct = _number(raw)
        if pct is None or not 0 < pct <= MAX_THRESHOLD_PCT:
            raise fail(
                f"threshold {_shown(raw)} is out of range: a percentage of the budget above 0 "
                f"and at most {MAX_THRESHOLD_PCT}",
                where,
            )
        if pct in found:
            raise fail(f"threshold {pct} is given twice", where)
        found.add(pct)
    return tuple(sorted(p.to_integral_value() if p == p.to_integral_value() else p for p in found))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

"""The price book: USD per device-hour by GPU model, pricing class and effective date.

Loaded once from YAML (design §3); lookups are pure. Prices are Decimals so a month of
sums is exact. Errors name the file and line.
"""

from __future__ import annotations

import datetime as dt
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from runtime.errors import PriceBookError

PRICING_CLASSES = ("on_demand", "spot", "reserved", "custom")
EXAMPLE_PRICE_BOOK = Path(__file__).resolve().parent.parent / "schemas" / "price_book.example.yaml"

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
MAX_ENTRY_ID_CHARS = 256


@dataclass(frozen=True, slots=True)
class PriceEntry:
    gpu_model: str
    pricing: str
    price_per_hour_usd: Decimal
    effective_from_ms: int  # Unix ms at UTC midnight of effective_from; 0 when not given
    entry_id: str = ""  # the entry's `id`, or `entry_id_for(...)` when the book gives none

    def __post_init__(self) -> None:
        if not self.entry_id:
            object.__setattr__(
                self, "entry_id", entry_id_for(self.gpu_model, self.pricing, self.effective_from_ms)
            )


DEFAULT_ENTRY_ID = "default"


def entry_id_for(gpu_model: str, pricing: str, effective_from_ms: int) -> str:
    """The stable id of an entry the book names no `id` for: model, class and the date (or
    time) it takes effect, e.g. `NVIDIA H200|on_demand|2026-01-01`; `always` when undated."""
    if effective_from_ms == 0:
        since = "always"
    else:
        moment = _EPOCH + dt.timedelta(milliseconds=effective_from_ms)
        since = moment.strftime("%Y-%m-%d") if moment.time() == dt.time() else moment.isoformat()
        since = since.replace("+00:00", "Z")
    return f"{gpu_model}|{pricing}|{since}"


@dataclass(frozen=True, slots=True)
class Quote:
    """The price that applies to one whole device for one sample."""

    price_per_hour_usd: Decimal
    pricing: str
    known_model: bool


@dataclass(frozen=True)
class PriceBook:
    currency: str
    default_price_per_hour_usd: Decimal
    entries: tuple[PriceEntry, ...]
    pricing_from_node_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    default_pricing: str = "on_demand"
    _index: dict[tuple[str, str], tuple[list[int], list[Decimal]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _entries: dict[tuple[str, str], list[PriceEntry]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        grouped: dict[tuple[str, str], list[PriceEntry]] = {}
        for entry in self.entries:
            grouped.setdefault((entry.gpu_model, entry.pricing), []).append(entry)
        for key, items in grouped.items():
            items.sort(key=lambda e: e.effective_from_ms)
            self._index[key] = (
                [e.effective_from_ms for e in items],
                [e.price_per_hour_usd for e in items],
            )
            self._entries[key] = items

    def pricing_class(self, node_labels: Mapping[str, str]) -> str:
        """The first label in the book's list that the node carries decides the class."""
        for label, mapping in self.pricing_from_node_labels.items():
            value = node_labels.get(label)
            if value is not None and value in mapping:
                return mapping[value]
        return self.default_pricing

    def quote(self, gpu_model: str, pricing: str, time_ms: int) -> Quote:
        """Whole-GPU price at `time_ms`; falls back to on_demand, then to the default price."""
        for candidate in (pricing, "on_demand"):
            found = self._lookup(gpu_model, candidate, time_ms)
            if found is not None:
                return Quote(found, pricing if candidate == pricing else candidate, True)
        return Quote(self.default_price_per_hour_usd, pricing, False)

    def quote_span(self, gpu_model: str, pricing: str, time_ms: int) -> tuple[Quote, int, int]:
        """`quote(...)` and the times [from, until) in Unix ms over which it holds unchanged:
        the nearest effective dates around `time_ms` of every series the quote consults."""
        lo, hi = -(2**63), 2**63
        for candidate in {pricing, "on_demand"}:
            series = self._index.get((gpu_model, candidate))
            if series is None:
                continue
            starts = series[0]
            at = bisect_right(starts, time_ms)
            if at:
                lo = max(lo, starts[at - 1])
            if at < len(starts):
                hi = min(hi, starts[at])
        return self.quote(gpu_model, pricing, time_ms), lo, hi

    def entry_at(self, gpu_model: str, pricing: str, time_ms: int) -> PriceEntry | None:
        """The entry whose price `quote` applied to a device billed as `pricing` (the class a
        cost row records, after any fallback) at `time_ms`; None when the default price was."""
        series = self._index.get((gpu_model, pricing))
        if series is None:
            return None
        at = bisect_right(series[0], time_ms)
        return self._entries[(gpu_model, pricing)][at - 1] if at else None

    def _lookup(self, gpu_model: str, pricing: str, time_ms: int) -> Decimal | None:
        series = self._index.get((gpu_model, pricing))
        if series is None:
            return None
        starts, prices = series
        at = bisect_right(starts, time_ms)
        return prices[at - 1] if at else None


def device_price_per_hour(
    whole_gpu_usd: Decimal, mig_slices: int | None, gpu_slices: int
) -> Decimal:
    """A MIG instance costs its parent's price times its share of compute slices."""
    if mig_slices is None:
        return whole_gpu_usd
    return whole_gpu_usd * mig_slices / gpu_slices


# --------------------------------------------------------------------------- loading


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping, for error messages."""


def _key(key: object) -> str:
    return str(key).lower() if isinstance(key, bool) else str(key)


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    raw = loader.construct_mapping(node, deep=True)
    # YAML reads an unquoted `true` key as a boolean; label values are always strings.
    mapping = _LineDict({_key(k): v for k, v in raw.items()})
    mapping.line = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _LineDict(dict[str, Any]):
    line: int = 0


def load_price_book(path: str | Path) -> PriceBook:
    """Read and validate a price book file; raises PriceBookError naming the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PriceBookError(f"cannot read price book: {exc.strerror}", path=str(path)) from exc
    return parse_price_book(text, source=str(path))


def parse_price_book(text: str, *, source: str = "<price book>") -> PriceBook:
    try:
        doc = yaml.load(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise PriceBookError(f"not valid YAML: {exc.problem}", path=source, line=line) from exc
    except yaml.YAMLError as exc:
        raise PriceBookError(f"not valid YAML: {exc}", path=source) from exc
    if not isinstance(doc, _LineDict):
        raise PriceBookError("expected a mapping at the top level", path=source, line=1)

    def fail(message: str, where: _LineDict) -> PriceBookError:
        return PriceBookError(message, path=source, line=where.line)

    currency = doc.get("currency", "USD")
    if not isinstance(currency, str) or len(currency) != 3:
        raise fail("currency must be a 3-letter ISO 4217 code such as USD", doc)
    default = _money(doc.get("default_price_per_hour"), "default_price_per_hour", doc, source)
    default_pricing = doc.get("default_pricing", "on_demand")
    if default_pricing not in PRICING_CLASSES:
        raise fail(f"default_pricing must be one of {', '.join(PRICING_CLASSES)}", doc)

    raw_prices = doc.get("prices", [])
    if not isinstance(raw_prices, list):
        raise fail("prices must be a list", doc)
    entries = []
    for item in raw_prices:
        if not isinstance(item, _LineDict):
            raise fail("each entry of prices must be a mapping", doc)
        entries.append(_entry(item, source))
    seen: set[tuple[str, str, int]] = set()
    ids: set[str] = {DEFAULT_ENTRY_ID}
    for entry, item in zip(entries, raw_prices, strict=True):
        key = (entry.gpu_model, entry.pricing, entry.effective_from_ms)
        if key in seen:
            raise fail(
                f"duplicate price for {entry.gpu_model!r} / {entry.pricing} at the same date", item
            )
        seen.add(key)
        if entry.entry_id in ids:
            raise fail(f"id {entry.entry_id!r} is used by another entry (or is reserved)", item)
        ids.add(entry.entry_id)

    rules = doc.get("pricing_from_node_labels", {}) or {}
    if not isinstance(rules, dict):
        raise fail("pricing_from_node_labels must map label -> {value: pricing class}", doc)
    label_rules: dict[str, dict[str, str]] = {}
    for label, mapping in rules.items():
        if not isinstance(mapping, dict):
            raise fail(f"pricing_from_node_labels.{label} must map label values to classes", doc)
        where = mapping if isinstance(mapping, _LineDict) else doc
        converted = {}
        for value, pricing in mapping.items():
            if pricing not in PRICING_CLASSES:
                raise fail(
                    f"pricing_from_node_labels.{label}: {pricing!r} is not one of "
                    f"{', '.join(PRICING_CLASSES)}",
                    where,
                )
            converted[value] = pricing
        label_rules[str(label)] = converted
    return PriceBook(
        currency=currency,
        default_price_per_hour_usd=default,
        entries=tuple(entries),
        pricing_from_node_labels=label_rules,
        default_pricing=default_pricing,
    )


def _entry(item: _LineDict, source: str) -> PriceEntry:
    model = item.get("gpu_model")
    if not isinstance(model, str) or not model:
        raise PriceBookError("gpu_model must be a non-empty string", path=source, line=item.line)
    pricing = item.get("pricing", "on_demand")
    if pricing not in PRICING_CLASSES:
        raise PriceBookError(
            f"pricing {pricing!r} is not one of {', '.join(PRICING_CLASSES)}",
            path=source,
            line=item.line,
        )
    price = _money(item.get("price_per_hour"), "price_per_hour", item, source)
    effective = item.get("effective_from")
    start_ms = 0
    if effective is not None:
        if isinstance(effective, dt.datetime):
            moment = effective if effective.tzinfo else effective.replace(tzinfo=dt.UTC)
        elif isinstance(effective, dt.date):
            moment = dt.datetime(effective.year, effective.month, effective.day, tzinfo=dt.UTC)
        else:
            raise PriceBookError(
                "effective_from must be a date such as 2026-01-01", path=source, line=item.line
            )
        start_ms = (moment - _EPOCH) // dt.timedelta(milliseconds=1)
    entry_id = item.get("id", "")
    if not isinstance(entry_id, str) or len(entry_id) > MAX_ENTRY_ID_CHARS:
        raise PriceBookError(
            f"id must be text of at most {MAX_ENTRY_ID_CHARS} characters",
            path=source,
            line=item.line,
        )
    return PriceEntry(model, pricing, price, start_ms, entry_id)


def _money(value: Any, name: str, where: _LineDict, source: str) -> Decimal:
    if value is None:
        raise PriceBookError(f"{name} is required", path=source, line=where.line)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PriceBookError(f"{name} must be a number", path=source, line=where.line)
    try:
        amount = Decimal(str(value))
    except InvalidOperation as exc:
        raise PriceBookError(f"{name} must be a number", path=source, line=where.line) from exc
    if not amount.is_finite() or amount < 0:
        raise PriceBookError(f"{name} must be zero or more", path=source, line=where.line)
    return amount

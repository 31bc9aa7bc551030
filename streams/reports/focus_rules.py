"""Checks of FOCUS 1.3 Cost and Usage rows against the statements of the 1.3 text that apply to
gpuledger's export, above all those the FinOps Foundation's validator (FOCUS 1.2 rules) does
not know: split cost allocation, exact unit price x quantity, the SkuPriceId nulls. Returns the
violations, one line each; empty means the rows hold. Rows are as `focus_files.read_rows`
gives them: numbers as Decimal, nulls as None.

Each check names the column page of the 1.3 specification it comes from
(specification/datasets/cost_and_usage/columns/<column>.md) or the attribute page
(specification/attributes/...).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from streams.reports.focus_charges import EXACT

# Present in every row (1.3 Cost and Usage: Mandatory columns, the two deprecated ones still
# mandatory in 1.3, and the split-cost-allocation columns a data generator that splits must have).
MANDATORY = (
    "AllocatedMethodId",
    "AllocatedResourceId",
    "AllocatedResourceName",
    "AllocatedTags",
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "ContractedCost",
    "EffectiveCost",
    "HostProviderName",
    "InvoiceIssuerName",
    "ListCost",
    "ListUnitPrice",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "ServiceCategory",
    "ServiceName",
    "ServiceProviderName",
    "SkuId",
    "SkuPriceId",
)
NOT_NULL = (
    "BilledCost",
    "BillingAccountId",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeFrequency",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "ContractedCost",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "ProviderName",
    "PublisherName",
    "ServiceCategory",
    "ServiceName",
    "ServiceProviderName",
)
# Must be null where SkuPriceId is (1.3: listunitprice, contractedunitprice, pricingquantity,
# pricingcategory, consumedquantity, skupricedetails).
NULL_WITHOUT_SKU_PRICE = (
    "ListUnitPrice",
    "ContractedUnitPrice",
    "PricingQuantity",
    "PricingCategory",
    "ConsumedQuantity",
    "SkuPriceDetails",
)
# Summable metrics: the allocated charges of one origin charge add up to it.
SUMMABLE = (
    "BilledCost",
    "EffectiveCost",
    "ListCost",
    "ContractedCost",
    "PricingQuantity",
    "ConsumedQuantity",
)
# Dimensions and non-aggregatable metrics: equal on every allocated charge of one origin charge
# (attributes/data_generator_calculated_split_cost_allocation_handling.md).
ORIGIN_COLUMNS = (
    "BillingAccountId",
    "BillingCurrency",
    "BillingPeriodStart",
    "BillingPeriodEnd",
    "ChargeCategory",
    "ChargeFrequency",
    "ChargePeriodStart",
    "ChargePeriodEnd",
    "ContractedUnitPrice",
    "HostProviderName",
    "InvoiceId",
    "InvoiceIssuerName",
    "ListUnitPrice",
    "PricingCategory",
    "PricingUnit",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "ServiceCategory",
    "ServiceName",
    "ServiceProviderName",
    "ServiceSubcategory",
    "SkuId",
    "SkuPriceId",
    "SubAccountId",
    "Tags",
    "AllocatedMethodId",
)
CHARGE_CATEGORIES = {"Usage", "Purchase", "Tax", "Credit", "Adjustment"}
PRICING_CATEGORIES = {"Standard", "Dynamic", "Committed", "Other"}
CHARGE_FREQUENCIES = {"One-Time", "Recurring", "Usage-Based"}
SUBCATEGORIES = {
    "AI and Machine Learning": {
        "AI Platforms",
        "Bots",
        "Generative AI",
        "Machine Learning",
        "Natural Language Processing",
        "Other (AI and Machine Learning)",
    },
    "Compute": {
        "Containers",
        "End User Computing",
        "Quantum Compute",
        "Serverless Compute",
        "Virtual Machines",
        "Other (Compute)",
    },
}
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_PASCAL = re.compile(r"^[A-Z][A-Za-z0-9]*$")
_CUSTOM = re.compile(r"^x_[A-Za-z0-9]+$")
_METRICS = (*SUMMABLE, "ListUnitPrice", "ContractedUnitPrice")
_ELEMENT_KEYS = {"AllocatedRatio", "UsageUnit", "UsageQuantity"}


def _null(value: Any) -> bool:
    return value is None


def _number(value: Any) -> Decimal | None:
    if isinstance(value, Decimal) and value.is_finite():
        return value
    return None


def _object(text: Any) -> Any:
    try:
        return json.loads(str(text), parse_float=Decimal, parse_int=Decimal)
    except ValueError:
        return None


def check_rows(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    problems: list[str] = []
    origins: dict[tuple[Any, ...], list[tuple[int, Mapping[str, Any], Decimal]]] = {}
    seen_custom = False
    rows = list(rows)
    for column in rows[0] if rows else ():
        if _CUSTOM.match(column):
            seen_custom = True
        elif not _PASCAL.match(column):
            problems.append(f"column {column!r} is neither PascalCase nor x_-prefixed")
        elif seen_custom:
            problems.append(f"FOCUS column {column} comes after custom columns")
    for n, row in enumerate(rows, start=1):

        def bad(text: str, n: int = n) -> None:
            problems.append(f"row {n}: {text}")

        _check_columns(row, bad)
        ratio = _check_allocation(row, bad)
        if ratio is not None:
            key = tuple(row.get(c) for c in ("ResourceId", "ChargePeriodStart", "SkuPriceId"))
            key += (row.get("ListUnitPrice"),)
            origins.setdefault(key, []).append((n, row, ratio))
    for key, parts in origins.items():
        _check_origin(key, parts, problems)
    return problems


def _check_columns(row: Mapping[str, Any], bad: Any) -> None:
    for column in MANDATORY:
        if column not in row:
            bad(f"mandatory column {column} missing")
    for column in NOT_NULL:
        if column in row and _null(row[column]):
            bad(f"{column} is null")
    for column, value in row.items():
        if value == "":
            bad(f"{column} is an empty string (null_handling: use null)")
    for column in _METRICS:
        if column in row and not _null(row[column]) and _number(row[column]) is None:
            bad(f"{column} {row[column]!r} is not a decimal number")
    for column in (
        "BillingPeriodStart",
        "BillingPeriodEnd",
        "ChargePeriodStart",
        "ChargePeriodEnd",
    ):
        if not _DATETIME.match(str(row.get(column, ""))):
            bad(f"{column} {row.get(column)!r} is not YYYY-MM-DDTHH:mm:ssZ")
    start, end = str(row.get("ChargePeriodStart")), str(row.get("ChargePeriodEnd"))
    if start >= end:
        bad("ChargePeriodStart is not before ChargePeriodEnd")
    if str(row.get("BillingPeriodStart")) >= str(row.get("BillingPeriodEnd")):
        bad("BillingPeriodStart is not before BillingPeriodEnd")
    if not (
        str(row.get("BillingPeriodStart")) <= start and end <= str(row.get("BillingPeriodEnd"))
    ):
        bad("the charge period is not inside the billing period")
    if not _CURRENCY.match(str(row.get("BillingCurrency", ""))):
        bad("BillingCurrency is not an ISO 4217 code")
    if row.get("ChargeCategory") not in CHARGE_CATEGORIES:
        bad(f"ChargeCategory {row.get('ChargeCategory')!r} not allowed")
    if not _null(row.get("ChargeClass")) and row.get("ChargeClass") != "Correction":
        bad("ChargeClass must be null or Correction")
    if row.get("ChargeFrequency") not in CHARGE_FREQUENCIES:
        bad("ChargeFrequency not allowed")
    category, sub = row.get("ServiceCategory"), row.get("ServiceSubcategory")
    if category in SUBCATEGORIES and sub not in SUBCATEGORIES[category]:
        bad(f"ServiceSubcategory {sub!r} does not belong to {category}")
    pricing = row.get("PricingCategory")
    if not _null(pricing) and pricing not in PRICING_CATEGORIES:
        bad("PricingCategory not allowed")
    if pricing == "Committed" and _null(row.get("CommitmentDiscountId")):
        bad("PricingCategory Committed without a CommitmentDiscountId")
    usage = row.get("ChargeCategory") == "Usage" and _null(row.get("ChargeClass"))
    if _null(row.get("SkuPriceId")):
        if usage:
            bad("SkuPriceId is null on a Usage charge (skupriceid: MUST NOT be null)")
        for column in NULL_WITHOUT_SKU_PRICE:
            if not _null(row.get(column)):
                bad(f"{column} is set while SkuPriceId is null")
    elif usage:
        for column in ("ListUnitPrice", "PricingQuantity", "PricingUnit", "PricingCategory"):
            if _null(row.get(column)):
                bad(f"{column} is null on a Usage charge with a SkuPriceId")
    if _null(row.get("PricingQuantity")) != _null(row.get("PricingUnit")):
        bad("PricingUnit and PricingQuantity must be null together")
    if _null(row.get("ConsumedQuantity")) != _null(row.get("ConsumedUnit")):
        bad("ConsumedUnit and ConsumedQuantity must be null together")
    quantity = _number(row.get("PricingQuantity"))
    for cost_column, price_column in (
        ("ListCost", "ListUnitPrice"),
        ("ContractedCost", "ContractedUnitPrice"),
    ):
        price, cost = _number(row.get(price_column)), _number(row.get(cost_column))
        if price is None or quantity is None or cost is None:
            continue
        if EXACT.multiply(price, quantity) != cost:
            bad(f"{cost_column} {cost} is not {price_column} x PricingQuantity exactly")
    if _null(row.get("ResourceId")):
        for column in ("ResourceName", "ResourceType"):
            if not _null(row.get(column)):
                bad(f"{column} is set without a ResourceId")
    elif _null(row.get("ResourceType")):
        bad("ResourceType is null although ResourceId is set")
    elif row.get("ResourceName") == row.get("ResourceId"):
        bad("ResourceName duplicates a system-generated ResourceId")
    if _null(row.get("SkuId")) and not _null(row.get("SkuMeter")):
        bad("SkuMeter is set without a SkuId")
    for column in ("Tags", "AllocatedTags", "SkuPriceDetails"):
        if not _null(row.get(column)):
            value = _object(row[column])
            if not isinstance(value, dict):
                bad(f"{column} is not a JSON object")
            elif any(isinstance(v, dict | list) for v in value.values()):
                bad(f"{column} holds an object or array (key_value_format: flat values)")
            elif column == "SkuPriceDetails" and any(
                not (_CUSTOM.match(k) or _PASCAL.match(k)) for k in value
            ):
                bad("SkuPriceDetails has a key that is neither FOCUS-defined nor x_-prefixed")


def _check_allocation(row: Mapping[str, Any], bad: Any) -> Decimal | None:
    """The row's AllocatedRatio (of its only element), or None if it is no allocated charge."""
    method, details = row.get("AllocatedMethodId"), row.get("AllocatedMethodDetails")
    resource, name = row.get("AllocatedResourceId"), row.get("AllocatedResourceName")
    if _null(resource) != _null(name):
        bad("AllocatedResourceName must be null exactly when AllocatedResourceId is")
    if _null(method):
        for column in ("AllocatedMethodDetails", "AllocatedResourceId", "AllocatedTags"):
            if not _null(row.get(column)):
                bad(f"{column} is set on a charge that is not a split cost allocation")
        return None
    if not _null(row.get("AllocatedTags")):
        tags = _object(row["AllocatedTags"])
        origin = _object(row["Tags"]) if not _null(row.get("Tags")) else {}
        if isinstance(tags, dict) and isinstance(origin, dict) and set(tags) & set(origin):
            bad("AllocatedTags repeats a key of Tags")
    if _null(details):
        bad("AllocatedMethodDetails is null on an allocated charge")
        return None
    parsed = _object(details)
    elements = parsed.get("Elements") if isinstance(parsed, dict) else None
    if not isinstance(elements, list) or not elements:
        bad("AllocatedMethodDetails has no Elements array")
        return None
    total = Decimal(0)
    for element in elements:
        ratio = element.get("AllocatedRatio") if isinstance(element, dict) else None
        if not isinstance(ratio, Decimal) or not Decimal(0) <= ratio <= Decimal(1):
            bad("AllocatedRatio missing or outside [0, 1]")
            return None
        if "UsageQuantity" in element and "UsageUnit" not in element:
            bad("UsageQuantity without UsageUnit")
        for key in element:
            if key not in _ELEMENT_KEYS and not _CUSTOM.match(key):
                bad(f"Elements key {key!r} is neither FOCUS-defined nor x_-prefixed")
        total += ratio
    return total


def _check_origin(
    key: tuple[Any, ...],
    parts: list[tuple[int, Mapping[str, Any], Decimal]],
    problems: list[str],
) -> None:
    where = f"origin charge {key[0]} at {key[1]} ({key[2]})"
    ratios = sum((r for _, _, r in parts), Decimal(0))
    if ratios != 1:
        problems.append(f"{where}: AllocatedRatio adds up to {ratios}, not 1")
    first = parts[0][1]
    for column in ORIGIN_COLUMNS:
        values = {str(row.get(column)) for _, row, _ in parts}
        if len(values) > 1:
            problems.append(f"{where}: its allocated charges differ in {column}")
    price, quantity = _number(first.get("ListUnitPrice")), Decimal(0)
    cost = Decimal(0)
    for _, row, _ in parts:
        quantity = EXACT.add(quantity, _number(row.get("PricingQuantity")) or Decimal(0))
        cost = EXACT.add(cost, _number(row.get("ListCost")) or Decimal(0))
    if price is not None and EXACT.multiply(price, quantity) != cost:
        problems.append(f"{where}: the parts' ListCost is not ListUnitPrice x their quantity")
    owners = [str(row.get("AllocatedResourceId")) for _, row, _ in parts]
    named = [o for o in owners if o != "None"]
    if len(set(named)) != len(named):
        problems.append(f"{where}: an owner has more than one allocated charge")

"""Checks of a FOCUS 1.3 Cost and Usage charge list against the specification's column rules
that apply to gpuledger's export. Returns the violations, one line each; empty means valid."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

MANDATORY = (
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
    "PricingQuantity",
    "PricingUnit",
    "ServiceCategory",
    "ServiceName",
    "ServiceProviderName",
)
NOT_NULL = (
    "BilledCost",
    "BillingAccountId",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "ContractedCost",
    "EffectiveCost",
    "HostProviderName",
    "InvoiceIssuerName",
    "ListCost",
    "ServiceCategory",
    "ServiceName",
    "ServiceProviderName",
    "ChargeFrequency",
)
CHARGE_CATEGORIES = {"Usage", "Purchase", "Tax", "Credit", "Adjustment"}
PRICING_CATEGORIES = {"Standard", "Dynamic", "Committed", "Other"}
CHARGE_FREQUENCIES = {"One-Time", "Recurring", "Usage-Based"}
SERVICE_CATEGORIES = {
    "AI and Machine Learning",
    "Analytics",
    "Business Applications",
    "Compute",
    "Databases",
    "Developer Tools",
    "Multicloud",
    "Identity",
    "Integration",
    "Internet of Things",
    "Management and Governance",
    "Media",
    "Migration",
    "Mobile",
    "Networking",
    "Security",
    "Storage",
    "Web",
    "Other",
}
AI_SUBCATEGORIES = {
    "AI Platforms",
    "Bots",
    "Generative AI",
    "Machine Learning",
    "Natural Language Processing",
    "Other (AI and Machine Learning)",
}
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_PASCAL = re.compile(r"^[A-Z][A-Za-z0-9]*$")
_CUSTOM = re.compile(r"^x_[A-Za-z0-9]+$")
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
_METRICS = (
    "BilledCost",
    "EffectiveCost",
    "ListCost",
    "ContractedCost",
    "PricingQuantity",
    "ConsumedQuantity",
    "ListUnitPrice",
    "ContractedUnitPrice",
)


def _null(value: Any) -> bool:
    return value is None or value == ""


def _decimal(value: Any) -> Decimal | None:
    if _null(value):
        return None
    text = format(value, "f") if isinstance(value, Decimal) else str(value)
    if not _NUMBER.match(text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern rules it out
        return None


def check_rows(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    problems: list[str] = []
    rows = list(rows)
    ratio_sums: dict[str, Decimal] = {}
    for n, row in enumerate(rows, start=1):

        def bad(text: str, n: int = n) -> None:
            problems.append(f"row {n}: {text}")

        for column in row:
            if not (_PASCAL.match(column) or _CUSTOM.match(column)):
                bad(f"column {column!r} is neither PascalCase nor x_-prefixed")
        for column in MANDATORY:
            if column not in row:
                bad(f"mandatory column {column} missing")
        for column in NOT_NULL:
            if column in row and _null(row[column]):
                bad(f"{column} is null")
        for column in _METRICS:
            if column in row and not _null(row[column]) and _decimal(row[column]) is None:
                bad(f"{column} {row[column]!r} is not a plain decimal number")
        for column in (
            "BillingPeriodStart",
            "BillingPeriodEnd",
            "ChargePeriodStart",
            "ChargePeriodEnd",
        ):
            if not _DATETIME.match(str(row.get(column, ""))):
                bad(f"{column} {row.get(column)!r} is not YYYY-MM-DDTHH:mm:ssZ")
        if str(row.get("BillingPeriodStart")) >= str(row.get("BillingPeriodEnd")):
            bad("BillingPeriodStart is not before BillingPeriodEnd")
        if str(row.get("ChargePeriodStart")) >= str(row.get("ChargePeriodEnd")):
            bad("ChargePeriodStart is not before ChargePeriodEnd")
        if not _CURRENCY.match(str(row.get("BillingCurrency", ""))):
            bad("BillingCurrency is not an ISO 4217 code")
        if row.get("ChargeCategory") not in CHARGE_CATEGORIES:
            bad(f"ChargeCategory {row.get('ChargeCategory')!r} not allowed")
        if not _null(row.get("ChargeClass")) and row.get("ChargeClass") != "Correction":
            bad("ChargeClass must be null or Correction")
        if row.get("ChargeFrequency") not in CHARGE_FREQUENCIES:
            bad("ChargeFrequency not allowed")
        if row.get("ServiceCategory") not in SERVICE_CATEGORIES:
            bad("ServiceCategory not allowed")
        if (
            row.get("ServiceCategory") == "AI and Machine Learning"
            and row.get("ServiceSubcategory") not in AI_SUBCATEGORIES
        ):
            bad("ServiceSubcategory does not belong to AI and Machine Learning")
        if (
            not _null(row.get("PricingCategory"))
            and row["PricingCategory"] not in PRICING_CATEGORIES
        ):
            bad("PricingCategory not allowed")
        quantity = _decimal(row.get("PricingQuantity"))
        if row.get("ChargeCategory") == "Usage":
            if quantity is None or _null(row.get("PricingUnit")):
                bad("a Usage charge needs PricingQuantity and PricingUnit")
            if _null(row.get("ConsumedQuantity")) or _null(row.get("ConsumedUnit")):
                bad("a Usage charge needs ConsumedQuantity and ConsumedUnit")
        unit_price = _decimal(row.get("ListUnitPrice"))
        list_cost = _decimal(row.get("ListCost"))
        if (
            unit_price is not None
            and quantity is not None
            and list_cost is not None
            and abs(unit_price * quantity - list_cost) > Decimal("0.01")
        ):
            bad("ListUnitPrice x PricingQuantity differs from ListCost by more than a cent")
        billed, effective = _decimal(row.get("BilledCost")), _decimal(row.get("EffectiveCost"))
        if billed is not None and effective is not None and billed != effective:
            bad("EffectiveCost differs from BilledCost without any discount")
        for column in ("Tags", "AllocatedTags"):
            if not _null(row.get(column)):
                try:
                    tags = json.loads(str(row[column]))
                except ValueError:
                    tags = None
                if not isinstance(tags, dict):
                    bad(f"{column} is not a JSON object")
                elif column == "AllocatedTags" and set(tags) & set(_tags(row)):
                    bad("AllocatedTags repeats a key of Tags")
        method = row.get("AllocatedMethodId")
        details = row.get("AllocatedMethodDetails")
        if _null(method) != _null(details):
            bad("AllocatedMethodId and AllocatedMethodDetails must both be set or both null")
        if _null(method) and not _null(row.get("AllocatedResourceId")):
            bad("AllocatedResourceId set on a charge that is not a split allocation")
        if not _null(details):
            try:
                parsed = json.loads(str(details), parse_float=Decimal, parse_int=Decimal)
            except ValueError:
                parsed = None
            elements = parsed.get("Elements") if isinstance(parsed, dict) else None
            if not isinstance(elements, list) or not elements:
                bad("AllocatedMethodDetails has no Elements array")
                continue
            for element in elements:
                r = element.get("AllocatedRatio") if isinstance(element, dict) else None
                if not isinstance(r, Decimal) or not Decimal(0) <= r <= Decimal(1):
                    bad("AllocatedRatio missing or outside [0, 1]")
                    continue
                if "UsageQuantity" in element and "UsageUnit" not in element:
                    bad("UsageQuantity without UsageUnit")
                for key in element:
                    if key not in ("AllocatedRatio", "UsageUnit", "UsageQuantity") and not (
                        _CUSTOM.match(key)
                    ):
                        bad(f"Elements key {key!r} is neither FOCUS-defined nor x_-prefixed")
                origin = str(element.get("x_OriginResourceId", ""))
                ratio_sums[origin] = ratio_sums.get(origin, Decimal(0)) + r
    for origin, total in sorted(ratio_sums.items()):
        if total != 1:
            problems.append(f"origin charge {origin}: AllocatedRatio adds up to {total}, not 1")
    return problems


def _tags(row: Mapping[str, Any]) -> dict[str, Any]:
    if _null(row.get("Tags")):
        return {}
    parsed = json.loads(str(row["Tags"]))
    return parsed if isinstance(parsed, dict) else {}

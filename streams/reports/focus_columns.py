"""FOCUS 1.3 Cost and Usage columns of an allocated charge (streams.reports.focus_charges).

Every column's value and the FOCUS statement behind it: streams/reports/README.md, "Chargeback
export". The columns are the same for every file format and every row, in `COLUMNS` order;
a null is None.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from streams.pricing import DEFAULT_ENTRY_ID, PriceBook
from streams.reports.focus_charges import (
    ALLOCATED,
    HOST_KIND,
    IDLE_KIND,
    UNTAGGED_KIND,
    AllocatedCharge,
    OriginCharge,
    Owner,
)
from streams.reports.money import WIDE
from streams.reports.params import Period, format_ms

FOCUS_VERSION = "1.3"
GPU_HOURS = "GPU-Hours"
INTERNAL_MARKER = "x_InternalChargeback"
# gpuledger's pricing classes are rates of its own price book, agreed in advance (Standard),
# except spot, whose nodes are interruptible and priced as the market moves (Dynamic).
PRICING_CATEGORY = {
    "on_demand": "Standard",
    "reserved": "Standard",
    "custom": "Standard",
    "spot": "Dynamic",
}
_HOUR_MS = 3_600_000
_PER_1M_PLACES = Decimal("1e-15")
_MILLION = Decimal(1_000_000)
_ZERO = Decimal(0)

# Column name -> kind, in file order: "text", "time", "cost" (exact decimal), "price",
# "quantity", "int", "bool", "json". Parquet types and CSV cells follow the kind.
COLUMNS: dict[str, str] = {
    "AllocatedMethodDetails": "json",
    "AllocatedMethodId": "text",
    "AllocatedResourceId": "text",
    "AllocatedResourceName": "text",
    "AllocatedTags": "json",
    "BilledCost": "cost",
    "BillingAccountId": "text",
    "BillingAccountName": "text",
    "BillingCurrency": "text",
    "BillingPeriodEnd": "time",
    "BillingPeriodStart": "time",
    "ChargeCategory": "text",
    "ChargeClass": "text",
    "ChargeDescription": "text",
    "ChargeFrequency": "text",
    "ChargePeriodEnd": "time",
    "ChargePeriodStart": "time",
    "ConsumedQuantity": "quantity",
    "ConsumedUnit": "text",
    "ContractedCost": "cost",
    "ContractedUnitPrice": "price",
    "EffectiveCost": "cost",
    "HostProviderName": "text",
    "InvoiceId": "text",
    "InvoiceIssuerName": "text",
    "ListCost": "cost",
    "ListUnitPrice": "price",
    "PricingCategory": "text",
    "PricingQuantity": "quantity",
    "PricingUnit": "text",
    "ProviderName": "text",
    "PublisherName": "text",
    "ResourceId": "text",
    "ResourceName": "text",
    "ResourceType": "text",
    "ServiceCategory": "text",
    "ServiceName": "text",
    "ServiceProviderName": "text",
    "ServiceSubcategory": "text",
    "SkuId": "text",
    "SkuMeter": "text",
    "SkuPriceDetails": "json",
    "SkuPriceId": "text",
    "SubAccountId": "text",
    "SubAccountName": "text",
    "Tags": "json",
    INTERNAL_MARKER: "bool",
    "x_CostKind": "text",
    "x_Team": "text",
    "x_Product": "text",
    "x_CostCenter": "text",
    "x_Model": "text",
    "x_Node": "text",
    "x_GpuModel": "text",
    "x_MigProfile": "text",
    "x_PricingClass": "text",
    "x_PriceBookEntryId": "text",
    "x_PromptTokens": "int",
    "x_CompletionTokens": "int",
    "x_Requests": "int",
    "x_CostPer1MTokens": "price",
    "x_MeteredCost": "price",
    "x_CostBasis": "text",
}


@dataclass(frozen=True, slots=True)
class ChargebackSettings:
    """Who bills whom: the columns every charge of an export shares."""

    billing_account_id: str = "gpuledger"
    billing_account_name: str = "Shared GPU inference platform"
    currency: str = "USD"
    service_name: str = "GPU inference platform"
    service_category: str = "AI and Machine Learning"
    service_subcategory: str = "AI Platforms"
    service_provider_name: str = "Internal GPU platform"
    host_provider_name: str = ""  # empty: the service provider hosts its own devices
    invoice_issuer_name: str = ""  # empty: the service provider issues the invoice
    share_policy: str = "dominant"
    idle_policy: str = "platform"
    team_label: str = "team"
    product_label: str = "product"
    cost_center_label: str = "cost-center"

    @property
    def allocated_method_id(self) -> str:
        return f"gpuledger-{self.share_policy}-share-{self.idle_policy}-idle"

    @property
    def host_provider(self) -> str:
        return self.host_provider_name or self.service_provider_name

    @property
    def invoice_issuer(self) -> str:
        return self.invoice_issuer_name or self.service_provider_name

    def invoice_id(self, period: Period) -> str:
        return f"{self.billing_account_id}-{format_ms(period.start_ms)[:7]}"


def plain(value: Decimal) -> Decimal:
    """The same number without trailing zeros (and never in exponent form when written)."""
    normal = value.normalize()
    exponent = normal.as_tuple().exponent
    return normal.quantize(Decimal(1)) if isinstance(exponent, int) and exponent > 0 else normal


def json_text(value: Mapping[str, Any]) -> str:
    """A JSON object as FOCUS's KeyValueFormat / JsonObjectFormat: decimals as exact numbers."""

    def encode(item: Any) -> str:
        if isinstance(item, Decimal):
            return format(plain(item), "f")
        if isinstance(item, Mapping):
            return "{" + ",".join(f"{json.dumps(k)}:{encode(v)}" for k, v in item.items()) + "}"
        if isinstance(item, list):
            return "[" + ",".join(encode(v) for v in item) + "]"
        return json.dumps(item, ensure_ascii=False)

    return encode(value)


def owner_id(owner: Owner) -> str | None:
    """AllocatedResourceId: the owner's labels as `team/<t>/product/<p>[/cost-center/<c>]
    [/model/<m>]`, each value percent-encoded (a `/` in a model name is `%2F`), so the id is
    read back by splitting on `/`; None for the unallocated parts."""
    if owner.kind != ALLOCATED:
        return None
    parts = [("team", owner.team), ("product", owner.product)]
    parts += [("cost-center", owner.cost_center), ("model", owner.model)]
    return "/".join(f"{k}/{quote(v, safe='')}" for k, v in parts if v is not None)


def owner_name(owner: Owner) -> str | None:
    if owner.kind != ALLOCATED:
        return None
    text = f"team {owner.team}, product {owner.product}"
    if owner.cost_center is not None:
        text += f", cost centre {owner.cost_center}"
    return text + (f", model {owner.model}" if owner.model is not None else "")


def owner_tags(owner: Owner, settings: ChargebackSettings) -> dict[str, str] | None:
    """The pod labels that name the owner (only labels the pods had, under their keys)."""
    if owner.kind in (HOST_KIND, IDLE_KIND):
        return None
    tags = {
        key: value
        for key, value in (
            (settings.team_label, owner.team),
            (settings.product_label, owner.product),
            (settings.cost_center_label, owner.cost_center),
        )
        if value is not None
    }
    return tags or None


def _description(charge: AllocatedCharge) -> str:
    """What the charge is, in ASCII and without tenants' names (they are in AllocatedTags and
    AllocatedResourceName): the validator reads ChargeDescription's StringHandling as ASCII."""
    origin, owner = charge.origin, charge.owner
    device = origin.gpu_model + (f" MIG {origin.mig_profile}" if origin.mig_profile else "")
    if owner.kind == IDLE_KIND:
        what = "idle time, unallocated"
    elif owner.kind == HOST_KIND:
        what = "used by host processes outside any pod"
    elif owner.kind == UNTAGGED_KIND:
        what = "used by pods without team and product labels"
    else:
        what = "used by one team and product" + (" serving a model" if owner.model else "")
    text = f"{device} device-hours ({origin.pricing} price), {what}"
    return text.encode("ascii", "backslashreplace").decode("ascii")


def sku_id(origin: OriginCharge) -> str:
    return origin.gpu_model + (f"|{origin.mig_profile}" if origin.mig_profile else "")


class FocusRows:
    """Turns the allocated charges of one export into FOCUS rows. What every row of the export
    shares is worked out once, what every part of an origin charge shares once per origin, and
    what an owner's rows share once per owner (owners repeat hour after hour)."""

    MAX_CACHED = 50_000  # owners remembered; past it the cache starts again

    def __init__(
        self, period: Period, settings: ChargebackSettings, book: PriceBook | None
    ) -> None:
        self.settings = settings
        self.book = book
        provider = settings.service_provider_name
        self._constant: dict[str, Any] = {
            "AllocatedMethodId": settings.allocated_method_id,
            "BillingAccountId": settings.billing_account_id,
            "BillingAccountName": settings.billing_account_name,
            "BillingCurrency": settings.currency,
            "BillingPeriodEnd": format_ms(period.end_ms),
            "BillingPeriodStart": format_ms(period.start_ms),
            "ChargeCategory": "Usage",
            "ChargeClass": None,
            "ChargeFrequency": "Usage-Based",
            "ConsumedUnit": GPU_HOURS,
            "HostProviderName": settings.host_provider,
            "InvoiceId": settings.invoice_id(period),
            "InvoiceIssuerName": settings.invoice_issuer,
            "PricingUnit": GPU_HOURS,
            "ProviderName": provider,
            "PublisherName": provider,
            "ResourceName": None,  # a GPU has only its system-generated UUID
            "ServiceCategory": settings.service_category,
            "ServiceName": settings.service_name,
            "ServiceProviderName": provider,
            "ServiceSubcategory": settings.service_subcategory,
            "SkuMeter": "GPU device time",
            "Tags": None,  # a device has no tags of its own; owners' labels are AllocatedTags
            INTERNAL_MARKER: True,
        }
        self._origin: OriginCharge | None = None
        self._origin_columns: dict[str, Any] = {}
        self._owners: dict[tuple[Owner, str, str, str], dict[str, Any]] = {}

    def row(self, charge: AllocatedCharge) -> dict[str, Any]:
        origin, owner = charge.origin, charge.owner
        if origin is not self._origin:
            self._origin = origin
            self._origin_columns = self._columns_of_origin(origin)
        key = (owner, origin.gpu_model, origin.mig_profile, origin.pricing)
        owner_columns = self._owners.get(key)
        if owner_columns is None:
            if len(self._owners) >= self.MAX_CACHED:
                self._owners.clear()
            owner_columns = self._owners[key] = self._columns_of_owner(charge)
        cost = plain(charge.cost_usd)
        effective = plain(charge.effective_cost)
        quantity = plain(charge.quantity_hours)
        tokens = charge.prompt_tokens + charge.completion_tokens
        per_1m = None
        if tokens:
            with localcontext(WIDE):
                per_1m = plain(
                    (charge.effective_cost * _MILLION / tokens).quantize(
                        _PER_1M_PLACES, ROUND_HALF_EVEN
                    )
                )
        details = (
            '{"Elements":[{"AllocatedRatio":'
            + format(plain(charge.ratio), "f")
            + f',"UsageUnit":"{GPU_HOURS}","UsageQuantity":'
            + format(plain(charge.used_hours), "f")
            + "}]}"
        )
        row = dict(self._origin_columns)
        row.update(owner_columns)
        row["AllocatedMethodDetails"] = details
        row["ContractedCost"] = row["ListCost"] = cost
        if charge.billed_effective is None:
            row["BilledCost"] = row["EffectiveCost"] = cost
            row["x_CostBasis"] = "list"
        else:
            row["EffectiveCost"] = effective
            row["BilledCost"] = plain(charge.billed if charge.billed is not None else _ZERO)
            row["x_CostBasis"] = "billed"
        row["ConsumedQuantity"] = row["PricingQuantity"] = quantity
        row["x_PromptTokens"] = charge.prompt_tokens
        row["x_CompletionTokens"] = charge.completion_tokens
        row["x_Requests"] = charge.requests
        row["x_CostPer1MTokens"] = per_1m
        row["x_MeteredCost"] = plain(charge.metered_cost_usd)
        return row

    def _columns_of_origin(self, origin: OriginCharge) -> dict[str, Any]:
        book = self.book
        entry = book.entry_at(origin.gpu_model, origin.pricing, origin.hour_ms) if book else None
        price = plain(origin.unit_price_usd)
        sku_details: dict[str, Any] = {"x_GpuModel": origin.gpu_model}
        if origin.mig_profile:
            sku_details["x_MigProfile"] = origin.mig_profile
        else:
            sku_details["GpuCount"] = 1
        sku_details["x_PricingClass"] = origin.pricing
        columns: dict[str, Any] = dict.fromkeys(COLUMNS)  # every row in COLUMNS order
        columns.update(self._constant)
        columns.update(
            {
                "ChargePeriodEnd": _hour_text(origin.hour_ms + _HOUR_MS),
                "ChargePeriodStart": _hour_text(origin.hour_ms),
                "ContractedUnitPrice": price,
                "ListUnitPrice": price,
                "PricingCategory": PRICING_CATEGORY.get(origin.pricing, "Other"),
                "ResourceId": origin.device_uuid,
                "ResourceType": "MIG instance" if origin.mig_profile else "GPU",
                "SkuId": sku_id(origin),
                "SkuPriceDetails": json_text(sku_details),
                "SkuPriceId": f"{sku_id(origin)}|{origin.pricing}",
                "SubAccountId": origin.cluster,
                "SubAccountName": origin.cluster,
                "x_Node": origin.node,
                "x_GpuModel": origin.gpu_model,
                "x_MigProfile": origin.mig_profile or None,
                "x_PricingClass": origin.pricing,
                "x_PriceBookEntryId": (
                    entry.entry_id if entry is not None else DEFAULT_ENTRY_ID if book else None
                ),
            }
        )
        return columns

    def _columns_of_owner(self, charge: AllocatedCharge) -> dict[str, Any]:
        owner = charge.owner
        tags = owner_tags(owner, self.settings)
        return {
            "AllocatedResourceId": owner_id(owner),
            "AllocatedResourceName": owner_name(owner),
            "AllocatedTags": json_text(tags) if tags else None,
            "ChargeDescription": _description(charge),
            "x_CostKind": owner.kind,
            "x_Team": owner.team,
            "x_Product": owner.product,
            "x_CostCenter": owner.cost_center,
            "x_Model": owner.model,
        }


@lru_cache(maxsize=4096)
def _hour_text(time_ms: int) -> str:
    return format_ms(time_ms)


def focus_row(
    charge: AllocatedCharge,
    period: Period,
    settings: ChargebackSettings,
    book: PriceBook | None,
) -> dict[str, Any]:
    """The FOCUS row of one charge (`FocusRows` makes many)."""
    return FocusRows(period, settings, book).row(charge)

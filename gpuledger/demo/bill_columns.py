"""The columns of each FOCUS version's Cost and Usage file and each provider's x_ columns and
names (pure), for `gpuledger.demo.bills`.

The column order of 1.2 and 1.3 is focus-data-toolkit's (its files for every provider share
it); 1.0 is 1.2 without the columns 1.1 and 1.2 added.
"""

from __future__ import annotations

from typing import Any

Row = dict[str, Any]

_COLUMNS_1_2 = (
    "ProviderName",
    "PublisherName",
    "InvoiceIssuerName",
    "InvoiceId",
    "BillingAccountId",
    "BillingAccountName",
    "BillingAccountType",
    "SubAccountId",
    "SubAccountName",
    "SubAccountType",
    "BillingPeriodStart",
    "BillingPeriodEnd",
    "ChargePeriodStart",
    "ChargePeriodEnd",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "BilledCost",
    "EffectiveCost",
    "ListCost",
    "ContractedCost",
    "ListUnitPrice",
    "ContractedUnitPrice",
    "PricingCategory",
    "PricingQuantity",
    "PricingUnit",
    "PricingCurrency",
    "PricingCurrencyContractedUnitPrice",
    "PricingCurrencyEffectiveCost",
    "PricingCurrencyListUnitPrice",
    "BillingCurrency",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ServiceName",
    "ServiceCategory",
    "ServiceSubcategory",
    "SkuId",
    "SkuMeter",
    "SkuPriceId",
    "SkuPriceDetails",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "RegionId",
    "RegionName",
    "AvailabilityZone",
    "CommitmentDiscountId",
    "CommitmentDiscountName",
    "CommitmentDiscountCategory",
    "CommitmentDiscountType",
    "CommitmentDiscountStatus",
    "CommitmentDiscountQuantity",
    "CommitmentDiscountUnit",
    "CapacityReservationId",
    "CapacityReservationStatus",
    "Tags",
)
_ADDED_1_1 = (
    "CapacityReservationId",
    "CapacityReservationStatus",
    "CommitmentDiscountQuantity",
    "CommitmentDiscountUnit",
    "ServiceSubcategory",
    "SkuMeter",
    "SkuPriceDetails",
)
_ADDED_1_2 = (
    "BillingAccountType",
    "SubAccountType",
    "InvoiceId",
    "PricingCurrency",
    "PricingCurrencyContractedUnitPrice",
    "PricingCurrencyEffectiveCost",
    "PricingCurrencyListUnitPrice",
)
_COLUMNS_1_3 = (
    *_COLUMNS_1_2[:2],
    "ServiceProviderName",
    "HostProviderName",
    *_COLUMNS_1_2[2:54],
    "ContractApplied",
    *_COLUMNS_1_2[54:56],
    "AllocatedMethodId",
    "AllocatedMethodDetails",
    "AllocatedResourceId",
    "AllocatedResourceName",
    "AllocatedTags",
    "Tags",
)
_COLUMNS = {
    "1.0": tuple(c for c in _COLUMNS_1_2 if c not in _ADDED_1_1 + _ADDED_1_2),
    "1.2": _COLUMNS_1_2,
    "1.3": _COLUMNS_1_3,
}
_X_COLUMNS = {
    # FOCUS 1.2 with AWS columns (AWS Data Exports table dictionary).
    "aws": ("x_CostCategories", "x_Discounts", "x_Operation", "x_ServiceCode", "x_UsageType"),
    # Azure Cost Management's FOCUS export.
    "azure": (
        "x_ResourceGroupName",
        "x_SkuMeterCategory",
        "x_SkuMeterSubcategory",
        "x_SkuMeterName",
        "x_SkuDescription",
        "x_PricingBlockSize",
    ),
    # Google Cloud's FOCUS BigQuery view.
    "gcp": ("x_ServiceId", "x_SkuDescription"),
}
# Decimal-valued columns: typed as the provider types costs in Parquet.
AMOUNT_COLUMNS = (
    "BilledCost",
    "EffectiveCost",
    "ListCost",
    "ContractedCost",
    "ListUnitPrice",
    "ContractedUnitPrice",
    "PricingQuantity",
    "ConsumedQuantity",
    "PricingCurrencyContractedUnitPrice",
    "PricingCurrencyEffectiveCost",
    "PricingCurrencyListUnitPrice",
    "CommitmentDiscountQuantity",
)
TIME_COLUMNS = ("BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd")

_PROVIDER_NAMES = {"aws": "AWS", "azure": "Microsoft", "gcp": "Google Cloud"}


def columns(version: str) -> tuple[str, ...]:
    """The columns of a FOCUS `version` (1.0, 1.2 or 1.3) Cost and Usage file, in order."""
    try:
        return _COLUMNS[version]
    except KeyError:
        raise ValueError(f"FOCUS version {version!r}: 1.0, 1.2 or 1.3") from None


def x_columns(provider: str) -> tuple[str, ...]:
    return _X_COLUMNS[provider]


def provider_identity(provider: str, version: str) -> Row:
    name = _PROVIDER_NAMES[provider]
    row: Row = {"ProviderName": name, "PublisherName": name, "InvoiceIssuerName": name}
    if version == "1.3":
        row.update(ServiceProviderName=name, HostProviderName=name)
    return row

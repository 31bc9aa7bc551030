"""One line of a provider's FOCUS Cost and Usage export, decoded and checked (pure).

FOCUS 1.0 to 1.3 name the columns read here alike, except the provider: `ServiceProviderName`
(1.3), else `ProviderName` (1.0-1.2, deprecated in 1.3), else `InvoiceIssuerName`. A value is
what the file holds: text in CSV, typed in Parquet (timestamps, doubles, decimals). A row that
cannot be read raises `BillRowError` naming the column and why; nothing is guessed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation, localcontext

from schemas.events import parse_time
from schemas.fields import excerpt
from streams.billing.resources import GpuInstanceTypes, bill_key
from streams.reports.money import WIDE

AMOUNT_QUANTUM = Decimal("1e-15")  # the store's Decimal(38, 15)
_MAX_AMOUNT = Decimal("1e23")  # 38 digits with 15 after the point
_PROVIDER_COLUMNS = ("ServiceProviderName", "ProviderName", "InvoiceIssuerName")
_REQUIRED = (
    "BillingAccountId",
    "BillingPeriodStart",
    "BillingPeriodEnd",
    "ChargePeriodStart",
    "ChargePeriodEnd",
    "ChargeCategory",
    "BilledCost",
    "EffectiveCost",
    "ListCost",
    "BillingCurrency",
)
_CURRENCY = re.compile(r"[A-Z]{3}")
_SPACE_TIME = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[ T]([0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?)"
    r"(?: ?(?:UTC|Z|\+00:?00))?"
)
_DATE_ONLY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
# Where providers name the instance type: SkuPriceDetails keys, then their x_ columns.
_TYPE_KEYS = ("InstanceType", "x_InstanceType", "MachineType", "VMSize", "ServiceType")
_TYPE_COLUMNS = (
    "x_UsageType",
    "x_Operation",
    "x_SkuMeterName",
    "x_SkuMeterSubcategory",
    "x_SkuDescription",
    "SkuMeter",
    "ChargeDescription",
)


class BillRowError(ValueError):
    """A row of a bill file that cannot be imported; `column` names the culprit ("" for the
    row as a whole)."""

    def __init__(self, column: str, reason: str) -> None:
        super().__init__(f"{column}: {reason}" if column else reason)
        self.column = column
        self.reason = reason


@dataclass(frozen=True, slots=True)
class BillLine:
    """A decoded FOCUS row: the columns the true-up and its reports need. Amounts are in
    `billing_currency`, quantised to 1e-15 (`rounded` says whether that changed one)."""

    provider: str
    billing_account_id: str
    billing_period_start_ms: int
    billing_period_end_ms: int
    charge_period_start_ms: int
    charge_period_end_ms: int
    charge_category: str
    charge_class: str
    resource_id: str
    resource_name: str
    resource_key: str
    instance_type: str
    gpu_instance: bool
    service_name: str
    sku_id: str
    region_id: str
    billed_cost: Decimal
    effective_cost: Decimal
    list_cost: Decimal
    billing_currency: str
    rounded: bool = False

    def canonical(self) -> str:
        """The line as one text, the same for the same line in any file or format."""
        return "\x1f".join(
            (
                self.provider,
                self.billing_account_id,
                str(self.billing_period_start_ms),
                str(self.billing_period_end_ms),
                str(self.charge_period_start_ms),
                str(self.charge_period_end_ms),
                self.charge_category,
                self.charge_class,
                self.resource_id,
                self.resource_name,
                self.instance_type,
                self.service_name,
                self.sku_id,
                self.region_id,
                format(self.billed_cost, "f"),
                format(self.effective_cost, "f"),
                format(self.list_cost, "f"),
                self.billing_currency,
            )
        )


def decode_line(row: Mapping[str, object], gpu_types: GpuInstanceTypes) -> BillLine:
    """A FOCUS row (column name -> value) as a BillLine, or BillRowError."""
    for column in _REQUIRED:
        if _blank(row.get(column)):
            raise BillRowError(column, "missing (a FOCUS column that is never null)")
    provider = next((_text(row, c) for c in _PROVIDER_COLUMNS if not _blank(row.get(c))), "")
    if not provider:
        raise BillRowError(
            "ServiceProviderName", "no provider column (ServiceProviderName or ProviderName)"
        )
    currency = _text(row, "BillingCurrency")
    if not _CURRENCY.fullmatch(currency):
        raise BillRowError("BillingCurrency", f"not an ISO 4217 code: {excerpt(currency)}")
    period = [
        _time(row, c)
        for c in ("BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd")
    ]
    if period[1] <= period[0]:
        raise BillRowError("BillingPeriodEnd", "not after BillingPeriodStart")
    if period[3] <= period[2]:
        raise BillRowError("ChargePeriodEnd", "not after ChargePeriodStart")
    amounts = [_amount(row, c) for c in ("BilledCost", "EffectiveCost", "ListCost")]
    resource_id = _text(row, "ResourceId")
    resource_name = _text(row, "ResourceName")
    instance_type = _instance_type(row, gpu_types)
    return BillLine(
        provider=provider,
        billing_account_id=_text(row, "BillingAccountId"),
        billing_period_start_ms=period[0],
        billing_period_end_ms=period[1],
        charge_period_start_ms=period[2],
        charge_period_end_ms=period[3],
        charge_category=_text(row, "ChargeCategory"),
        charge_class=_text(row, "ChargeClass"),
        resource_id=resource_id,
        resource_name=resource_name,
        resource_key=bill_key(resource_id, resource_name, _text(row, "AvailabilityZone")),
        instance_type=instance_type,
        gpu_instance=_instance_usage(row, resource_id) and gpu_types.is_gpu(instance_type),
        service_name=_text(row, "ServiceName"),
        sku_id=_text(row, "SkuId"),
        region_id=_text(row, "RegionId"),
        billed_cost=amounts[0][0],
        effective_cost=amounts[1][0],
        list_cost=amounts[2][0],
        billing_currency=currency,
        rounded=any(rounded for _, rounded in amounts),
    )


def _instance_usage(row: Mapping[str, object], resource_id: str) -> bool:
    """Whether the row is the usage of a resource itself: not a commitment's purchase or fee
    (ChargeCategory Purchase), nor a commitment's own unused part (its ResourceId is the
    commitment's). Only such rows make a resource a GPU instance."""
    if _text(row, "ChargeCategory") != "Usage":
        return False
    commitment = _text(row, "CommitmentDiscountId")
    return not commitment or commitment != resource_id


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _text(row: Mapping[str, object], column: str) -> str:
    value = row.get(column)
    if value is None:
        return ""
    if not isinstance(value, str):
        value = str(value)
    return value.strip()


def parse_bill_time(value: object) -> int:
    """Unix ms from a FOCUS date-time: a datetime (Parquet; naive means UTC, as FOCUS
    requires UTC), RFC 3339 text, `YYYY-MM-DD HH:MM:SS[.f]` with ` UTC`, `Z`, `+00:00` or
    nothing (UTC), or a date alone (midnight UTC). ValueError otherwise."""
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return int(moment.timestamp() * 1000)
    if not isinstance(value, str):
        raise ValueError(f"not a date-time: {type(value).__name__}")
    text = value.strip()
    try:
        return parse_time(text)
    except ValueError:
        pass
    plain = _SPACE_TIME.fullmatch(text)
    if plain:
        return parse_time(f"{plain.group(1)}T{plain.group(2)}Z")
    if _DATE_ONLY.fullmatch(text):
        return parse_time(f"{text}T00:00:00Z")
    raise ValueError(f"not a FOCUS date-time: {excerpt(text)}")


def _time(row: Mapping[str, object], column: str) -> int:
    try:
        return parse_bill_time(row.get(column))
    except ValueError as exc:
        raise BillRowError(column, str(exc)) from None


def parse_amount(value: object) -> tuple[Decimal, bool]:
    """An exact Decimal from decimal text, a Decimal, an int or a double (its shortest repr),
    quantised to 1e-15 half-even; and whether quantising changed it. ValueError on anything
    else, NaN, infinities and amounts the store cannot hold."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not an amount")
    if isinstance(value, Decimal):
        amount = value
    elif isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, float):
        amount = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            amount = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"not a number: {excerpt(value)}") from None
    else:
        raise ValueError(f"not a number: {type(value).__name__}")
    if not amount.is_finite():
        raise ValueError(f"not a finite number: {excerpt(str(value))}")
    if abs(amount) >= _MAX_AMOUNT:
        raise ValueError(f"too large for the ledger: {excerpt(str(value))}")
    with localcontext(WIDE):
        quantised = amount.quantize(AMOUNT_QUANTUM, ROUND_HALF_EVEN)
    return quantised, quantised != amount


def _amount(row: Mapping[str, object], column: str) -> tuple[Decimal, bool]:
    try:
        return parse_amount(row.get(column))
    except ValueError as exc:
        raise BillRowError(column, str(exc)) from None


def _instance_type(row: Mapping[str, object], gpu_types: GpuInstanceTypes) -> str:
    """The instance type the row names: a SkuPriceDetails key, else a GPU instance type found
    in the provider's usage-type and description columns."""
    details = row.get("SkuPriceDetails")
    if isinstance(details, str) and details.strip().startswith("{"):
        try:
            parsed = json.loads(details)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            for key in _TYPE_KEYS:
                value = parsed.get(key)
                if isinstance(value, str) and value.strip():
                    return value.strip()
    return gpu_types.find(*(_text(row, c) for c in _TYPE_COLUMNS))

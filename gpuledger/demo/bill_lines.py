"""The lines of a provider bill (pure): usage per billed resource and hour or day, the
commitments' recurring fees, and the account's other lines (disks, data transfer, tax, a
credit), for `gpuledger.demo.bills`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from gpuledger.demo.bill_columns import provider_identity
from gpuledger.demo.bill_instances import (
    BillNode,
    Instance,
    Provider,
    ResourceIdForm,
    commitment_identity,
)

FocusVersion = Literal["1.0", "1.2", "1.3"]
Granularity = Literal["hourly", "daily"]
Row = dict[str, Any]

HOUR_MS = 3_600_000
_PLACES = Decimal("1e-10")
_TAX_RATE = Decimal("0.08")
_DISK_GB = 2048
_DISK_PRICE_PER_GB_MONTH = Decimal("0.08")
_EGRESS_PRICE_PER_GB = Decimal("0.01")
_CREDIT_USD = Decimal("-250")


def spot_price_per_hour(node: BillNode, hour_start_ms: int, seed: int = 0) -> Decimal:
    """The spot price of `node` in the hour: its effective price moved by up to +-10 % in steps
    of 0.01 %, the same for the same node, hour and seed; never above the list price."""
    step = _draw(seed, "spot", node.provider_id, hour_start_ms) % 2001 - 1000  # -1000 .. 1000
    price = (node.effective_price_per_hour * (1 + Decimal(step) / 10_000)).quantize(_PLACES)
    return min(price, node.list_price_per_hour)


def usage_groups(
    nodes: Sequence[BillNode],
    hours: Sequence[int],
    granularity: Granularity,
    form: ResourceIdForm,
    seed: int,
) -> list[tuple[str, BillNode, int, Decimal, Decimal, int]]:
    """(billed ResourceId, first node, charge start, hours, unit price, instance count): nodes
    billed at one resource (an Azure scale set) share a line, as do hours of one day at one
    unit price in daily granularity."""
    sums: dict[tuple[str, int, Decimal], tuple[BillNode, Decimal, set[str]]] = {}
    for node in nodes:
        resource_id = node.instance.billed_resource_id(form)
        for hour in hours:
            price = (
                spot_price_per_hour(node, hour, seed)
                if node.pricing == "spot"
                else node.effective_price_per_hour
            )
            start = hour if granularity == "hourly" else hour - hour % (24 * HOUR_MS)
            key = (resource_id, start, price)
            first, quantity, members = sums.get(key, (node, Decimal(0), set()))
            members.add(node.provider_id)
            sums[key] = (first, quantity + 1, members)
    groups = []
    for (resource_id, start, price), (node, quantity, members) in sorted(
        sums.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])
    ):
        count = len(members)
        groups.append((resource_id, node, start, quantity / count, price, count))
    return groups


class LineBuilder:
    """Builds one bill's lines: its provider, FOCUS version, billing account and seed."""

    def __init__(
        self,
        provider: Provider,
        version: FocusVersion,
        account: str,
        seed: int,
        span_hours: int,
        form: ResourceIdForm,
    ) -> None:
        self.provider = provider
        self.version = version
        self.account = account
        self.seed = seed
        self.span = Decimal(span_hours)  # a usage line's charge period
        self.form = form

    def base(self, instance: Instance, start_ms: int, hours: Decimal) -> Row:
        start = _utc(start_ms)
        month = start.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        row: Row = dict(provider_identity(self.provider, self.version))
        row.update(
            BillingAccountId=self.account,
            BillingAccountName=f"{instance.account_name} billing",
            SubAccountId=instance.sub_account_id,
            SubAccountName=instance.sub_account_name,
            BillingPeriodStart=month,
            BillingPeriodEnd=(month + timedelta(days=32)).replace(day=1),
            ChargePeriodStart=start,
            ChargePeriodEnd=start + timedelta(hours=int(hours)),
            BillingCurrency="USD",
            RegionId=instance.region,
            RegionName=instance.region_name,
            Tags=json.dumps({"kubernetes-cluster": "gpuledger-demo"}, separators=(",", ":")),
        )
        if self.version != "1.0":
            row.update(
                BillingAccountType=instance.billing_account_type,
                SubAccountType=instance.sub_account_type,
                InvoiceId=f"INV-{month:%Y%m}-{_digest(self.seed, self.account)[:8].upper()}",
                PricingCurrency="USD",
            )
        return row

    def priced(
        self,
        row: Row,
        unit_list: Decimal,
        unit_contracted: Decimal,
        quantity: Decimal,
        billed: Decimal,
        effective: Decimal,
        unit: str,
    ) -> Row:
        row.update(
            ListUnitPrice=unit_list,
            ContractedUnitPrice=unit_contracted,
            PricingQuantity=quantity,
            PricingUnit=unit,
            ListCost=unit_list * quantity,
            ContractedCost=unit_contracted * quantity,
            BilledCost=billed,
            EffectiveCost=effective,
        )
        if self.version != "1.0":
            row.update(
                PricingCurrencyListUnitPrice=unit_list,
                PricingCurrencyContractedUnitPrice=unit_contracted,
                PricingCurrencyEffectiveCost=effective,
            )
        return row

    def commitment(self, node: BillNode) -> dict[str, str]:
        return commitment_identity(node.instance, node.pricing, node.instance_type, self.seed)

    def usage(
        self,
        node: BillNode,
        resource_id: str,
        start_ms: int,
        hours: Decimal,
        unit_price: Decimal,
        count: int,
    ) -> Row:
        inst = node.instance
        quantity = hours * count
        row = self.base(inst, start_ms, self.span)
        committed = node.pricing in ("savings_plan", "reserved")
        contracted = unit_price if node.pricing == "spot" else node.list_price_per_hour
        cost = unit_price * quantity
        self.priced(
            row,
            node.list_price_per_hour,
            contracted,
            quantity,
            Decimal(0) if committed else cost,
            cost,
            "Hours",
        )
        row.update(
            ChargeCategory="Usage",
            ChargeFrequency="Usage-Based",
            ChargeDescription=inst.usage_description(node.instance_type, node.pricing),
            PricingCategory={"spot": "Dynamic", "on_demand": "Standard"}.get(
                node.pricing, "Committed"
            ),
            ConsumedQuantity=quantity,
            ConsumedUnit="Hours",
            ResourceId=resource_id,
            ResourceName=inst.billed_resource_name,
            ResourceType=inst.resource_type,
            AvailabilityZone=inst.zone or None,
            SkuMeter="Compute",
            **inst.compute_service(),
            **inst.sku(node.instance_type, node.pricing, self.seed),
            **inst.x_usage(node.instance_type, node.pricing),
        )
        if committed:
            commitment = self.commitment(node)
            row.update(
                CommitmentDiscountId=commitment["id"],
                CommitmentDiscountName=commitment["name"],
                CommitmentDiscountCategory=commitment["category"],
                CommitmentDiscountType=commitment["type"],
                CommitmentDiscountStatus="Used",
            )
            if self.version != "1.0":
                spend = commitment["category"] == "Spend"
                row.update(
                    CommitmentDiscountQuantity=cost if spend else quantity,
                    CommitmentDiscountUnit="USD" if spend else "Hours",
                )
        return row

    def purchase(self, node: BillNode, start_ms: int, fee: Decimal, quantity: Decimal) -> Row:
        """A commitment's recurring (no upfront) fee for the charge period: what the usage it
        covered would have cost at its effective rate, so it is used in full."""
        inst = node.instance
        commitment = self.commitment(node)
        spend = commitment["category"] == "Spend"
        row = self.base(inst, start_ms, self.span)
        unit = Decimal(1) if spend else fee / quantity
        if unit != unit.quantize(_PLACES):
            unit, quantity = Decimal(1), fee  # a reservation's hourly fee over its hours
        self.priced(
            row,
            unit,
            unit,
            fee if spend else quantity,
            fee,
            Decimal(0),
            "USD" if spend or unit == 1 else "Hours",
        )
        row.update(
            ChargeCategory="Purchase",
            ChargeFrequency="Recurring",
            ChargeDescription=f"{commitment['type']} {commitment['name']} recurring fee",
            PricingCategory="Standard",
            ResourceId=commitment["id"],
            ResourceName=commitment["resource_name"],
            ResourceType=commitment["type"],
            SkuMeter="Commitment",
            CommitmentDiscountId=commitment["id"],
            CommitmentDiscountName=commitment["name"],
            CommitmentDiscountCategory=commitment["category"],
            CommitmentDiscountType=commitment["type"],
            **inst.compute_service(),
            SkuId=f"{commitment['sku']}",
            SkuPriceId=f"{commitment['sku']}-fee",
        )
        if self.version != "1.0":
            row.update(
                CommitmentDiscountQuantity=fee if spend else quantity,
                CommitmentDiscountUnit="USD" if spend else "Hours",
                SkuPriceDetails=json.dumps({"x_PaymentOption": "NoUpfront"}),
            )
        return row

    def extras(
        self, nodes: Sequence[BillNode], hours: Sequence[int], usage: Sequence[Row]
    ) -> list[Row]:
        rows: list[Row] = []
        days = sorted({h - h % (24 * HOUR_MS) for h in hours})
        for day in days:
            day_hours = Decimal(sum(1 for h in hours if day <= h < day + 24 * HOUR_MS))
            for node in nodes:
                inst = node.instance
                # A disk bills GB-months pro rata: the day's share of a 30-day month.
                gb_months = (Decimal(_DISK_GB) * day_hours / 720).quantize(
                    Decimal("1e-8")
                )  # x 0.08: 10 places
                disk = self.base(inst, day, Decimal(24))
                self.priced(
                    disk,
                    _DISK_PRICE_PER_GB_MONTH,
                    _DISK_PRICE_PER_GB_MONTH,
                    gb_months,
                    _DISK_PRICE_PER_GB_MONTH * gb_months,
                    _DISK_PRICE_PER_GB_MONTH * gb_months,
                    "GB-Months",
                )
                disk.update(
                    ChargeCategory="Usage",
                    ChargeFrequency="Usage-Based",
                    PricingCategory="Standard",
                    ConsumedQuantity=gb_months,
                    ConsumedUnit="GB-Months",
                    SkuMeter="Storage",
                    AvailabilityZone=inst.zone or None,
                    **inst.disk(self.seed),
                )
                rows.append(disk)
                gb = Decimal(_draw(self.seed, "egress", node.provider_id, day) % 500 + 1)
                egress = self.base(inst, day, Decimal(24))
                self.priced(
                    egress,
                    _EGRESS_PRICE_PER_GB,
                    _EGRESS_PRICE_PER_GB,
                    gb,
                    _EGRESS_PRICE_PER_GB * gb,
                    _EGRESS_PRICE_PER_GB * gb,
                    "GB",
                )
                egress.update(
                    ChargeCategory="Usage",
                    ChargeFrequency="Usage-Based",
                    PricingCategory="Standard",
                    ConsumedQuantity=gb,
                    ConsumedUnit="GB",
                    SkuMeter="Data Transfer",
                    **inst.transfer(self.seed, self.form),
                )
                rows.append(egress)
        first = nodes[0].instance if nodes else None
        if first is None:
            return rows
        for day in days:
            billed = sum(
                (
                    r["BilledCost"]
                    for r in [*usage, *rows]
                    if r["ChargePeriodStart"] >= _utc(day)
                    and r["ChargePeriodStart"] < _utc(day + 24 * HOUR_MS)
                ),
                Decimal(0),
            )
            tax = self.base(first, day, Decimal(24))
            tax_cost = (billed * _TAX_RATE).quantize(_PLACES)
            tax.update(
                ChargeCategory="Tax",
                ChargeFrequency="Usage-Based",
                ChargeDescription="Sales tax",
                BilledCost=tax_cost,
                EffectiveCost=tax_cost,
                ListCost=tax_cost,
                ContractedCost=tax_cost,
                ServiceCategory="Other",
                ServiceName="Tax",
                **first.tax_service(),
            )
            if self.version != "1.0":
                tax["PricingCurrencyEffectiveCost"] = tax_cost
            rows.append(tax)
        credit = self.base(first, days[0], Decimal(24))
        credit.update(
            ChargeCategory="Credit",
            ChargeFrequency="One-Time",
            ChargeDescription="Promotional credit",
            BilledCost=_CREDIT_USD,
            EffectiveCost=_CREDIT_USD,
            ListCost=Decimal(0),
            ContractedCost=Decimal(0),
            **first.compute_service(),
        )
        if self.version != "1.0":
            credit["PricingCurrencyEffectiveCost"] = _CREDIT_USD
        rows.append(credit)
        return rows


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _digest(seed: int, *parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, (seed, *parts))).encode()).hexdigest()


def _draw(seed: int, *parts: object) -> int:
    return int(_digest(seed, *parts)[:12], 16)

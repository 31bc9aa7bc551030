"""Provider-shaped FOCUS Cost and Usage bills for given GPU nodes and hours (pure, deterministic),
and their CSV and Parquet files: what `gpuledger bill import` is tested with and the demo uses.

Each usage line carries the instance as its provider's FOCUS export names it (AWS the instance
id, or its EC2 ARN; Azure the VM's or scale set's ARM id, in lower case; Google Cloud the
Compute Engine full resource name with the instance name as ResourceName). Amounts are exact
Decimals with at most 10 decimal places; the same arguments give the same rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from gpuledger.demo.bill_columns import AMOUNT_COLUMNS, columns, x_columns
from gpuledger.demo.bill_instances import BillNode, Pricing, Provider, ResourceIdForm
from gpuledger.demo.bill_lines import (
    HOUR_MS,
    FocusVersion,
    Granularity,
    LineBuilder,
    spot_price_per_hour,
    usage_groups,
)

__all__ = [
    "BillNode",
    "FocusVersion",
    "Granularity",
    "Pricing",
    "Provider",
    "ResourceIdForm",
    "bill_rows",
    "demo_bill",
    "demo_bill_nodes",
    "restate",
    "spot_price_per_hour",
    "write_bill",
]
Row = dict[str, Any]
_PLACES = Decimal("1e-10")
DEFAULT_BILLING_ACCOUNTS: Mapping[str, str] = {
    "aws": "123456789012",
    "azure": "8a1b2c3d-0000-4a00-9000-00000000d3e0",
    "gcp": "01A2B3-C4D5E6-F70819",
}


def bill_rows(
    provider: Provider,
    focus_version: FocusVersion,
    nodes: Sequence[BillNode],
    hour_starts_ms: Iterable[int],
    *,
    billing_account_id: str = "",
    unmetered: Sequence[BillNode] = (),
    extras: bool = True,
    granularity: Granularity = "hourly",
    resource_id_form: ResourceIdForm = "name",
    provider_columns: bool = True,
    seed: int = 0,
) -> list[Row]:
    """FOCUS rows (column -> value: str, Decimal, UTC datetime or None) for `nodes` and
    `unmetered` (GPU instances the cluster does not meter) over the hours starting at
    `hour_starts_ms` (whole UTC hours): one usage line per billed resource per hour (per day
    with `granularity="daily"`, grouped by unit price), the commitments' recurring purchase
    lines, and with `extras` disks, data transfer, a daily tax line and a monthly credit.
    `provider_columns` adds the provider's x_ columns to the FOCUS version's columns;
    `resource_id_form` picks AWS's ARN or GCP's numeric instance id (ResourceIdForm)."""
    hours = sorted(set(hour_starts_ms))
    if any(h % HOUR_MS for h in hours):
        raise ValueError("hour_starts_ms must be whole UTC hours")
    everything = [*nodes, *unmetered]
    for node in everything:
        if node.provider != provider:
            raise ValueError(f"{node.provider_id} is not a {provider} instance")
        node.instance.billed_resource_id(resource_id_form)  # ValueError for another provider's
    account = billing_account_id or DEFAULT_BILLING_ACCOUNTS[provider]
    span_hours = 1 if granularity == "hourly" else 24
    builder = LineBuilder(provider, focus_version, account, seed, span_hours, resource_id_form)
    rows: list[Row] = []
    fees: dict[tuple[str, int], tuple[BillNode, Decimal, Decimal]] = {}
    for resource_id, node, start_ms, hours_n, unit_price, count in usage_groups(
        everything, hours, granularity, resource_id_form, seed
    ):
        rows.append(builder.usage(node, resource_id, start_ms, hours_n, unit_price, count))
        if node.pricing in ("savings_plan", "reserved"):
            key = (builder.commitment(node)["id"], start_ms)
            _, fee, quantity = fees.get(key, (node, Decimal(0), Decimal(0)))
            fees[key] = (node, fee + unit_price * hours_n * count, quantity + hours_n * count)
    for (_, start_ms), (node, fee, quantity) in sorted(fees.items(), key=lambda kv: kv[0]):
        rows.append(builder.purchase(node, start_ms, fee, quantity))
    if extras and hours:
        rows.extend(builder.extras(everything, hours, rows))
    names = columns(focus_version) + (x_columns(provider) if provider_columns else ())
    return [{name: row.get(name) for name in names} for row in rows]


def restate(
    rows: Sequence[Row], changed_hour_starts_ms: Iterable[int], usage_fraction: Decimal
) -> list[Row]:
    """The month re-issued with a late correction: the GPU usage lines charged in the given
    hours keep `usage_fraction` of their quantities and amounts (the instance ran that share of
    the hour); a commitment's fee stays, so the share it no longer covers follows the line as
    unused commitment (CommitmentDiscountStatus Unused, at the commitment's ResourceId). Every
    other line is unchanged; the result is the whole month, as providers re-issue it."""
    changed = {_utc(ms) for ms in changed_hour_starts_ms}
    out: list[Row] = []
    for row in rows:
        if not (
            row.get("ChargeCategory") == "Usage"
            and row.get("ChargePeriodStart") in changed
            and row.get("SkuMeter") == "Compute"
        ):
            out.append(dict(row))
            continue
        new = dict(row)
        for name in AMOUNT_COLUMNS:
            value = row.get(name)
            if isinstance(value, Decimal) and not name.endswith("UnitPrice"):
                new[name] = (value * usage_fraction).quantize(_PLACES)
        out.append(new)
        if row.get("CommitmentDiscountStatus") == "Used":
            hours = row["PricingQuantity"] - new["PricingQuantity"]
            out.append(_unused(row, row["EffectiveCost"] - new["EffectiveCost"], hours))
    return out


def _unused(row: Row, amount: Decimal, hours: Decimal) -> Row:
    """The commitment left unused when `row`'s covered usage shrank by `amount` (USD) and
    `hours`: a spend commitment counts it in USD, a usage commitment in hours."""
    spend = row.get("CommitmentDiscountCategory") == "Spend"
    unused: Row = dict.fromkeys(row)
    keep = (
        *(n for n in row if n.endswith(("Name", "Id", "Type", "Currency", "Tags"))),
        "BillingPeriodStart",
        "BillingPeriodEnd",
        "ChargePeriodStart",
        "ChargePeriodEnd",
        "ServiceCategory",
        "ServiceSubcategory",
        "RegionId",
        "RegionName",
        "AvailabilityZone",
        "CommitmentDiscountCategory",
    )
    unused.update({name: row[name] for name in keep if name in row})
    unused.update(
        ChargeCategory="Usage",
        ChargeFrequency="Usage-Based",
        ChargeDescription=f"{row['CommitmentDiscountName']} unused commitment",
        CommitmentDiscountStatus="Unused",
        PricingCategory="Committed",
        ResourceId=row["CommitmentDiscountId"],
        ResourceName=str(row["CommitmentDiscountId"]).rsplit("/", 1)[-1],
        ResourceType=row["CommitmentDiscountType"],
        SkuMeter="Commitment",
        BilledCost=Decimal(0),
        EffectiveCost=amount,
        ListCost=amount,
        ContractedCost=amount,
        ListUnitPrice=Decimal(1),
        ContractedUnitPrice=Decimal(1),
        PricingQuantity=amount,
        PricingUnit="USD",
    )
    for name, value in (
        ("PricingCurrencyListUnitPrice", Decimal(1)),
        ("PricingCurrencyContractedUnitPrice", Decimal(1)),
        ("PricingCurrencyEffectiveCost", amount),
        ("CommitmentDiscountQuantity", amount if spend else hours),
        ("CommitmentDiscountUnit", "USD" if spend else "Hours"),
    ):
        if name in row:
            unused[name] = value
    return unused


def write_bill(path: str | Path, rows: Sequence[Row], fmt: Literal["csv", "parquet"]) -> None:
    """Write `rows` as the provider writes its export (see `gpuledger.demo.bill_files`)."""
    from gpuledger.demo.bill_files import write_csv, write_parquet

    if fmt == "csv":
        write_csv(path, rows)
    elif fmt == "parquet":
        write_parquet(path, rows)
    else:
        raise ValueError(f"unknown bill format {fmt!r}: csv or parquet")


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


# The demo bill: the demo cluster's AWS instances at the example price book's on-demand rate
# per GPU-hour times the instance's GPUs (p5.48xlarge: 8 x 6.88 = 55.04), so the bill and the
# meter agree on price and differ by what the meter does not see (GPUs no pod used, the rest
# of the instance). The H100 node is on a savings plan (28 % off), the L40S node on spot.
_DEMO_PRICES: Mapping[str, tuple[str, str, Pricing]] = {
    "p5.48xlarge": ("55.04", "39.6288", "savings_plan"),
    "p4de.24xlarge": ("27.20", "27.20", "on_demand"),
    "p4d.24xlarge": ("22.00", "22.00", "on_demand"),
    "g6e.12xlarge": ("7.44", "3.20", "spot"),
}


def demo_bill_nodes() -> tuple[BillNode, ...]:
    """The demo cluster's nodes (`agents.demo_nodes.demo_nodes()`) as the AWS bill prices them."""
    from agents.demo_nodes import demo_nodes

    nodes = []
    for node in demo_nodes():
        list_price, effective, pricing = _DEMO_PRICES[node.instance_type]
        nodes.append(
            BillNode(
                node.provider_id,
                node.instance_type,
                Decimal(list_price),
                Decimal(effective),
                pricing,
            )
        )
    return tuple(nodes)


def demo_bill(
    hour_starts_ms: Iterable[int], *, focus_version: FocusVersion = "1.2", seed: int = 0
) -> list[Row]:
    """The demo's AWS bill for the hours: its nodes, an unmetered GPU instance, the extras."""
    unmetered = BillNode(
        "aws:///us-east-1c/i-0fedcba9876543210", "p5.48xlarge", Decimal("55.04"), Decimal("55.04")
    )
    return bill_rows(
        "aws", focus_version, demo_bill_nodes(), hour_starts_ms, unmetered=(unmetered,), seed=seed
    )

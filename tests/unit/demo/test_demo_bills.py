"""`gpuledger.demo.bills`: FOCUS rows per node-hour at the node's price, exactly, per pricing
(on demand, savings plan, reservation, spot), in each provider's ResourceId form, and files."""

from __future__ import annotations

import csv
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

from gpuledger.demo.bill_columns import AMOUNT_COLUMNS, columns
from gpuledger.demo.bills import BillNode, bill_rows, restate, spot_price_per_hour, write_bill

H = 3_600_000
NOV = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp() * 1000)
HOURS = [NOV + i * H for i in range(30)]  # 30 hours over two days
H100 = BillNode(
    "aws:///us-east-1a/i-29e4e063cd05dc998", "p5.48xlarge", Decimal("98.32"), Decimal("98.32")
)
A100_SP = BillNode(
    "aws:///us-east-1b/i-555bfe0a81577d864",
    "p4d.24xlarge",
    Decimal("40.96"),
    Decimal("27.4432"),
    "savings_plan",
)
A100_RI = BillNode(
    "aws:///us-east-1b/i-0aaaabbbbccccdddd",
    "p4d.24xlarge",
    Decimal("40.96"),
    Decimal("26.624"),
    "reserved",
)
L40S_SPOT = BillNode(
    "aws:///us-east-1a/i-31e6ff7985fdfc727",
    "g6e.12xlarge",
    Decimal("10.49"),
    Decimal("4.196"),
    "spot",
)
NODES = (H100, A100_SP, A100_RI, L40S_SPOT)
_RG = "azure:///subscriptions/1111/resourceGroups/MC_demo/providers/Microsoft.Compute"
AZ_SS = tuple(
    BillNode(
        f"{_RG}/virtualMachineScaleSets/aks-h100-vmss/virtualMachines/{i}",
        "Standard_ND96isr_H100_v5",
        Decimal("98.32"),
        Decimal("98.32"),
    )
    for i in (0, 1)
)
AZ_VM = BillNode(
    f"{_RG}/virtualMachines/nd-a100", "Standard_ND96asr_v4", Decimal("32.77"), Decimal("32.77")
)
GCE = BillNode(
    "gce://demo-proj/us-central1-a/gke-h100-x1", "a3-highgpu-8g", Decimal("88.25"), Decimal("88.25")
)


def usage_by_resource(rows: list[dict[str, object]]) -> dict[str, list[dict[str, object]]]:
    out: dict[str, list[dict[str, object]]] = defaultdict(list)
    for row in rows:
        if row["ChargeCategory"] == "Usage" and row["SkuMeter"] == "Compute":
            out[str(row["ResourceId"])].append(row)
    return out


def test_every_node_hour_costs_its_effective_price_and_lists_its_list_price() -> None:
    rows = bill_rows("aws", "1.2", NODES, HOURS, extras=False)
    usage = usage_by_resource(rows)
    for node in NODES:
        lines = usage[node.instance.name]
        assert len(lines) == len(HOURS)
        for line in lines:
            hour_ms = int(line["ChargePeriodStart"].timestamp() * 1000)  # type: ignore[attr-defined]
            price = (
                spot_price_per_hour(node, hour_ms)
                if node.pricing == "spot"
                else node.effective_price_per_hour
            )
            assert line["EffectiveCost"] == price * 1
            assert line["ListCost"] == line["ListUnitPrice"] == node.list_price_per_hour
            assert line["PricingQuantity"] == line["ConsumedQuantity"] == 1
            assert line["ChargePeriodEnd"] - line["ChargePeriodStart"] == (  # type: ignore[operator]
                datetime(2026, 1, 1, 1) - datetime(2026, 1, 1)
            )
    on_demand = usage[H100.instance.name]
    assert all(
        r["BilledCost"]
        == r["EffectiveCost"]
        == r["ListCost"]
        == r["ContractedCost"]
        == Decimal("98.32")
        and r["PricingCategory"] == "Standard"
        for r in on_demand
    )
    total = sum((r["EffectiveCost"] for r in usage[A100_SP.instance.name]), Decimal(0))
    assert total == Decimal("27.4432") * len(HOURS)


def test_committed_usage_is_billed_zero_and_the_commitment_bills_its_recurring_fee() -> None:
    rows = bill_rows("aws", "1.2", NODES, HOURS, extras=False)
    for node, category, kind in (
        (A100_SP, "Spend", "Savings Plan"),
        (A100_RI, "Usage", "Reserved Instance"),
    ):
        lines = usage_by_resource(rows)[node.instance.name]
        assert {r["BilledCost"] for r in lines} == {Decimal(0)}
        assert {r["PricingCategory"] for r in lines} == {"Committed"}
        assert {r["CommitmentDiscountStatus"] for r in lines} == {"Used"}
        assert {(r["CommitmentDiscountCategory"], r["CommitmentDiscountType"]) for r in lines} == {
            (category, kind)
        }
        (commitment,) = {r["CommitmentDiscountId"] for r in lines}
        purchases = [
            r for r in rows if r["ChargeCategory"] == "Purchase" and r["ResourceId"] == commitment
        ]
        assert len(purchases) == len(HOURS)
        assert all(
            p["ChargeFrequency"] == "Recurring" and p["EffectiveCost"] == 0 for p in purchases
        )
        assert sum((p["BilledCost"] for p in purchases), Decimal(0)) == sum(
            (r["EffectiveCost"] for r in lines), Decimal(0)
        )
        assert commitment not in {n.instance.name for n in NODES}
    assert str(commitment).startswith("arn:aws:ec2:us-east-1:")  # the reservation


def test_spot_is_dynamic_with_a_price_that_changes_by_the_hour() -> None:
    lines = usage_by_resource(bill_rows("aws", "1.2", [L40S_SPOT], HOURS, extras=False))
    spot = lines[L40S_SPOT.instance.name]
    assert {r["PricingCategory"] for r in spot} == {"Dynamic"}
    prices = [r["EffectiveCost"] for r in spot]
    assert len(set(prices)) > len(HOURS) // 2
    assert all(r["BilledCost"] == r["EffectiveCost"] == r["ContractedUnitPrice"] for r in spot)
    assert all(Decimal("3.7764") <= p <= Decimal("4.6156") for p in prices)  # type: ignore[operator]


def test_the_same_seed_gives_the_same_rows_and_another_seed_other_spot_prices() -> None:
    assert bill_rows("aws", "1.3", NODES, HOURS, seed=3) == bill_rows(
        "aws", "1.3", NODES, HOURS, seed=3
    )
    one = bill_rows("aws", "1.3", [L40S_SPOT], HOURS, extras=False, seed=1)
    two = bill_rows("aws", "1.3", [L40S_SPOT], HOURS, extras=False, seed=2)
    assert [r["EffectiveCost"] for r in one] != [r["EffectiveCost"] for r in two]


@pytest.mark.parametrize("provider", ["aws", "azure", "gcp"])
@pytest.mark.parametrize("version", ["1.0", "1.2", "1.3"])
def test_amounts_are_exact_with_at_most_ten_places_and_columns_are_the_versions(
    provider: str, version: str
) -> None:
    nodes = {"aws": NODES, "azure": (*AZ_SS, AZ_VM), "gcp": (GCE,)}[provider]
    rows = bill_rows(provider, version, nodes, HOURS, seed=5)  # type: ignore[arg-type]
    for row in rows:
        assert list(row)[: len(columns(version))] == list(columns(version))
        assert all(name.startswith("x_") for name in list(row)[len(columns(version)) :])
        for name in AMOUNT_COLUMNS:
            value = row.get(name)
            if value is not None:
                assert isinstance(value, Decimal) and -value.as_tuple().exponent <= 10, (
                    name,
                    value,
                )  # type: ignore[operator]
    if version == "1.3":
        assert {(r["ServiceProviderName"], r["HostProviderName"]) for r in rows} == {
            (rows[0]["ProviderName"], rows[0]["ProviderName"])
        }
    assert len(columns("1.0")) == 43 and "ServiceProviderName" not in columns("1.2")


def test_billing_periods_are_calendar_months() -> None:
    oct_end = NOV - 2 * H
    rows = bill_rows("aws", "1.2", [H100], [oct_end, oct_end + H, NOV], extras=False)
    periods = {
        (r["ChargePeriodStart"].month, r["BillingPeriodStart"], r["BillingPeriodEnd"]) for r in rows
    }  # type: ignore[attr-defined]
    oct1, nov1, dec1 = (datetime(2026, m, 1, tzinfo=UTC) for m in (10, 11, 12))
    assert periods == {(10, oct1, nov1), (11, nov1, dec1)}


def test_each_provider_names_the_instance_as_its_export_does() -> None:
    aws = bill_rows("aws", "1.2", [H100], HOURS[:1], extras=False)
    assert aws[0]["ResourceId"] == "i-29e4e063cd05dc998" and aws[0]["ResourceName"] is None
    arn = bill_rows("aws", "1.2", [H100], HOURS[:1], extras=False, resource_id_form="arn")
    assert arn[0]["ResourceId"] == "arn:aws:ec2:us-east-1:210987654321:instance/i-29e4e063cd05dc998"
    assert '"InstanceType":"p5.48xlarge"' in str(aws[0]["SkuPriceDetails"])
    assert aws[0]["x_UsageType"] == "USE1-BoxUsage:p5.48xlarge"

    azure = bill_rows("azure", "1.2", [*AZ_SS, AZ_VM], HOURS[:2], extras=False)
    group = "/subscriptions/1111/resourcegroups/mc_demo/providers/microsoft.compute"
    scale_set = f"{group}/virtualmachinescalesets/aks-h100-vmss"
    by_id = usage_by_resource(azure)
    assert set(by_id) == {
        scale_set,
        f"{group}/virtualmachines/nd-a100",
    }
    # One line per hour for the scale set's two instances, as Azure bills a uniform scale set.
    assert [r["PricingQuantity"] for r in by_id[scale_set]] == [2, 2]
    assert {r["EffectiveCost"] for r in by_id[scale_set]} == {Decimal("196.64")}
    assert {r["ResourceName"] for r in by_id[scale_set]} == {"aks-h100-vmss"}
    assert (
        by_id[scale_set][0]["RegionId"] == "eastus"
        and by_id[scale_set][0]["AvailabilityZone"] is None
    )

    gcp = bill_rows("gcp", "1.2", [GCE], HOURS[:1], extras=False)
    assert (
        gcp[0]["ResourceId"]
        == "//compute.googleapis.com/projects/demo-proj/zones/us-central1-a/instances/gke-h100-x1"
    )
    assert gcp[0]["ResourceName"] == "gke-h100-x1" and gcp[0]["RegionId"] == "us-central1"
    assert gcp[0]["SubAccountId"] == "demo-proj"
    numeric = bill_rows("gcp", "1.2", [GCE], HOURS[:1], resource_id_form="numeric_id")
    number = str(numeric[0]["ResourceId"]).rsplit("/", 1)[-1]
    assert number.isdigit() and len(number) == 19
    assert numeric[0]["ResourceName"] == "gke-h100-x1"
    assert {r["ResourceId"] for r in numeric if r["SkuMeter"] == "Data Transfer"} == {
        numeric[0]["ResourceId"]
    }
    with pytest.raises(ValueError, match="no ResourceId form 'arn' for gcp"):
        bill_rows("gcp", "1.2", [GCE], HOURS[:1], resource_id_form="arn")


def test_extras_are_other_resources_a_tax_without_resource_and_a_negative_credit() -> None:
    rows = bill_rows("aws", "1.2", [H100], HOURS, unmetered=[A100_RI])
    instances = {H100.instance.name, A100_RI.instance.name}
    disks = [r for r in rows if r["SkuMeter"] == "Storage"]
    assert disks and all(str(r["ResourceId"]).startswith("vol-") for r in disks)
    transfer = [r for r in rows if r["SkuMeter"] == "Data Transfer"]
    assert {r["ResourceId"] for r in transfer} == instances  # charged to the instance
    taxes = [r for r in rows if r["ChargeCategory"] == "Tax"]
    assert len(taxes) == 2 and all(r["ResourceId"] is None for r in taxes)
    (credit,) = [r for r in rows if r["ChargeCategory"] == "Credit"]
    assert credit["BilledCost"] < 0 and credit["EffectiveCost"] < 0  # type: ignore[operator]
    assert set(usage_by_resource(rows)) == instances  # the unmetered instance is on the bill


def test_daily_granularity_has_one_line_per_node_and_day_at_the_price_times_hours() -> None:
    rows = bill_rows("azure", "1.2", [AZ_VM], HOURS, extras=False, granularity="daily")
    lines = usage_by_resource(rows)[AZ_VM.instance.billed_resource_id()]
    assert [(r["ChargePeriodStart"].day, r["PricingQuantity"]) for r in lines] == [(1, 24), (2, 6)]  # type: ignore[attr-defined]
    assert [r["EffectiveCost"] for r in lines] == [Decimal("32.77") * 24, Decimal("32.77") * 6]
    day = datetime(2026, 1, 2) - datetime(2026, 1, 1)
    assert all(r["ChargePeriodEnd"] - r["ChargePeriodStart"] == day for r in lines)  # type: ignore[operator]


def test_restate_changes_only_the_corrected_hours_gpu_usage() -> None:
    rows = bill_rows("aws", "1.2", NODES, HOURS, seed=1)
    again = restate(rows, HOURS[3:5], Decimal("0.5"))
    hours = {datetime.fromtimestamp(h / 1000, UTC) for h in HOURS[3:5]}
    changed = [(a, b) for a, b in zip(rows, again, strict=False) if a != b]
    assert len(changed) >= 1 and len(again) == len(rows) + 2 * 2  # two committed nodes
    corrected = [r for r in again if r not in rows]
    usage = [r for r in corrected if r["CommitmentDiscountStatus"] != "Unused"]
    assert len(usage) == 2 * len(NODES)
    for new in usage:
        old = next(
            r
            for r in rows
            if r["ResourceId"] == new["ResourceId"]
            and r["ChargePeriodStart"] == new["ChargePeriodStart"]
            and r["SkuMeter"] == "Compute"
        )
        assert old["ChargePeriodStart"] in hours
        assert new["EffectiveCost"] == old["EffectiveCost"] * Decimal("0.5")  # type: ignore[operator]
        assert new["PricingQuantity"] == Decimal("0.5")
        assert new["ListUnitPrice"] == old["ListUnitPrice"]
    # The commitments' fees stay; what they no longer cover is unused commitment.
    unused = [r for r in again if r["CommitmentDiscountStatus"] == "Unused"]
    assert len(unused) == 4 and all(r["BilledCost"] == 0 for r in unused)
    for commitment in {r["CommitmentDiscountId"] for r in unused}:
        fees = sum(
            (
                r["BilledCost"]
                for r in again
                if r["ChargeCategory"] == "Purchase" and r["ResourceId"] == commitment
            ),
            Decimal(0),
        )
        covered = sum(
            (
                r["EffectiveCost"]
                for r in again
                if r["ChargeCategory"] == "Usage" and r["CommitmentDiscountId"] == commitment
            ),
            Decimal(0),
        )
        assert fees == covered
    assert {(r["CommitmentDiscountCategory"], r["CommitmentDiscountUnit"]) for r in unused} == {
        ("Spend", "USD"),
        ("Usage", "Hours"),
    }


def test_write_bill_csv_and_parquet_as_the_provider_types_them(tmp_path: Path) -> None:
    rows = bill_rows("aws", "1.2", NODES, HOURS[:2])
    write_bill(tmp_path / "b.csv", rows, "csv")
    with (tmp_path / "b.csv").open() as f:
        first = next(r for r in csv.DictReader(f) if r["ResourceId"] == H100.instance.name)
    assert first["ChargePeriodStart"] == "2026-11-01T00:00:00Z" and first["BilledCost"] == "98.32"
    assert first["CommitmentDiscountId"] == ""
    write_bill(tmp_path / "b.parquet", rows, "parquet")
    schema = pq.read_schema(tmp_path / "b.parquet")
    assert schema.field("BilledCost").type == pa.float64()
    assert schema.field("ChargePeriodStart").type == pa.timestamp("ms", tz="UTC")
    azure = bill_rows("azure", "1.3", [AZ_VM], HOURS[:2])
    write_bill(tmp_path / "a.parquet", azure, "parquet")
    table = pq.read_table(tmp_path / "a.parquet")
    assert pa.types.is_decimal(table.schema.field("EffectiveCost").type)
    assert table.column("EffectiveCost").to_pylist()[0] == Decimal("32.77")
    with pytest.raises(ValueError, match="csv or parquet"):
        write_bill(tmp_path / "x", rows, "json")  # type: ignore[arg-type]


def test_bad_nodes_are_refused() -> None:
    with pytest.raises(ValueError, match="effective price is its list price"):
        BillNode(H100.provider_id, "p5.48xlarge", Decimal("98.32"), Decimal("50"))
    with pytest.raises(ValueError, match="providerID"):
        BillNode("kind://node-1", "p5.48xlarge", Decimal("1"), Decimal("1"))
    with pytest.raises(ValueError, match="not a azure instance"):
        bill_rows("azure", "1.2", [H100], HOURS)
    with pytest.raises(ValueError, match="whole UTC hours"):
        bill_rows("aws", "1.2", [H100], [NOV + 1])


def test_the_demo_bill_prices_the_demo_nodes_at_the_example_books_gpu_rates() -> None:
    from agents.demo_nodes import demo_nodes
    from gpuledger.demo.bills import demo_bill, demo_bill_nodes

    nodes = demo_bill_nodes()
    assert [n.provider_id for n in nodes] == [n.provider_id for n in demo_nodes()]
    rows = demo_bill(HOURS[:2])
    usage = usage_by_resource(rows)
    assert set(usage) == {n.instance.name for n in nodes} | {"i-0fedcba9876543210"}
    assert {r["ListUnitPrice"] for r in usage[nodes[0].instance.name]} == {Decimal("55.04")}

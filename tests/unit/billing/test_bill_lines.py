"""Decoding a provider's FOCUS row: exact amounts, every FOCUS version's provider column,
the time forms providers write, and a clear BillRowError for anything else (never another
exception, whatever the row holds)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.billing.lines import BillRowError, decode_line, parse_amount, parse_bill_time
from streams.billing.resources import GpuInstanceTypes

TYPES = GpuInstanceTypes()


def row(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "BillingAccountId": "100000000001",
        "BillingPeriodStart": "2026-11-01T00:00:00Z",
        "BillingPeriodEnd": "2026-12-01T00:00:00Z",
        "ChargePeriodStart": "2026-11-03T05:00:00Z",
        "ChargePeriodEnd": "2026-11-03T06:00:00Z",
        "ChargeCategory": "Usage",
        "ChargeClass": "",
        "BilledCost": "0",
        "EffectiveCost": "70.1234567891",
        "ListCost": "98.32",
        "BillingCurrency": "USD",
        "ProviderName": "AWS",
        "ResourceId": "arn:aws:ec2:us-east-1:200000000011:instance/i-0123456789abcdef0",
        "x_UsageType": "USE1-BoxUsage:p5.48xlarge",
    }
    base.update(changes)
    return base


def test_a_savings_plan_covered_gpu_hour() -> None:
    line = decode_line(row(), TYPES)
    assert line.provider == "AWS"
    assert line.effective_cost == Decimal("70.1234567891")
    assert line.billed_cost == 0
    assert line.resource_key == "aws:i-0123456789abcdef0"
    assert line.instance_type == "p5.48xlarge" and line.gpu_instance
    assert line.charge_period_end_ms - line.charge_period_start_ms == 3_600_000
    assert not line.rounded


def test_focus_1_3_names_the_provider_service_provider_name() -> None:
    line = decode_line(row(ProviderName=None, ServiceProviderName="Microsoft"), TYPES)
    assert line.provider == "Microsoft"
    with pytest.raises(BillRowError, match="provider"):
        decode_line(row(ProviderName=""), TYPES)


def test_instance_type_from_sku_price_details() -> None:
    line = decode_line(
        row(x_UsageType="", SkuPriceDetails='{"InstanceType": "g6e.12xlarge", "CoreCount": 48}'),
        TYPES,
    )
    assert line.instance_type == "g6e.12xlarge" and line.gpu_instance


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-03T05:00:00Z",
        "2026-11-03T05:00:00.000Z",
        "2026-11-03 05:00:00 UTC",
        "2026-11-03 05:00:00",
        "2026-11-03T05:00:00+00:00",
        "2026-11-03T05:00:00.0000000Z",
    ],
)
def test_time_forms_providers_write(text: str) -> None:
    assert parse_bill_time(text) == parse_bill_time("2026-11-03T05:00:00Z")


def test_parquet_values() -> None:
    at = datetime(2026, 11, 3, 5, tzinfo=UTC)
    assert parse_bill_time(at) == parse_bill_time(at.replace(tzinfo=None))
    assert parse_amount(0.1) == (Decimal("0.1"), False)
    assert parse_amount(Decimal("1.0000000000000004")) == (Decimal("1.000000000000000"), True)
    assert parse_amount(3) == (Decimal(3), False)


@pytest.mark.parametrize(
    ("changes", "column"),
    [
        ({"EffectiveCost": "NaN"}, "EffectiveCost"),
        ({"EffectiveCost": "1e30"}, "EffectiveCost"),
        ({"BilledCost": "12,50"}, "BilledCost"),
        ({"ListCost": None}, "ListCost"),
        ({"BillingCurrency": "usd"}, "BillingCurrency"),
        ({"ChargePeriodEnd": "2026-11-03T05:00:00Z"}, "ChargePeriodEnd"),
        ({"ChargePeriodStart": "03/11/2026 05:00"}, "ChargePeriodStart"),
        ({"BillingPeriodEnd": "2026-10-01T00:00:00Z"}, "BillingPeriodEnd"),
        ({"BillingAccountId": " "}, "BillingAccountId"),
    ],
)
def test_bad_rows_name_their_column(changes: dict[str, Any], column: str) -> None:
    with pytest.raises(BillRowError) as caught:
        decode_line(row(**changes), TYPES)
    assert caught.value.column == column


_values = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.floats(allow_nan=True),
    st.integers(),
    st.booleans(),
    st.decimals(allow_nan=True),
    st.datetimes(),
    st.binary(max_size=10),
)


@given(st.dictionaries(st.sampled_from(sorted(row())), _values, max_size=16))
def test_any_row_decodes_or_raises_bill_row_error(changes: dict[str, Any]) -> None:
    try:
        line = decode_line(row(**changes), TYPES)
    except BillRowError as exc:
        assert exc.reason
    else:
        assert line.billing_currency.isupper()
        assert line.charge_period_end_ms > line.charge_period_start_ms


def test_a_commitments_own_lines_do_not_make_it_a_gpu_instance() -> None:
    plan = "arn:aws:savingsplans::2:savingsplan/1750a82e"
    fee = row(ChargeCategory="Purchase", ResourceId=plan, CommitmentDiscountId=plan)
    unused = row(ResourceId=plan, CommitmentDiscountId=plan, x_UsageType="Unused:p5.48xlarge")
    covered = row(CommitmentDiscountId=plan)  # the instance's usage the plan covers
    assert not decode_line(fee, TYPES).gpu_instance
    assert not decode_line(unused, TYPES).gpu_instance
    assert decode_line(covered, TYPES).gpu_instance


@given(st.permutations(range(4)))
def test_a_resources_instance_type_does_not_depend_on_line_order(order: list[int]) -> None:
    from streams.billing.trueup import charges

    lines = [
        decode_line(row(x_UsageType=t, ChargeCategory=c), TYPES)
        for t, c in (("", "Usage"), ("EBS:VolumeUsage.gp3", "Usage"),
                     ("BoxUsage:p5.48xlarge", "Usage"), ("BoxUsage:g6e.xlarge", "Credit"))
    ]  # fmt: skip
    (first,) = charges(lines)
    (again,) = charges([lines[i] for i in order])
    assert first == again and first.instance_type == "p5.48xlarge" and first.gpu_instance

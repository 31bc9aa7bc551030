"""Origin charges and their allocated parts: exact unit price x quantity on every row, parts
that add up to their origin exactly, ratios that add up to 1, whatever the input."""

from __future__ import annotations

import random
from decimal import Decimal

from focus_builders import H100, cost_row, idle_row, priced, token_row
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.pricing import EXAMPLE_PRICE_BOOK, load_price_book
from streams.reports.focus_charges import (
    ALLOCATED,
    EXACT,
    HOST_KIND,
    IDLE_KIND,
    QUANTITY_QUANTUM,
    UNTAGGED_KIND,
    AllocatedCharge,
    allocate_hours,
)
from streams.reports.focus_columns import ChargebackSettings, focus_row, owner_id
from streams.reports.focus_rules import check_rows
from streams.reports.money import largest_remainder
from streams.reports.params import parse_month

NOV = parse_month("2026-11")


def origins(charges: list[AllocatedCharge]) -> dict[tuple[object, ...], list[AllocatedCharge]]:
    out: dict[tuple[object, ...], list[AllocatedCharge]] = {}
    for c in charges:
        o = c.origin
        out.setdefault((o.hour_ms, o.device_uuid, o.pricing, o.unit_price_usd), []).append(c)
    return out


def assert_exact(charges: list[AllocatedCharge]) -> None:
    for parts in origins(charges).values():
        origin = parts[0].origin
        quantity = sum((p.quantity_hours for p in parts), Decimal(0))
        assert quantity == origin.quantity_hours
        total = Decimal(0)
        for p in parts:
            assert p.cost_usd == EXACT.multiply(origin.unit_price_usd, p.quantity_hours)
            assert p.quantity_hours % QUANTITY_QUANTUM == 0
            total = EXACT.add(total, p.cost_usd)
        assert total == origin.cost_usd
        assert sum((p.ratio for p in parts), Decimal(0)) == 1


def test_one_device_hour_split_among_owners_idle_and_host() -> None:
    rows = [
        cost_row(pod="a", seconds=1800.0),
        cost_row(pod="b", team="ads", product="rank", seconds=600.0),
        cost_row(pod="c", team="__untagged__", product="__untagged__", seconds=300.0),
        cost_row(
            pod="__host__",
            team="__host__",
            product="__host__",
            cost_center="__host__",
            kind="host",
            seconds=100.0,
        ),
        idle_row(seconds=800.0),
    ]
    charges = allocate_hours(rows, [])
    assert_exact(charges)
    origin = charges[0].origin
    assert origin.unit_price_usd == Decimal("4.00")
    assert origin.quantity_hours == Decimal(1)  # 3,600 device-seconds in the hour
    assert origin.cost_usd == Decimal(4)
    by_kind = {(c.owner.kind, c.owner.team): c for c in charges}
    assert set(by_kind) == {
        (ALLOCATED, "search"),
        (ALLOCATED, "ads"),
        (UNTAGGED_KIND, None),
        (HOST_KIND, None),
        (IDLE_KIND, None),
    }
    assert by_kind[(ALLOCATED, "search")].quantity_hours == Decimal("0.5")
    assert by_kind[(ALLOCATED, "search")].cost_usd == Decimal(2)
    assert by_kind[(ALLOCATED, "search")].ratio == Decimal("0.5")
    assert by_kind[(IDLE_KIND, None)].owner.team is None  # no placeholder as a label


def test_a_pod_serving_two_models_gives_a_part_per_model_with_its_tokens() -> None:
    rows = [cost_row(pod="a", seconds=3600.0)]
    tokens = [
        token_row(pod="a", model="meta-llama/Llama-3.1-8B", usd="3", prompt=900),
        token_row(pod="a", model="mistral", usd="1", prompt=100),
    ]
    charges = allocate_hours(rows, tokens)
    assert_exact(charges)
    by_model = {c.owner.model: c for c in charges}
    assert set(by_model) == {"meta-llama/Llama-3.1-8B", "mistral"}
    assert by_model["meta-llama/Llama-3.1-8B"].quantity_hours == Decimal("0.75")
    assert by_model["meta-llama/Llama-3.1-8B"].prompt_tokens == 900
    ident = owner_id(by_model["meta-llama/Llama-3.1-8B"].owner)
    assert ident == "team/search/product/ask/cost-center/cc-1/model/meta-llama%2FLlama-3.1-8B"


def test_models_never_take_more_than_the_pod_cost() -> None:
    rows = [cost_row(pod="a", seconds=900.0), idle_row(seconds=2700.0)]  # the pod cost 1.00
    tokens = [token_row(pod="a", model="m1", usd="3"), token_row(pod="a", model="m2", usd="1")]
    charges = allocate_hours(rows, tokens)
    assert_exact(charges)
    by_model = {c.owner.model: c for c in charges if c.owner.kind == ALLOCATED}
    assert set(by_model) == {"m1", "m2"}  # nothing left over with no model, nothing negative
    assert by_model["m1"].metered_cost_usd == Decimal("0.75")
    assert by_model["m2"].metered_cost_usd == Decimal("0.25")
    assert all(c.quantity_hours > 0 for c in charges)


def test_mig_instances_and_prices_are_origin_charges_of_their_own() -> None:
    rows = [
        cost_row(device="MIG-1", mig="1g.10gb", price="0.571428571428571", seconds=3600.0),
        cost_row(device="MIG-2", mig="3g.40gb", price="1.714285714285714", seconds=1200.0),
        idle_row(device="MIG-2", mig="3g.40gb", price="1.714285714285714", seconds=2400.0),
        cost_row(device="GPU-b", price="2.25", pricing="spot", seconds=3599.999),
        idle_row(device="GPU-b", price="2.25", seconds=0.001),
    ]
    charges = allocate_hours(rows, [])
    assert_exact(charges)
    assert {c.origin.device_uuid for c in charges} == {"MIG-1", "MIG-2", "GPU-b"}
    mig = next(c for c in charges if c.origin.device_uuid == "MIG-1")
    assert mig.origin.unit_price_usd == Decimal("0.571428571428571")
    assert mig.origin.quantity_hours == Decimal(1)


def test_a_device_hour_at_two_prices_is_two_origin_charges() -> None:
    rows = [cost_row(price="4.00", seconds=1800.0), cost_row(price="6.88", seconds=1800.0)]
    charges = allocate_hours(rows, [])
    assert_exact(charges)
    assert sorted(c.origin.unit_price_usd for c in charges) == [Decimal("4.00"), Decimal("6.88")]


def test_a_free_device_is_charged_by_its_seconds_at_zero() -> None:
    rows = [cost_row(price="0", seconds=900.0), idle_row(price="0", seconds=2700.0)]
    charges = allocate_hours(rows, [])
    assert_exact(charges)
    assert charges[0].origin.quantity_hours == Decimal(1)
    assert {c.quantity_hours for c in charges} == {Decimal("0.25"), Decimal("0.75")}


def test_largest_remainder_adds_up_and_is_within_one_step() -> None:
    parts = largest_remainder(Decimal(1), [Decimal(1)] * 3, Decimal("1e-12"))
    assert sum(parts) == 1
    assert max(parts) - min(parts) == Decimal("1e-12")
    assert largest_remainder(Decimal("0.5"), [Decimal(0), Decimal(0)], Decimal("0.1")) == [
        Decimal("0.3"),
        Decimal("0.2"),
    ]


PRICES = st.sampled_from(["4.00", "6.88", "2.25", "0.571428571428571", "1.21", "0"])
SECONDS = st.floats(min_value=0.0, max_value=3600.0, allow_nan=False)
TEAMS = st.sampled_from(["search", "ads", "__untagged__", 'a/b,c"d', "=cmd"])


@st.composite
def hour_rows(draw: st.DrawFn) -> list:  # type: ignore[type-arg]
    rows = []
    for d in range(draw(st.integers(1, 3))):
        price = draw(PRICES)
        hour = draw(st.integers(0, 2))
        for p in range(draw(st.integers(1, 4))):
            team = draw(TEAMS)
            rows.append(
                cost_row(
                    hour=hour,
                    device=f"GPU-{d}",
                    pod=f"pod-{p}",
                    team=team,
                    price=price,
                    seconds=draw(SECONDS),
                )
            )
        rows.append(idle_row(hour=hour, device=f"GPU-{d}", price=price, seconds=draw(SECONDS)))
    return rows


@settings(max_examples=150, deadline=None)
@given(hour_rows(), st.randoms(use_true_random=False))
def test_conservation_and_order_independence(rows: list, rng: random.Random) -> None:  # type: ignore[type-arg]
    tokens = [token_row(pod="pod-0", team=r.team, usd="0.001") for r in rows[:1]]
    charges = allocate_hours(rows, tokens)
    assert_exact(charges)
    shuffled = list(rows)
    rng.shuffle(shuffled)
    assert allocate_hours(shuffled, tokens) == charges
    metered = sum((r.cost_usd for r in rows), Decimal(0))
    exact = sum((c.cost_usd for c in charges), Decimal(0))
    # the only difference from the meter's sums: quantities in 1e-12 device-hours
    assert abs(exact - metered) <= Decimal("1e-11") * max(1, len(origins(charges)))
    book = load_price_book(EXAMPLE_PRICE_BOOK)
    assert check_rows([focus_row(c, NOV, ChargebackSettings(), book) for c in charges]) == []


def test_focus_rows_of_a_split_hour_follow_the_1_3_rules() -> None:
    rows = [
        cost_row(pod="a", seconds=1000.0),
        cost_row(pod="b", team="__untagged__", product="ask", seconds=700.0),
        idle_row(seconds=1900.0),
    ]
    book = load_price_book(EXAMPLE_PRICE_BOOK)
    focus = [focus_row(c, NOV, ChargebackSettings(), book) for c in allocate_hours(rows, [])]
    assert check_rows(focus) == []
    tagged, untagged, idle = focus
    assert tagged["ResourceId"] == untagged["ResourceId"] == idle["ResourceId"] == "GPU-aaaa"
    assert tagged["ChargePeriodStart"] == "2026-11-01T00:00:00Z"
    assert tagged["ChargePeriodEnd"] == "2026-11-01T01:00:00Z"
    assert tagged["SkuPriceId"] == f"{H100}|on_demand"
    assert tagged["x_PriceBookEntryId"] == f"{H100}|on_demand|2026-07-01"
    assert tagged["AllocatedTags"] == '{"team":"search","product":"ask","cost-center":"cc-1"}'
    assert untagged["AllocatedResourceId"] is None and idle["AllocatedResourceId"] is None
    assert untagged["AllocatedTags"] == '{"product":"ask","cost-center":"cc-1"}'
    assert idle["AllocatedTags"] is None and idle["x_Team"] is None
    # 1,000 of the hour's 3,600 device-seconds: 0.2777... device-hours, the last step of
    # 1e-12 by largest remainder, at exactly 4.00 USD each
    assert tagged["PricingQuantity"] == Decimal("0.277777777778")
    assert tagged["BilledCost"] == tagged["ListCost"] == Decimal("1.111111111112")
    assert abs(tagged["BilledCost"] - priced("4.00", 1000.0)) < Decimal("1e-11")


def test_the_rules_catch_broken_rows() -> None:
    rows = [cost_row(pod="a", seconds=1800.0), idle_row(seconds=1800.0)]
    good = [focus_row(c, NOV, ChargebackSettings(), None) for c in allocate_hours(rows, [])]
    assert check_rows(good) == []
    cases = {
        "ListCost": ("ListCost", Decimal("2.01")),
        "AllocatedRatio adds up": (
            "AllocatedMethodDetails",
            '{"Elements":[{"AllocatedRatio":0.4}]}',
        ),
        "SkuPriceId is null": ("SkuPriceId", None),
        "empty string": ("x_Model", ""),
        "differ in ResourceType": ("ResourceType", "Accelerator"),
        "AllocatedResourceName must be null": ("AllocatedResourceName", None),
    }
    for expected, (column, value) in cases.items():
        broken = [dict(good[0]), dict(good[1])]
        broken[0][column] = value
        problems = check_rows(broken)
        assert any(expected in p for p in problems), (expected, problems)

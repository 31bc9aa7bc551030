"""The request-based allocation (streams/reports/requests.py): whole devices per request, each
node-hour's money split exactly."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from streams.reports.requests import (
    WHOLE_GPUS,
    CapacityReport,
    DevicePool,
    Hold,
    RequestEvent,
    allocate_requests,
    capacity_at,
    device_class,
    holds_from_events,
    profile_class,
    split_exact,
    split_pool,
)

HOUR_MS = 3_600_000
T0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS


def pool(cost: str, *, cls: str = WHOLE_GPUS, devices: int = 8, node: str = "n1") -> DevicePool:
    return DevicePool("c1", node, cls, T0, T0 + HOUR_MS, Decimal(cost), devices)


def hold(owner: str, count: int, start_min: float = 0, end_min: float = 60, **kw: str) -> Hold:
    resource = kw.get("resource", "nvidia.com/gpu")
    return Hold(
        "c1",
        kw.get("node", "n1"),
        owner,
        resource,
        count,
        T0 + int(start_min * 60_000),
        T0 + int(end_min * 60_000),
    )


def test_resources_name_device_classes() -> None:
    assert device_class("nvidia.com/gpu") == WHOLE_GPUS
    assert device_class("nvidia.com/gpu.shared") == WHOLE_GPUS
    assert device_class("nvidia.com/mig-1g.10gb") == "1g.10gb"
    assert device_class("nvidia.com/mig-") is None
    assert device_class("nvidia.com/vgpu") is None
    assert device_class("amd.com/gpu") is None


def test_a_media_extension_profile_matches_its_resource_name() -> None:
    # NVML spells it 1g.10gb+me; the device plugin's resource cannot hold a `+`.
    assert profile_class("1g.10gb+me") == device_class("nvidia.com/mig-1g.10gb.me")
    assert profile_class("1g.10gb") == "1g.10gb" != profile_class("1g.10gb+me")
    me = pool("7.00", cls=profile_class("1g.10gb+me"), devices=1)
    split = split_pool(me, [hold("a", 1, resource="nvidia.com/mig-1g.10gb.me")], None)
    assert split.charges_usd == {"a": Decimal("7.00")} and split.unrequested_usd == 0


def test_whole_devices_per_request_and_the_rest_unrequested() -> None:
    # 8 GPUs for 80.00 an hour: 10.00 a GPU-hour. a holds 2, b holds 1: 3 of 8 requested.
    split = split_pool(pool("80"), [hold("a", 2), hold("b", 1)], {"nvidia.com/gpu": 8})
    assert split.charges_usd == {"a": Decimal("20"), "b": Decimal("10")}
    assert split.unrequested_usd == Decimal("50")
    assert split.oversubscribed == () and split.estimated == ()


def test_a_pod_holding_its_request_for_part_of_the_hour() -> None:
    # Held from :00 to :15 (a pod that finished mid-hour): a quarter of one GPU-hour.
    split = split_pool(pool("80"), [hold("a", 1, 0, 15)], {"nvidia.com/gpu": 8})
    assert split.charges_usd == {"a": Decimal("2.5")}
    assert split.unrequested_usd == Decimal("77.5")
    # A hold outside the span, on another node or of another class charges nothing.
    others = [
        hold("x", 1, -30, 0),
        hold("y", 1, node="n2"),
        hold("z", 1, resource="nvidia.com/mig-1g.10gb"),
    ]
    assert split_pool(pool("80"), others, {"nvidia.com/gpu": 8}).charges_usd == {}


def test_time_sliced_capacity_prices_a_replica() -> None:
    # 8 GPUs with 4 replicas each: capacity 32 of nvidia.com/gpu; a replica-hour is 80 / 32.
    split = split_pool(pool("80"), [hold("a", 4), hold("b", 1)], {"nvidia.com/gpu": 32})
    assert split.charges_usd == {"a": Decimal("10"), "b": Decimal("2.5")}
    assert split.unrequested_usd == Decimal("67.5")


def test_unknown_capacity_falls_back_to_the_devices_metered() -> None:
    # No capacity report (or none for this resource): the 4 devices metered that hour count.
    for capacity in (None, {}, {"nvidia.com/mig-1g.10gb": 7}):
        split = split_pool(pool("40", devices=4), [hold("a", 1)], capacity)
        assert split.charges_usd == {"a": Decimal("10")}
        assert split.estimated == ("nvidia.com/gpu",)


def test_oversubscribed_requests_are_scaled_down_pro_rata() -> None:
    # 12 GPUs requested on a node of 8 (capacity 8, say a stale report): 3:1 shares of 80.
    split = split_pool(pool("80"), [hold("a", 9), hold("b", 3)], {"nvidia.com/gpu": 8})
    assert split.charges_usd == {"a": Decimal("60"), "b": Decimal("20")}
    assert split.unrequested_usd == 0
    assert split.oversubscribed == (("nvidia.com/gpu", Fraction(3, 2)),)


def test_mig_profiles_are_pools_of_their_own() -> None:
    mig = pool("21", cls="3g.40gb", devices=2)
    holds = [hold("a", 1, resource="nvidia.com/mig-3g.40gb"), hold("b", 1)]
    split = split_pool(mig, holds, {"nvidia.com/mig-3g.40gb": 2, "nvidia.com/gpu": 8})
    assert split.charges_usd == {"a": Decimal("10.5")}
    assert split.unrequested_usd == Decimal("10.5")


def test_thirds_add_up_to_the_last_quantum() -> None:
    split = split_pool(pool("1", devices=3), [hold("a", 1), hold("b", 1)], {"nvidia.com/gpu": 3})
    assert sum(split.charges_usd.values()) + split.unrequested_usd == Decimal(1)
    assert split.charges_usd["a"] == Decimal("0.333333333333334")  # first of the equal rests
    assert split.charges_usd["b"] == Decimal("0.333333333333333")


def test_events_become_holds_until_the_next_event() -> None:
    def event(t_min: int, reqs: dict[str, int], node: str = "n1", uid: str = "u1") -> RequestEvent:
        return RequestEvent("c1", node, uid, "a", tuple(reqs.items()), T0 + t_min * 60_000)

    events = [
        event(0, {"nvidia.com/gpu": 1}, node=""),  # pending: on no node yet
        event(5, {"nvidia.com/gpu": 1}),
        event(20, {"nvidia.com/gpu": 2}),
        event(40, {}),  # finished: holds nothing
        event(10, {"nvidia.com/mig-1g.10gb": 1}, uid="u2"),
    ]
    holds = holds_from_events(events, until_ms=T0 + HOUR_MS)
    assert sorted((h.resource, h.count, h.start_ms - T0, h.end_ms - T0) for h in holds) == [
        ("nvidia.com/gpu", 1, 300_000, 1_200_000),
        ("nvidia.com/gpu", 2, 1_200_000, 2_400_000),
        ("nvidia.com/mig-1g.10gb", 1, 600_000, HOUR_MS),
    ]


def test_capacity_is_the_latest_report_before_the_span() -> None:
    reports = [
        CapacityReport("c1", "n1", T0 - HOUR_MS, (("nvidia.com/gpu", 8),)),
        CapacityReport("c1", "n1", T0 + 60_000, (("nvidia.com/gpu", 32),)),
    ]
    assert capacity_at(reports, T0, T0 + HOUR_MS) == {"nvidia.com/gpu": 8}
    assert capacity_at(reports, T0 + HOUR_MS, T0 + 2 * HOUR_MS) == {"nvidia.com/gpu": 32}
    # A node first reported during the span takes that first report.
    assert capacity_at(reports[1:], T0, T0 + HOUR_MS) == {"nvidia.com/gpu": 32}
    assert capacity_at(reports[1:], T0 - HOUR_MS, T0) is None


def test_allocation_over_pools_adds_up_and_says_what_it_estimated() -> None:
    pools = [pool("80"), pool("40", node="n2", devices=4)]
    holds = [hold("a", 2), hold("a", 10, node="n2"), hold("b", 1, 30, 90)]
    capacities = {("c1", "n1"): [CapacityReport("c1", "n1", T0, (("nvidia.com/gpu", 8),))]}
    result = allocate_requests(pools, holds, capacities)
    assert result.by_owner_usd == {"a": Decimal("60"), "b": Decimal("5")}
    assert result.unrequested_usd == Decimal("55")
    assert result.total_usd == Decimal("120")
    assert result.estimated == (("c1", "n2", "nvidia.com/gpu"),)
    assert [(o.node, o.spans, o.peak_ratio) for o in result.oversubscribed] == [
        ("n2", 1, Fraction(10, 4))
    ]
    twice = result.plus(result)
    assert twice.total_usd == Decimal(240) and twice.by_owner_usd["a"] == Decimal(120)
    assert twice.oversubscribed[0].spans == 2 and twice.estimated_spans == 2


money = st.decimals(min_value=0, max_value=10**6, places=15, allow_nan=False)
holds_st = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "d"]),
        st.integers(1, 40),
        st.integers(-30, 70),
        st.integers(0, 90),
        st.sampled_from(["nvidia.com/gpu", "nvidia.com/gpu.shared", "nvidia.com/mig-1g.10gb"]),
    ),
    max_size=12,
)


@given(
    money,
    holds_st,
    st.integers(0, 40),
    st.integers(1, 8),
    st.sampled_from([WHOLE_GPUS, "1g.10gb"]),
)
def test_conservation_per_node_hour_exactly(
    cost: Decimal,
    spec: list[tuple[str, int, int, int, str]],
    capacity: int,
    devices: int,
    cls: str,
) -> None:
    holds = [
        hold(owner, count, start, start + length, resource=resource)
        for owner, count, start, length, resource in spec
    ]
    caps = {"nvidia.com/gpu": capacity, "nvidia.com/mig-1g.10gb": capacity}
    split = split_pool(pool(str(cost), cls=cls, devices=devices), holds, caps)
    assert sum(split.charges_usd.values(), Decimal(0)) + split.unrequested_usd == cost
    assert all(v >= 0 for v in split.charges_usd.values()) and split.unrequested_usd >= 0
    # Each charge is its exact share (scaled down pro rata when oversubscribed) to one quantum.
    shares: dict[str, Fraction] = {}
    for h in holds:
        overlap = min(h.end_ms, T0 + HOUR_MS) - max(h.start_ms, T0)
        if overlap <= 0 or device_class(h.resource) != cls:
            continue
        units = caps.get(h.resource) or devices
        shares[h.owner] = shares.get(h.owner, Fraction(0)) + Fraction(
            h.count * overlap, units * HOUR_MS
        )
    whole = max(Fraction(1), sum(shares.values(), Fraction(0)))
    for owner, share in shares.items():
        exact = Fraction(cost) * share / whole
        assert abs(Fraction(split.charges_usd.get(owner, Decimal(0))) - exact) <= Fraction(
            len(holds) + 1, 10**15
        )


@given(money, st.lists(st.fractions(min_value=0, max_value=50), min_size=1, max_size=20))
def test_split_exact_adds_up(total: Decimal, weights: list[Fraction]) -> None:
    weights = [*weights, Fraction(1)]
    parts = split_exact(total, weights)
    assert sum(parts, Decimal(0)) == total
    whole = sum(weights, Fraction(0))
    for part, weight in zip(parts, weights, strict=True):
        assert abs(Fraction(part) - Fraction(total) * weight / whole) < Fraction(1, 10**15)


@given(
    st.lists(
        st.tuples(st.sampled_from(["n1", "n2"]), st.sampled_from([WHOLE_GPUS, "1g.10gb"]), money),
        max_size=6,
    ),
    holds_st,
    st.booleans(),
)
def test_every_node_hour_adds_up_over_many_pools(
    pools_spec: list[tuple[str, str, Decimal]],
    spec: list[tuple[str, int, int, int, str]],
    reported: bool,
) -> None:
    pools = [pool(str(cost), cls=cls, node=node) for node, cls, cost in pools_spec]
    holds = [
        hold(owner, count, start, start + length, resource=resource, node=("n1", "n2")[count % 2])
        for owner, count, start, length, resource in spec
    ]
    capacities = (
        {("c1", "n1"): [CapacityReport("c1", "n1", T0, (("nvidia.com/gpu", 8),))]}
        if reported
        else {}
    )
    result = allocate_requests(pools, holds, capacities)
    total = sum((p.cost_usd for p in pools), Decimal(0))
    assert result.total_usd == total
    assert sum(result.by_owner_usd.values(), Decimal(0)) + result.unrequested_usd == total

"""Allocation core (design §3): hand-checkable examples and properties.

The test price book prices "Test GPU" at 3.60 USD/h, so a 60 s sample of a whole GPU costs
exactly 0.06 USD and every figure below can be checked by hand.
"""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

import pytest
from folding import fold
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import CloudEvent, GpuSample, PodInfo, ProcessSample, make_event
from streams.allocation import (
    IDLE_POLICIES,
    SHARE_POLICIES,
    AllocationSettings,
    DeviceWindow,
    Pricer,
    finalize_device_window,
    process_shares,
    sample_cost_usd,
    split_exact,
)
from streams.labels import LabelSettings, PodHistory, resolve_owner
from streams.pricing import PriceBook, parse_price_book
from streams.rows import CostRow
from streams.windows import window_of

GB = 10**9
T0 = 1_795_000_020_000  # a window start (divisible by 60 000)
BOOK = parse_price_book(
    "default_price_per_hour: 1.80\n"
    "prices:\n"
    "  - {gpu_model: Test GPU, pricing: on_demand, price_per_hour: 3.60}\n"
    "  - {gpu_model: Test GPU, pricing: spot, price_per_hour: 1.44}\n"
    "pricing_from_node_labels:\n"
    "  karpenter.sh/capacity-type: {spot: spot}\n"
)
PODS = {
    "pod-a": PodInfo(
        "c1",
        "pod-a",
        "search",
        "vllm-a",
        "n1",
        {"team": "search", "product": "assistant"},
        {"cost-center": "CC-1"},
    ),
    "pod-b": PodInfo("c1", "pod-b", "ads", "tgi-b", "n1", {}, {"team": "ads"}),
}


def sample(
    processes: list[tuple[str | None, float, float | None]],
    *,
    event_id: str = "s1",
    time_ms: int = T0,
    interval_s: float = 60.0,
    mem_total_bytes: int = 80 * GB,
    device: str = "GPU-1",
    mig: tuple[str, int] | None = None,
    labels: dict[str, str] | None = None,
) -> CloudEvent[GpuSample]:
    """processes: (pod uid or None for a host process, memory GB, SM %)."""
    procs = tuple(
        ProcessSample(100 + i, uid, None, int(mem_gb * GB), sm)
        for i, (uid, mem_gb, sm) in enumerate(processes)
    )
    used = min(sum(p.mem_used_bytes for p in procs), mem_total_bytes)
    data = GpuSample(
        cluster="c1",
        node="n1",
        device_uuid=device,
        gpu_uuid="GPU-1",
        gpu_model="Test GPU",
        mig_profile=mig[0] if mig else None,
        mig_slices=mig[1] if mig else None,
        gpu_slices=7,
        interval_s=interval_s,
        mem_total_bytes=mem_total_bytes,
        mem_used_bytes=used,
        sm_util_pct=50.0,
        node_labels=labels or {},
        processes=procs,
    )
    return make_event(data, event_id=event_id, source="test", time_ms=time_ms)


def rows_for(
    events: list[CloudEvent[GpuSample]],
    cfg: AllocationSettings | None = None,
    pods: dict[str, PodInfo] | None = None,
    pricer: Pricer | None = None,
) -> list[CostRow]:
    """What the worker computes: each sample priced (`Pricer`) and folded into its window."""
    cfg = cfg or AllocationSettings()
    lookup = (pods if pods is not None else PODS).get
    windows: dict[tuple[int, str], DeviceWindow] = {}
    pricer = pricer or Pricer(BOOK)
    for ev in events:
        start = window_of(ev.time_ms, cfg.window_s)
        fold(windows.setdefault((start, ev.data.device_uuid), DeviceWindow(start)), ev, pricer, cfg)
    out: list[CostRow] = []
    for key in sorted(windows):
        out += finalize_device_window(windows[key], lookup, cfg, version=1)
    return out


def by_owner(rows: list[CostRow]) -> dict[str, CostRow]:
    return {r.pod_uid: r for r in rows}


# ------------------------------------------------------------------ worked examples


def test_tagged_pod_host_process_and_platform_idle() -> None:
    # pod-a: 20/80 GB = 0.25 memory, 10 % SM -> dominant 0.25 -> 0.015 USD
    # host:   4/80 GB = 0.05, SM unknown (null = 0) -> 0.05 -> 0.003 USD
    # idle:  0.06 - 0.018 = 0.042 USD, to the platform team
    rows = by_owner(rows_for([sample([("pod-a", 20, 10.0), (None, 4, None)])]))
    assert rows["pod-a"].cost_usd == Decimal("0.015")
    assert (rows["pod-a"].team, rows["pod-a"].product, rows["pod-a"].cost_center) == (
        "search",
        "assistant",
        "CC-1",
    )
    assert rows["pod-a"].device_seconds == pytest.approx(15.0)
    assert rows["__host__"].cost_usd == Decimal("0.003")
    assert (rows["__host__"].kind, rows["__host__"].team) == ("host", "__host__")
    assert rows["__idle__"].cost_usd == Decimal("0.042")
    assert (rows["__idle__"].kind, rows["__idle__"].team) == ("idle", "platform")
    assert rows["__idle__"].device_seconds == pytest.approx(42.0)
    assert sum(r.cost_usd for r in rows.values()) == Decimal("0.06")


def test_oversubscribed_shares_are_normalised() -> None:
    # pod-a: max(40/80, 0.30) = 0.5; pod-b: max(8/80, 0.60) = 0.6; A = 1.1 > 1
    # -> 0.5/1.1 and 0.6/1.1 of 0.06 USD = 0.027272.. and 0.032727.., idle 0
    rows = by_owner(rows_for([sample([("pod-a", 40, 30.0), ("pod-b", 8, 60.0)])]))
    assert rows["pod-a"].cost_usd == Decimal("0.027272727272727")
    assert rows["pod-b"].cost_usd == Decimal("0.032727272727273")
    assert rows["__idle__"].cost_usd == Decimal(0)
    # pod-b has no team label of its own: its namespace's label applies.
    assert rows["pod-b"].team == "ads"
    assert rows["pod-b"].product == "__untagged__"


def test_mig_1g_10gb_instance() -> None:
    # 1 of 7 slices of a 3.60 USD/h GPU = 0.514285.. USD/h; 60 s -> 0.008571428571429 USD.
    # pod-a uses 5 of the instance's 10 GB -> half: 0.004285714285714 (half-even), idle the rest
    ev = sample(
        [("pod-a", 5, None)], mem_total_bytes=10 * GB, mig=("1g.10gb", 1), device="MIG-aaaa"
    )
    rows = by_owner(rows_for([ev]))
    assert rows["pod-a"].cost_usd == Decimal("0.004285714285714")
    assert rows["__idle__"].cost_usd == Decimal("0.004285714285715")
    assert rows["pod-a"].price_per_hour == Decimal("0.514285714285714")
    assert rows["pod-a"].mig_profile == "1g.10gb"
    assert rows["pod-a"].device_uuid == "MIG-aaaa"
    assert rows["pod-a"].gpu_uuid == "GPU-1"


def test_untagged_pod_without_metadata() -> None:
    rows = by_owner(rows_for([sample([("pod-zz", 8, 90.0)])]))
    assert rows["pod-zz"].cost_usd == Decimal("0.054")
    assert (rows["pod-zz"].team, rows["pod-zz"].product, rows["pod-zz"].cost_center) == (
        "__untagged__",
        "__untagged__",
        "__untagged__",
    )
    assert rows["pod-zz"].kind == "usage"


def test_spot_node_uses_spot_price() -> None:
    rows = rows_for([sample([], labels={"karpenter.sh/capacity-type": "spot"})])
    assert rows[0].pricing == "spot"
    assert rows[0].cost_usd == Decimal("0.024")  # 1.44 USD/h for 60 s


@pytest.mark.parametrize(
    ("policy", "expected_a", "expected_b"),
    # pod-a 10/80 GB -> 0.0075 USD, pod-b 40/80 GB -> 0.03 USD: idle 0.0225 USD, split
    # 1:4 by cost (proportional) or 1:1 (even)
    [
        ("platform", "0.0075", "0.03"),
        ("proportional", "0.012", "0.048"),
        ("even", "0.01875", "0.04125"),
    ],
)
def test_idle_policies(policy: str, expected_a: str, expected_b: str) -> None:
    cfg = AllocationSettings(idle_policy=policy)
    rows = by_owner(rows_for([sample([("pod-a", 10, None), ("pod-b", 40, None)])], cfg))
    assert rows["pod-a"].cost_usd == Decimal(expected_a)
    assert rows["pod-b"].cost_usd == Decimal(expected_b)
    total = sum(r.cost_usd for r in rows.values())
    assert total == Decimal("0.06")
    assert rows["__idle__"].cost_usd == (Decimal("0.0225") if policy == "platform" else 0)
    assert rows["pod-a"].idle_cost_usd == Decimal(expected_a) - Decimal("0.0075")


def test_proportional_idle_stays_idle_without_pods() -> None:
    cfg = AllocationSettings(idle_policy="proportional")
    rows = by_owner(rows_for([sample([(None, 8, None)])], cfg))
    assert rows["__idle__"].cost_usd == Decimal("0.054")
    assert rows["__host__"].idle_cost_usd == 0


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("dominant", [0.5, 0.3]),
        ("memory", [0.5, 0.1]),
        ("sm", [0.2, 0.3]),
        ("weighted", [0.35, 0.2]),
    ],
)
def test_share_policies(policy: str, expected: list[float]) -> None:
    procs = [ProcessSample(1, "a", None, 40 * GB, 20.0), ProcessSample(2, "b", None, 8 * GB, 30.0)]
    shares = process_shares(procs, 80 * GB, AllocationSettings(share_policy=policy))
    assert shares == pytest.approx(expected)


def test_samples_land_in_epoch_aligned_windows() -> None:
    assert window_of(T0, 60) == T0
    assert window_of(T0 + 59_999, 60) == T0
    assert window_of(T0 + 60_000, 60) == T0 + 60_000
    assert window_of(T0 - 1, 60) == T0 - 60_000
    assert window_of(3_599_999, 3600) == 0


def test_sample_cost() -> None:
    assert sample_cost_usd(Decimal("3.60"), 60.0) == Decimal("0.06")
    assert sample_cost_usd(Decimal("4.00"), 1.0) == Decimal("0.001111111111111")


def test_labels_come_from_pod_then_namespace_then_untagged() -> None:
    settings = LabelSettings(team_key="owner")
    pod = PodInfo("c", "u", "ns", "p", "n", {"owner": "ml"}, {"owner": "web", "product": "chat"})
    assert resolve_owner("u", {"u": pod}.get, settings)[2:4] == ("ml", "chat")
    bare = PodInfo("c", "u", "ns", "p", "n", {}, {})
    assert resolve_owner("u", {"u": bare}.get, settings)[2:] == ("__untagged__",) * 3


def test_pod_metadata_as_of_window_end() -> None:
    history = PodHistory()
    old = PodInfo("c", "u", "ns", "p", "n", {"team": "a"}, {})
    new = PodInfo("c", "u", "ns", "p", "n", {"team": "b"}, {})
    assert history.add("e1", 1000, old)
    assert history.add("e2", 5000, new)
    assert not history.add("e2", 5000, new)
    assert history.as_of("u", 999) == old  # none that early: the earliest applies
    assert history.as_of("u", 4999) == old
    assert history.as_of("u", 5000) == new
    assert history.count_as_of(["u", "u"], 4999) == 2  # a version input: every event counts


def test_split_exact_adds_up() -> None:
    parts = split_exact(
        Decimal("0.000000000000010"),
        [("a", Decimal(1))] * 1 + [("b", Decimal(1)), ("c", Decimal(1))],
    )
    assert sum(parts.values()) == Decimal("1E-14")
    assert sorted(parts.values()) == [Decimal("3E-15"), Decimal("3E-15"), Decimal("4E-15")]


# ------------------------------------------------------------------ properties

process_strategy = st.tuples(
    st.sampled_from(["pod-a", "pod-b", "pod-c", None]),
    st.floats(min_value=0, max_value=80, allow_nan=False),
    st.none() | st.floats(min_value=0, max_value=100, allow_nan=False),
)
sample_strategy = st.tuples(
    st.lists(process_strategy, max_size=5),
    st.integers(min_value=0, max_value=179_999),  # offset within three windows
    st.floats(min_value=0.001, max_value=120, allow_nan=False),
    st.sampled_from(["GPU-1", "GPU-2", "MIG-1"]),
)


def build_events(specs: list[Any]) -> list[CloudEvent[GpuSample]]:
    events = []
    for i, (procs, offset, interval, device) in enumerate(specs):
        mig = ("3g.40gb", 3) if device == "MIG-1" else None
        events.append(
            sample(
                procs,
                event_id=f"e{i}",
                time_ms=T0 + offset,
                interval_s=interval,
                device=device,
                mig=mig,
            )
        )
    return events


policy_strategy = st.builds(
    AllocationSettings,
    share_policy=st.sampled_from(SHARE_POLICIES),
    sm_weight=st.floats(min_value=0, max_value=1),
    idle_policy=st.sampled_from(IDLE_POLICIES),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(sample_strategy, min_size=1, max_size=25), policy_strategy)
def test_cost_out_equals_cost_in_per_window(specs: list[Any], cfg: AllocationSettings) -> None:
    events = build_events(specs)
    rows = rows_for(events, cfg)
    cost_in: dict[int, Decimal] = {}
    for ev in events:
        start = window_of(ev.time_ms, cfg.window_s)
        price = BOOK.quote("Test GPU", "on_demand", ev.time_ms).price_per_hour_usd
        if ev.data.mig_slices:
            price = price * ev.data.mig_slices / ev.data.gpu_slices
        cost_in[start] = cost_in.get(start, Decimal(0)) + (
            price * Decimal(repr(ev.data.interval_s)) / 3600
        )
    cost_out: dict[int, Decimal] = {}
    for r in rows:
        cost_out[r.window_start_ms] = cost_out.get(r.window_start_ms, Decimal(0)) + r.cost_usd
        assert r.cost_usd >= 0
        assert 0 <= r.idle_cost_usd <= r.cost_usd
    assert cost_out.keys() == cost_in.keys()
    for start, expected in cost_in.items():
        assert abs(cost_out[start] - expected) <= expected * Decimal("1e-9")


@given(st.lists(process_strategy, max_size=8), policy_strategy)
def test_allocated_shares_never_exceed_one(procs: list[Any], cfg: AllocationSettings) -> None:
    samples = [ProcessSample(i, uid, None, int(m * GB), sm) for i, (uid, m, sm) in enumerate(procs)]
    shares = process_shares(samples, 80 * GB, cfg)
    assert all(0 <= a <= 1 for a in shares)
    assert sum(shares) <= 1 + 1e-12


@settings(max_examples=100, deadline=None)
@given(st.lists(sample_strategy, min_size=1, max_size=20), policy_strategy, st.randoms())
def test_rows_do_not_depend_on_sample_order(
    specs: list[Any], cfg: AllocationSettings, rnd: random.Random
) -> None:
    events = build_events(specs)
    shuffled = list(events)
    rnd.shuffle(shuffled)
    assert rows_for(shuffled, cfg) == rows_for(events, cfg)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(sample_strategy, min_size=1, max_size=20),
    policy_strategy,
    st.lists(st.integers(min_value=0, max_value=19), max_size=10),
)
def test_duplicate_sample_ids_change_nothing(
    specs: list[Any], cfg: AllocationSettings, repeats: list[int]
) -> None:
    events = build_events(specs)
    replayed = events + [events[i % len(events)] for i in repeats]
    assert rows_for(replayed, cfg) == rows_for(events, cfg)


def test_price_book_type() -> None:
    assert isinstance(BOOK, PriceBook)


@settings(max_examples=150, deadline=None)
@given(st.lists(sample_strategy, min_size=1, max_size=25), policy_strategy)
def test_remembered_prices_change_no_row(specs: list[Any], cfg: AllocationSettings) -> None:
    events = build_events(specs)
    warm = Pricer(BOOK)
    for ev in events:  # every price and cost of these samples now remembered
        warm.price(ev.data, ev.time_ms)
    assert rows_for(events, cfg, pricer=warm) == rows_for(events, cfg)


def test_a_remembered_price_ends_where_the_book_changes_it() -> None:
    book = parse_price_book(
        "default_price_per_hour: 1.00\n"
        "prices:\n"
        "  - {gpu_model: Test GPU, pricing: on_demand, price_per_hour: 3.60}\n"
        "  - {gpu_model: Test GPU, pricing: on_demand, price_per_hour: 7.20,"
        " effective_from: 2026-11-19}\n"
    )
    pricer = Pricer(book)
    before = sample([("pod-a", 8, 10.0)], time_ms=1_795_046_399_999, interval_s=1.0)
    after = sample([("pod-a", 8, 10.0)], time_ms=1_795_046_400_000, interval_s=1.0)
    assert pricer.price(before.data, before.time_ms)[0].price_per_hour_usd == Decimal("3.60")
    assert pricer.price(after.data, after.time_ms)[0].price_per_hour_usd == Decimal("7.20")
    assert pricer.price(before.data, before.time_ms)[1] == 10**15 // 1000  # 0.001 USD

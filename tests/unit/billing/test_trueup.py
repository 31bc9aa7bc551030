"""The true-up: every bill dollar of a metered GPU node lands on a metered row, a non-GPU part
or the unmetered line, exactly; the result ignores input order; restated charges reach only
the hours the importer recomputes."""

from __future__ import annotations

import random
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.billing.slices import KIND_NON_GPU, KIND_UNMETERED
from streams.billing.trueup import (
    HOUR_MS,
    Charge,
    MeteredRow,
    NodeIdentity,
    NonGpuRule,
    affected_hours,
    true_up,
)

T0 = 1_793_491_200_000  # 2026-11-01T00:00:00Z
NODES = (
    NodeIdentity(
        "c1",
        "n1",
        "aws:///us-east-1a/i-00000000000000001",
        0,
        "p5.48xlarge",
        8,
        192_000,
        2048 * 2**30,
    ),
    NodeIdentity(
        "c1",
        "n2",
        "aws:///us-east-1a/i-00000000000000002",
        0,
        "g6e.12xlarge",
        4,
        48_000,
        384 * 2**30,
    ),
)
KEYS = ("aws:i-00000000000000001", "aws:i-00000000000000002")


def metered(
    node: str, hour: int, pod: str, kind: str, cost: str, secs: float = 1800.0
) -> MeteredRow:
    return MeteredRow(
        T0 + hour * HOUR_MS,
        "c1",
        node,
        f"{node}-gpu0",
        "NVIDIA H100 80GB HBM3",
        "",
        "on_demand",
        Decimal("4"),
        "ns",
        pod,
        pod,
        "team-" + pod,
        "p",
        "cc",
        kind,
        secs,
        Decimal(cost),
    )


def charge(
    key: str, hour: int, effective: str, billed: str = "0", hours: int = 1, gpu: bool = True
) -> Charge:
    return Charge(
        key,
        T0 + hour * HOUR_MS,
        T0 + (hour + hours) * HOUR_MS,
        "p5.48xlarge",
        gpu,
        Decimal(effective),
        Decimal(billed),
        "USD",
    )


def total(rows: list, key: str | None = None) -> tuple[Decimal, Decimal]:  # type: ignore[type-arg]
    picked = [r for r in rows if key is None or r.resource_key == key]
    return (
        sum((r.effective_cost for r in picked), Decimal(0)),
        sum((r.billed_cost for r in picked), Decimal(0)),
    )


def test_a_node_hour_split_by_metered_cost_adds_up_to_the_bill_line() -> None:
    rows = [
        metered("n1", 0, "a", "usage", "3.000000000000001"),
        metered("n1", 0, "b", "usage", "1"),
        metered("n1", 0, "__idle__", "idle", "28"),
    ]
    out = true_up([charge(KEYS[0], 0, "70.123456789", "98.3")], rows, NODES, NonGpuRule())
    assert total(out) == (Decimal("70.123456789"), Decimal("98.3"))
    shares = {r.dims[9]: r.effective_cost for r in out}
    assert shares["__idle__"] > shares["a"] > shares["b"] > 0
    assert all(r.effective_cost == r.effective_cost.quantize(Decimal("1e-15")) for r in out)


def test_a_daily_line_spreads_over_the_hours_of_its_metering() -> None:
    rows = [metered("n1", h, "a", "usage", "4") for h in range(24)]
    out = true_up([charge(KEYS[0], 0, "100", hours=24)], rows, NODES, NonGpuRule())
    assert len(out) == 24 and total(out)[0] == Decimal(100)
    assert {r.hour_ms for r in out} == {T0 + h * HOUR_MS for h in range(24)}


def test_unmetered_gpu_instance_and_unmetered_hour_of_a_known_node() -> None:
    out = true_up(
        [
            charge("aws:i-0ffffffffffffffff", 0, "55"),
            charge(KEYS[1], 3, "9"),
            charge("vol-0abc", 0, "1", gpu=False),
        ],
        [metered("n2", 0, "a", "usage", "1")],
        NODES,
        NonGpuRule(),
    )
    assert [(r.resource_key, r.kind, r.dims[1]) for r in out] == [
        ("aws:i-0ffffffffffffffff", KIND_UNMETERED, ""),
        (KEYS[1], KIND_UNMETERED, "n2"),
    ]
    assert total(out)[0] == Decimal(64)


def test_weights_rule_keeps_the_non_gpu_part_off_the_gpu_users() -> None:
    rows = [metered("n1", 0, "a", "usage", "30")]
    out = true_up([charge(KEYS[0], 0, "100")], rows, NODES, NonGpuRule("weights"))
    non_gpu = [r for r in out if r.kind == KIND_NON_GPU]
    gpu = [r for r in out if r.kind != KIND_NON_GPU]
    # 8 GPUs * 0.95 against 192 vCPUs * 0.031611 + 2048 GiB * 0.004237: 7.6 / 22.346688.
    assert gpu[0].effective_cost == (Decimal(100) * Decimal("7.6") / Decimal("22.346688")).quantize(
        Decimal("1e-15")
    )
    assert gpu[0].effective_cost == Decimal("34.009514072062938")
    assert non_gpu[0].effective_cost + gpu[0].effective_cost == Decimal(100)


def test_a_node_renamed_to_another_instance_is_billed_by_the_instance_of_each_hour() -> None:
    moved = (
        *NODES,
        NodeIdentity("c1", "n1", "aws:///us-east-1a/i-00000000000000009", T0 + 2 * HOUR_MS),
    )
    rows = [metered("n1", h, "a", "usage", "4") for h in range(4)]
    out = true_up([charge(KEYS[0], 0, "40", hours=4)], rows, moved, NonGpuRule())
    assert {r.hour_ms for r in out} == {T0, T0 + HOUR_MS}
    assert total(out)[0] == Decimal(40)


_amount = st.decimals(min_value=Decimal("-50"), max_value=Decimal("500"), places=10)
_cost = st.decimals(min_value=Decimal(0), max_value=Decimal("40"), places=15)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(KEYS), st.integers(0, 5), _amount, _amount, st.integers(1, 3)),
        min_size=1,
        max_size=8,
    ),
    st.lists(
        st.tuples(
            st.sampled_from(("n1", "n2")),
            st.integers(0, 7),
            st.sampled_from(("a", "b", "__idle__")),
            _cost,
        ),
        max_size=30,
    ),
    st.sampled_from(("whole", "weights")),
    st.randoms(use_true_random=False),
)
def test_conservation_and_order_independence(
    bill: list,
    meter: list,
    mode: str,
    rnd: random.Random,  # type: ignore[type-arg]
) -> None:
    charges = [charge(k, h, str(e), str(b), hours=n) for k, h, e, b, n in bill]
    rows = list(
        {
            (n, h, p): metered(n, h, p, "idle" if p == "__idle__" else "usage", str(c))
            for n, h, p, c in meter
        }.values()
    )
    out = true_up(charges, rows, NODES, NonGpuRule(mode))
    for key in KEYS:
        want = [c for c in charges if c.resource_key == key]
        assert total(out, key) == (
            sum((c.effective_cost for c in want), Decimal(0)),
            sum((c.billed_cost for c in want), Decimal(0)),
        )
    rnd.shuffle(charges)
    rnd.shuffle(rows)
    assert true_up(charges, rows, list(reversed(NODES)), NonGpuRule(mode)) == out


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(KEYS), st.integers(0, 30), st.integers(1, 24), _amount),
        min_size=1,
        max_size=10,
        unique_by=lambda t: (t[0], t[1], t[2]),
    ),
    st.data(),
)
def test_restated_charges_change_no_row_outside_the_affected_hours(
    bill: list, data: st.DataObject
) -> None:  # type: ignore[type-arg]
    old = [charge(k, h, str(e), hours=n) for k, h, n, e in bill]
    changed_at = data.draw(st.integers(0, len(old) - 1))
    new = list(old)
    new[changed_at] = charge(
        old[changed_at].resource_key,
        (old[changed_at].start_ms - T0) // HOUR_MS,
        "7.5",
        hours=(old[changed_at].end_ms - old[changed_at].start_ms) // HOUR_MS,
    )
    rows = [metered(n, h, "a", "usage", "1") for n in ("n1", "n2") for h in range(60)]
    hours = affected_hours(old, new)
    before = [r for r in true_up(old, rows, NODES, NonGpuRule()) if r.hour_ms not in hours]
    after_all = true_up(new, rows, NODES, NonGpuRule())
    outside = [r for r in after_all if r.hour_ms not in hours]
    assert outside == before
    touching = [c for c in new if any(h in hours for h in range(c.start_ms, c.end_ms, HOUR_MS))]
    inside_only = [r for r in true_up(touching, rows, NODES, NonGpuRule()) if r.hour_ms in hours]
    assert [r for r in after_all if r.hour_ms in hours] == inside_only
    assert hours == {h for c in set(old) ^ set(new) for h in range(c.start_ms, c.end_ms, HOUR_MS)}


def test_two_charges_of_one_resource_count_its_metered_rows_once() -> None:
    rows = [metered("n1", 5, "a", "usage", "3", 1800.0), metered("n1", 5, "b", "usage", "1")]
    usage = charge(KEYS[0], 5, "40")
    transfer = charge(KEYS[0], 0, "24", hours=24)  # a daily data-transfer line
    out = true_up([usage, transfer], rows, NODES, NonGpuRule())
    assert [r.device_seconds for r in out] == [1800.0, 1800.0]
    assert [r.metered_cost_usd for r in out] == [Decimal(3), Decimal(1)]
    assert total(out)[0] == Decimal(64)


def test_an_unmetered_daily_line_is_spread_over_its_hours() -> None:
    out = true_up([charge("aws:i-0ffffffffffffffff", 0, "100", hours=24)], [], NODES, NonGpuRule())
    assert [r.hour_ms for r in out] == [T0 + h * HOUR_MS for h in range(24)]
    assert total(out)[0] == Decimal(100)
    assert {r.effective_cost for r in out} == {
        Decimal(100) / 24 // Decimal("1e-15") * Decimal("1e-15"),
        Decimal(100) / 24 // Decimal("1e-15") * Decimal("1e-15") + Decimal("1e-15"),
    }

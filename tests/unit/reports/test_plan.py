"""The pure core of `gpuledger plan` on hand-made rows whose answers are worked out by hand."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.errors import ConfigError
from streams.reports.plan import (
    HOURS_PER_MONTH,
    Measured,
    PodDeviceHour,
    PodModelHour,
    cheapest,
    coefficient_of_variation,
    cost_per_1m_at,
    devices_needed,
    grade,
    measure,
    parse_growth,
    parse_tokens_per_s,
    plan_options,
)

H = 3_600_000
H100, A10 = "NVIDIA H100 80GB HBM3", "NVIDIA A10G"


def dev(
    hour: int,
    pod: str,
    used_s: float,
    cost: str,
    *,
    gpu: str = H100,
    mig: str = "",
    pricing: str = "on_demand",
    price: str = "4",
    metered_s: float = 3600.0,
    device_used_s: float | None = None,
    sm_pct: float = 50.0,
    device: str = "d1",
) -> PodDeviceHour:
    return PodDeviceHour(
        hour * H,
        pod,
        device,
        gpu,
        mig,
        pricing,
        Decimal(price),
        used_s,
        Decimal(cost),
        sm_pct * 3600.0,
        3600.0,
        metered_s,
        used_s if device_used_s is None else device_used_s,
    )


def tok(
    hour: int, pod: str, model: str, cost: str, prompt: int, completion: int, cached: int = 0
) -> PodModelHour:
    return PodModelHour(hour * H, pod, model, Decimal(cost), prompt, completion, cached)


def test_one_pod_alone_on_a_gpu() -> None:
    # used 0.9 of the hour; the idle tenth was paid for too: 3,600 device-seconds, 1,000/s
    rows = [dev(0, "p", 3240.0, "4")]
    tokens = [tok(0, "p", "m", "4", 2_700_000, 900_000, 270_000)]
    (m,), unplaced = measure("m", rows, tokens)
    assert unplaced == 0
    assert m.device_s == 3600 and m.used_s == 3240 and m.busy_share == pytest.approx(0.9)
    assert m.tokens_per_device_s == 1000
    assert (m.prompt_tokens, m.completion_tokens, m.cached_tokens) == (2_700_000, 900_000, 270_000)
    assert m.sm_util_pct == 50.0
    (option,) = plan_options([m], Fraction(2500))
    assert option.devices == 3  # 2,500 / 1,000 -> 3 whole GPUs
    assert option.monthly_cost_usd == Decimal(3 * 4 * 730)  # 8,760
    # 8,760 USD over 2,500 x 730 x 3,600 tokens, per 1M
    assert option.cost_per_1m_tokens_usd == Decimal("1.333333")
    # a GPU busy at 1,000/s: 4 USD per 3.6M tokens
    assert option.measured_cost_per_1m_tokens_usd == Decimal("1.111111")


def test_a_pods_time_splits_over_its_models_by_cost_share() -> None:
    rows = [dev(0, "p", 3600.0, "4")]
    tokens = [tok(0, "p", "m", "3", 1_080_000, 0), tok(0, "p", "other", "1", 5, 0)]
    (m,), _ = measure("m", rows, tokens)
    assert m.device_s == pytest.approx(2700)  # 3/4 of the hour
    assert m.tokens_per_device_s == pytest.approx(400)


def test_claims_over_the_pod_cost_are_scaled_down() -> None:
    # a corrected window: the token rows claim 6 USD of a pod that cost 4; m takes 4/6
    rows = [dev(0, "p", 3600.0, "4")]
    tokens = [tok(0, "p", "m", "4", 100, 0), tok(0, "p", "other", "2", 100, 0)]
    (m,), _ = measure("m", rows, tokens)
    assert m.device_s == pytest.approx(3600 * 4 / 6)


def test_a_free_pod_splits_by_tokens() -> None:
    rows = [dev(0, "p", 3600.0, "0", price="0")]
    tokens = [tok(0, "p", "m", "0", 300, 0), tok(0, "p", "other", "0", 100, 0)]
    (m,), _ = measure("m", rows, tokens)
    assert m.device_s == pytest.approx(2700)


def test_shared_device_spreads_idle_by_use_and_tokens_by_device_time() -> None:
    # d1: the pod used 1,200 s, another pod 1,200 s, 1,200 s idle: the pod holds 1,800 s.
    # d2 (an A10, MIG-less, spot): the pod alone, 600 s used of 900 metered: holds 900 s.
    rows = [
        dev(0, "p", 1200.0, "1", device_used_s=2400.0),
        dev(0, "p", 600.0, "1", gpu=A10, pricing="spot", metered_s=900.0, device="d2"),
    ]
    tokens = [tok(0, "p", "m", "2", 2_700_000, 0)]
    measured, _ = measure("m", rows, tokens)
    by = {m.device: m for m in measured}
    h100, a10 = by[(H100, "", "on_demand")], by[(A10, "", "spot")]
    assert h100.device_s == pytest.approx(1800) and a10.device_s == pytest.approx(900)
    # 2.7M tokens over 2,700 device-seconds: 1,000/s on each
    assert h100.tokens_per_device_s == pytest.approx(1000)
    assert a10.tokens_per_device_s == pytest.approx(1000)
    assert measured[0] is h100  # most device time first


def test_tokens_with_no_device_time_are_counted_apart() -> None:
    measured, unplaced = measure("m", [], [tok(0, "p", "m", "1", 10, 5)])
    assert measured == [] and unplaced == 15


def test_hourly_series_price_and_cv() -> None:
    rows = [dev(0, "p", 3600.0, "4"), dev(1, "p", 3600.0, "5", price="5")]
    tokens = [tok(0, "p", "m", "4", 3_600_000, 0), tok(1, "p", "m", "5", 7_200_000, 0)]
    (m,), _ = measure("m", rows, tokens)
    assert m.hourly_tokens_per_s == (1000, 2000)
    assert m.tokens_per_device_s == 1500  # a ratio of sums, not a mean of ratios
    assert m.price_per_hour_usd == Decimal(5) and m.price_hour_ms == H  # the latest hour's
    assert coefficient_of_variation(m.hourly_tokens_per_s) == pytest.approx(1 / 3)
    assert coefficient_of_variation([5.0]) is None


@pytest.mark.parametrize(
    ("device_hours", "hours", "cv", "expected"),
    [
        (9.9, 50, 0.0, "thin: under 10 device-hours"),
        (50, 2, 0.0, "thin: under 3 distinct hours"),
        (50, 30, 0.0, "fair: under 100 device-hours"),
        (150, 10, 0.0, "fair: under 24 distinct hours"),
        (150, 30, 0.3, "fair: hourly throughput varies (CV over 0.25)"),
        (150, 30, 0.25, "solid: 100+ device-hours over 24+ hours, CV at most 0.25"),
    ],
)
def test_grades(device_hours: float, hours: int, cv: float, expected: str) -> None:
    level, reason = grade(device_hours, hours, cv)
    assert reason == expected and reason.startswith(level)


def test_target_parsing() -> None:
    assert parse_growth("3x") == parse_growth("3") == parse_growth("300%") == Fraction(3)
    assert parse_growth(" 1.5X ") == Fraction(3, 2)
    assert parse_tokens_per_s("2500.5") == Fraction(5001, 2)
    for bad in ("0", "-2", "x", "3xx", "1e3", "", "nan"):
        with pytest.raises(ConfigError, match="--growth"):
            parse_growth(bad)
        with pytest.raises(ConfigError, match="--tokens-per-s"):
            parse_tokens_per_s(bad)


def test_cost_per_1m_at() -> None:
    # 730 USD a month at 1 token/s: 2,628,000 tokens
    assert cost_per_1m_at(Decimal(730), Fraction(1)) == Decimal("277.777778")
    assert HOURS_PER_MONTH == 730


rates = st.floats(min_value=1e-3, max_value=1e7, allow_nan=False, allow_infinity=False)
targets = st.fractions(min_value=Fraction(1, 1000), max_value=10**9)


@given(targets, rates)
def test_devices_needed_is_the_fewest_that_reach_the_target(
    target: Fraction, throughput: float
) -> None:
    n = devices_needed(target, throughput)
    assert n * Fraction(throughput) >= target
    assert (n - 1) * Fraction(throughput) < target


def _measured(device: str, throughput: float, price: Decimal) -> Measured:
    return Measured(
        (device, "", "on_demand"), price, 0, 3600.0, 3600.0, throughput * 3600, 0.0, 0.0, 50.0, ()
    )


@given(
    st.lists(
        st.tuples(rates, st.decimals(min_value=0, max_value=100, places=3)),
        min_size=1,
        max_size=6,
    ),
    targets,
)
def test_cheapest_fit_is_the_minimum(types: list[tuple[float, Decimal]], target: Fraction) -> None:
    measured = [_measured(f"gpu-{i}", t, p) for i, (t, p) in enumerate(types)]
    options = plan_options(measured, target)
    best = cheapest(options)
    assert best is not None and best is options[0]
    assert best.monthly_cost_usd == min(o.monthly_cost_usd for o in options)
    for o in options:
        assert o.monthly_cost_usd == o.devices * o.price_per_hour_usd * HOURS_PER_MONTH


def test_a_pod_on_two_gpus_is_counted_per_device() -> None:
    # tensor parallel: one pod on two H100s for the hour, 7.2M tokens: 1,000/s per GPU
    rows = [dev(0, "p", 3600.0, "4"), dev(0, "p", 3600.0, "4", device="d2")]
    (m,), _ = measure("m", rows, [tok(0, "p", "m", "8", 7_200_000, 0)])
    assert m.device_s == 7200 and m.tokens_per_device_s == 1000 and m.devices_per_pod == 2
    (option,) = plan_options([m], Fraction(2500))
    assert option.devices == 3  # whole devices; the report adds that pods of 2 take 4

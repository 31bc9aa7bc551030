"""The C fold (streams/_fold.c) against the Python reference, `DeviceWindow.add_sample`.

Both are driven with the same samples, including ones outside the C fast path (other types,
huge integers, many processes: the C code hands those to the Python method), and must leave
windows identical to the last bit and raise the same errors."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import GpuSample, ProcessSample
from streams.allocation import (
    SHARE_POLICIES,
    AllocationSettings,
    DevicePrice,
    DeviceWindow,
    native_fold,
    sample_folder,
)

PRICE = DevicePrice(price_per_hour_usd=2, pricing="on_demand", known_model=True)  # type: ignore[arg-type]


def test_the_install_built_the_c_fold() -> None:
    # Without it every other test here compares the Python method with itself.
    assert native_fold()


def window_state(window: DeviceWindow) -> tuple[Any, ...]:
    return (
        sorted(window.sample_ids),
        window.cost_fusd,
        window.idle_fusd,
        window.interval_ns,
        window.sm_pct_us,
        window.mem_byte_seconds,
        list(window.owners.items()),  # insertion order too
        window.first_key,
        id(window.first_sample),
        id(window.first_price),
    )


mem = st.integers(0, 2**50) | st.integers(2**50, 2**60) | st.sampled_from([0, 2**53, 2**53 + 1])
pct = (
    st.none()
    | st.floats(0, 100)
    | st.sampled_from([-0.0, 0.0, 100.0, 150.0, -5.0])
    | st.integers(0, 100)
)
uid = st.none() | st.sampled_from(["pod-a", "pod-b", "pod-c", "", "pod-aa"])
process = st.builds(ProcessSample, st.integers(0, 9), uid, st.none(), mem, pct)
interval = st.floats(0.001, 3600) | st.sampled_from([1.0, 0.5, 2.5, 1e-9]) | st.integers(1, 60)
sample_st = st.builds(
    GpuSample,
    cluster=st.just("c"),
    node=st.just("n"),
    device_uuid=st.just("GPU-1"),
    gpu_uuid=st.just("GPU-1"),
    gpu_model=st.just("m"),
    mig_profile=st.none(),
    mig_slices=st.none(),
    gpu_slices=st.just(7),
    interval_s=interval,
    mem_total_bytes=st.integers(1, 2**50) | st.sampled_from([80 * 10**9, 2**53, 2**54]),
    mem_used_bytes=mem,
    sm_util_pct=pct,
    node_labels=st.just({}),
    processes=st.lists(process, max_size=6).map(tuple)
    | st.just(tuple([]))
    | st.lists(process, min_size=65, max_size=70).map(tuple),
)
cost = (
    st.integers(0, 10**14)
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, -1, 2**63 - 1, 2**63])
)
step = st.tuples(
    st.sampled_from(["e1", "e2", "e3", "e4", "e5"]),  # repeats are duplicates
    st.integers(0, 5) | st.integers(-(2**70), 2**70),
    sample_st,
    cost,
)
policy_st = st.builds(
    AllocationSettings,
    share_policy=st.sampled_from(SHARE_POLICIES),
    sm_weight=st.floats(0, 1) | st.sampled_from([0.0, 0.5, 1.0, 1 / 3]),
)


def run(fold: Any, steps: list[Any]) -> tuple[list[Any], DeviceWindow]:
    window = DeviceWindow(0)
    answers: list[Any] = []
    for event_id, time_ms, sample, cost_fusd in steps:
        try:
            answers.append(fold(window, event_id, time_ms, sample, PRICE, cost_fusd))
        except Exception as exc:  # the reference's errors are part of its behaviour
            answers.append(type(exc))
            break
    return answers, window


@pytest.mark.skipif(not native_fold(), reason="the C fold was not built")
@settings(max_examples=200, deadline=None)
@given(st.lists(step, min_size=1, max_size=12), policy_st)
def test_c_fold_equals_the_python_method(steps: list[Any], cfg: AllocationSettings) -> None:
    python_answers, python_window = run(sample_folder(cfg, native=False), steps)
    c_answers, c_window = run(sample_folder(cfg), steps)
    assert c_answers == python_answers
    if not any(isinstance(a, type) for a in python_answers):
        assert window_state(c_window) == window_state(python_window)


@pytest.mark.skipif(not native_fold(), reason="the C fold was not built")
def test_rounding_overshoot_is_taken_from_the_largest_owner() -> None:
    # Three processes at 100 % SM share the device equally after normalisation; each rounds
    # 1/3 of 2 femto-USD up to 1, one too many: the largest (cost, owner) gives it back.
    procs = tuple(ProcessSample(i, f"pod-{i}", None, 0, 100.0) for i in range(3))
    sample = GpuSample("c", "n", "GPU-1", "GPU-1", "m", None, None, 7, 1.0, 100, 0, None, {}, procs)
    cfg = AllocationSettings(share_policy="sm")
    for fold in (sample_folder(cfg, native=False), sample_folder(cfg)):
        window = DeviceWindow(0)
        assert fold(window, "e1", 0, sample, PRICE, 2)
        assert [t[0] for t in window.owners.values()] == [1, 1, 0]
        assert window.idle_fusd == 0


class _NoFallback(DeviceWindow):
    __slots__ = ()

    def add_sample(self, *args: Any, **kwargs: Any) -> bool:
        raise AssertionError("the C fold handed a valid sample to Python")


@pytest.mark.skipif(not native_fold(), reason="the C fold was not built")
@settings(max_examples=200, deadline=None)
@given(st.lists(step, min_size=1, max_size=12), policy_st)
def test_valid_samples_stay_in_c(steps: list[Any], cfg: AllocationSettings) -> None:
    fold = sample_folder(cfg)
    window = _NoFallback(0)
    for event_id, time_ms, sample, cost_fusd in steps:
        valid = (
            type(sample.interval_s) is float
            and sample.mem_total_bytes <= 2**50
            and sample.mem_used_bytes <= 2**50
            and 0 <= cost_fusd < 2**62
            and len(sample.processes) <= 64
            and all(
                p.mem_used_bytes <= 2**50 and type(p.sm_util_pct) is not int
                for p in sample.processes
            )
            and type(sample.sm_util_pct) is not int
        )
        if valid:
            fold(window, event_id, time_ms, sample, PRICE, cost_fusd)


class _FreshNames:
    """A process-like object whose pod uid is a new string on every read (nothing keeps it)."""

    def __init__(self, i: int) -> None:
        self.i = i
        self.mem_used_bytes = 10
        self.sm_util_pct = 50.0

    @property
    def pod_uid(self) -> str:
        return "pod-" + str(self.i) * 40


def test_owner_names_need_not_outlive_their_read() -> None:
    procs = tuple(_FreshNames(i) for i in range(8))
    sample = GpuSample(
        "c",
        "n",
        "GPU-1",
        "GPU-1",
        "m",
        None,
        None,
        7,
        1.0,
        100,
        0,
        None,
        {},
        procs,  # type: ignore[arg-type]
    )
    cfg = AllocationSettings()
    expected = ["pod-" + str(i) * 40 for i in range(8)]
    for fold in (sample_folder(cfg, native=False), sample_folder(cfg)):
        for k in range(200):  # a freed name would be reused by the next allocations
            window = DeviceWindow(0)
            assert fold(window, f"e{k}", 0, sample, PRICE, 1000)
            assert list(window.owners) == expected


@pytest.mark.parametrize(
    "change",
    [
        # each is accepted or refused alike by both folds (found by review; all unreachable
        # from decoded events, which are validated)
        {"interval_s": float("nan"), "mem_used_bytes": 10**400},
        {"mem_used_bytes": 10**400},
        {"processes": (ProcessSample(1, "pod-a", None, 10, 5.0),), "mem_used_bytes": 10**400},
    ],
)
def test_huge_or_broken_samples_fail_or_fold_alike(change: dict[str, Any]) -> None:
    base = GpuSample("c", "n", "GPU-1", "GPU-1", "m", None, None, 7, 1.0, 100, 0, None, {}, ())
    sample = msgspec.structs.replace(base, **change)
    answers = [
        run(sample_folder(AllocationSettings(), native=n), [("e1", 0, sample, 5)])
        for n in (False, True)
    ]
    assert answers[0][0] == answers[1][0]
    assert window_state(answers[0][1]) == window_state(answers[1][1])


def test_a_float_time_or_a_decimal_weight_is_left_to_python() -> None:
    nan = float("nan")
    sample = GpuSample("c", "n", "GPU-1", "GPU-1", "m", None, None, 7, 1.0, 100, 0, None, {}, ())
    states = []
    for native in (False, True):
        fold = sample_folder(AllocationSettings(), native=native)
        window = DeviceWindow(0)
        fold(window, "e2", nan, sample, PRICE, 100)  # type: ignore[arg-type]
        fold(window, "e1", nan, sample, PRICE, 100)  # type: ignore[arg-type]
        states.append(window.first_key)
    assert states[0][1] == states[1][1] == "e2"  # type: ignore[index]
    weighted = AllocationSettings(share_policy="weighted", sm_weight=Decimal("0.5"))  # type: ignore[arg-type]
    process = ProcessSample(1, "pod-a", None, 10, 5.0)
    sample = msgspec.structs.replace(sample, processes=(process,))
    for native in (False, True):
        with pytest.raises(TypeError):
            sample_folder(weighted, native=native)(DeviceWindow(0), "e1", 0, sample, PRICE, 100)

"""`streams.reports.plan_data.plan` on the embedded ClickHouse, over rows made by the real
allocation core for a cluster whose throughput is known: model `m` serves 1,000 tokens a
second per H100 (on demand) and 300 per 3g.40gb MIG instance (spot)."""

from __future__ import annotations

import math
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction

import pytest
from folding import fold
from test_reports_data import HOUR_MS, MIN_MS, T0_MS, cluster_rows, fresh_store

from runtime.errors import ConfigError
from schemas.events import GpuSample, PodInfo, ProcessSample, make_event
from streams.allocation import AllocationSettings, DeviceWindow, Pricer, finalize_device_window
from streams.pricing import load_price_book
from streams.reports.params import Period
from streams.reports.plan import HOURS_PER_MONTH, Option
from streams.reports.plan_data import PlanReport, plan
from streams.reports.render import to_csv, to_json, to_table
from streams.reports.showback import showback
from streams.rollups import seal_hours
from streams.rows import Row, TokenRow
from streams.store import SCHEMA_DIR, ClickHouseStore
from streams.tokens import PodOwner, token_cost_rows

HOURS = 12
STEP_MIN = 10  # one window every 10 minutes: 72 windows
PERIOD = Period(T0_MS, T0_MS + HOURS * HOUR_MS)
GIB = 2**30
H100 = "NVIDIA H100 80GB HBM3"
MIG_PRICE = (Decimal("2.25") * 3 / 7).quantize(Decimal("1e-15"), ROUND_HALF_EVEN)

PODS = {
    uid: PodInfo("c1", uid, "serve", f"{uid}-0", node, {"team": "t", "product": "p"})
    for uid, node in (("p-h", "n1"), ("p-m", "n2"), ("p-x", "n3"))
}
# device: (node, spot, MIG, processes); shares (dominant): p-h 0.9, p-m 0.9, p-x 0.5 + host 0.1
LAYOUT = {
    "g1": ("n1", False, False, (ProcessSample(1, "p-h", None, 72 * GIB, 60.0),)),
    "g2-mig": ("n2", True, True, (ProcessSample(2, "p-m", None, 36 * GIB, 50.0),)),
    "g3": (
        "n3",
        False,
        False,
        (ProcessSample(3, "p-x", None, 40 * GIB, 30.0), ProcessSample(4, None, None, 8 * GIB, 10)),
    ),
}
# tokens per window of (pod, model): p-h holds g1 60 s -> 1,000/s; p-m holds its MIG 60 s ->
# 300/s; p-x holds 50 s of g3 (its 0.5 plus 5/6 of the idle 0.4) and gives half to m -> 25 s.
TOKENS = {
    ("p-h", "m"): (45_000, 15_000),
    ("p-m", "m"): (13_500, 4_500),
    ("p-x", "m"): (18_750, 6_250),
    ("p-x", "other"): (20_000, 5_000),
}


def _sample(device: str) -> GpuSample:
    node, spot, mig, procs = LAYOUT[device]
    return GpuSample(
        cluster="c1",
        node=node,
        device_uuid=f"GPU-{device}",
        gpu_uuid=f"GPU-{device[:2]}",
        gpu_model=H100,
        mig_profile="3g.40gb" if mig else None,
        mig_slices=3 if mig else None,
        gpu_slices=7,
        interval_s=10.0,
        mem_total_bytes=(40 if mig else 80) * GIB,
        mem_used_bytes=sum(p.mem_used_bytes for p in procs),
        sm_util_pct=min(100.0, sum(p.sm_util_pct or 0 for p in procs)),
        node_labels={"karpenter.sh/capacity-type": "spot" if spot else "on-demand"},
        processes=procs,
    )


def plan_rows() -> list[Row]:
    pricer = Pricer(load_price_book(SCHEMA_DIR / "price_book.example.yaml"))
    settings = AllocationSettings()
    out: list[Row] = []
    for minute in range(0, HOURS * 60, STEP_MIN):
        w0 = T0_MS + minute * MIN_MS
        pod_cost: dict[str, Decimal] = {}
        for device in LAYOUT:
            window = DeviceWindow(w0)
            for k in range(6):
                event = make_event(
                    _sample(device),
                    event_id=f"{device}-{w0}-{k}",
                    source="t",
                    time_ms=w0 + k * 10_000,
                )
                fold(window, event, pricer, settings)
            rows = finalize_device_window(window, PODS.get, settings, version=1)
            out += rows
            for r in rows:
                if r.kind == "usage":
                    pod_cost[r.pod_uid] = pod_cost.get(r.pod_uid, Decimal(0)) + r.cost_usd
        for uid, pod in PODS.items():
            tokens = {
                model: TokenRow(
                    w0,
                    w0 + MIN_MS,
                    "c1",
                    pod.namespace,
                    pod.name,
                    uid,
                    model,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    requests=10,
                    cached_tokens=prompt // 10,
                    prefill_s=1.0,
                    decode_s=5.0,
                    version=1,
                )
                for (pod_uid, model), (prompt, completion) in TOKENS.items()
                if pod_uid == uid
            }
            out += tokens.values()
            owner = PodOwner("c1", pod.namespace, pod.name, "t", "p", "__untagged__")
            out += token_cost_rows(w0, w0 + MIN_MS, uid, pod_cost[uid], tokens, owner, version=1)
    return out


@pytest.fixture(scope="module")
def store() -> ClickHouseStore:
    s = fresh_store()
    s.insert_rows(plan_rows())
    return s


def _by_device(report: PlanReport) -> dict[tuple[str, str, str], Option]:
    return {o.measured.device: o for o in report.options}


def test_known_throughput_devices_and_cost(store: ClickHouseStore) -> None:
    report = plan(store, PERIOD, "m", tokens_per_s=Fraction(10_400))
    options = _by_device(report)
    whole = options[(H100, "", "on_demand")]
    mig = options[(H100, "3g.40gb", "spot")]
    assert whole.measured.tokens_per_device_s == pytest.approx(1000, rel=1e-9)
    assert mig.measured.tokens_per_device_s == pytest.approx(300, rel=1e-9)
    assert whole.devices == 11 and mig.devices == 35
    assert whole.price_per_hour_usd == Decimal("4.00")
    assert whole.monthly_cost_usd == Decimal("32120")
    assert mig.price_per_hour_usd == MIG_PRICE
    assert mig.monthly_cost_usd == MIG_PRICE * 35 * HOURS_PER_MONTH
    month_tokens = Decimal(10_400 * HOURS_PER_MONTH * 3600)
    assert whole.cost_per_1m_tokens_usd == (Decimal(32120) * 1_000_000 / month_tokens).quantize(
        Decimal("1e-6")
    )
    assert report.cheapest is mig
    # SM: p-h 60 % over 60 s, p-x 30 % over its half of 60 s; busy: (54 + 15) of 85 s
    assert whole.measured.sm_util_pct == pytest.approx(50.0)
    assert whole.measured.busy_share == pytest.approx(69 / 85)
    # what it rests on: 72 windows of 85 s and 60 s, 12 hours, constant throughput
    assert whole.evidence.device_hours == pytest.approx(72 * 85 / 3600)
    assert whole.evidence.tokens == pytest.approx(72 * 85_000)
    assert whole.evidence.distinct_hours == HOURS
    assert whole.evidence.hourly_cv == pytest.approx(0, abs=1e-9)
    assert whole.evidence.grade == "thin"
    assert report.prompt_share == pytest.approx(0.75)
    assert report.prompt_tokens == 72 * (45_000 + 13_500 + 18_750)


def test_growth_of_the_observed_rate(store: ClickHouseStore) -> None:
    report = plan(store, PERIOD, "m", growth=Fraction(3))
    observed = 72 * 103_000 / (HOURS * 3600)
    assert report.target.observed_tokens_per_s == pytest.approx(observed)
    assert float(report.target.tokens_per_s) == pytest.approx(3 * observed)
    options = _by_device(report)
    assert options[(H100, "", "on_demand")].devices == math.ceil(3 * observed / 1000)
    assert options[(H100, "3g.40gb", "spot")].devices == math.ceil(3 * observed / 300)


def test_rollups_give_the_same_plan(store: ClickHouseStore) -> None:
    base = plan(store, PERIOD, "m", tokens_per_s=Fraction(10_400), use_rollups=False)
    seal_hours(store, T0_MS + 8 * HOUR_MS)  # some hours sealed, the rest from base rows
    rolled = plan(store, PERIOD, "m", tokens_per_s=Fraction(10_400))
    for a, b in zip(base.options, rolled.options, strict=True):
        assert a.devices == b.devices and a.monthly_cost_usd == b.monthly_cost_usd
        assert a.measured.tokens_per_device_s == pytest.approx(b.measured.tokens_per_device_s)


def test_price_book_moves_the_rate(store: ClickHouseStore) -> None:
    book = load_price_book(SCHEMA_DIR / "price_book.example.yaml")
    report = plan(store, PERIOD, "m", tokens_per_s=Fraction(10_400), price_book=book)
    options = _by_device(report)
    assert options[(H100, "", "on_demand")].price_per_hour_usd == Decimal("4.00")
    assert options[(H100, "3g.40gb", "spot")].price_per_hour_usd == MIG_PRICE


def test_renders(store: ClickHouseStore) -> None:
    report = plan(store, PERIOD, "m", tokens_per_s=Fraction(10_400))
    table = to_table(report)
    assert "cheapest fit: NVIDIA H100 80GB HBM3 3g.40gb (spot), 35 devices" in table
    assert "thin: under 10 device-hours" in table and "730 h" in table
    assert "nothing is extrapolated" in table
    assert to_csv(report).count("\n") == 3
    assert '"cheapest": true' in to_json(report)


def test_unknown_model_names_what_was_seen(store: ClickHouseStore) -> None:
    with pytest.raises(ConfigError, match=r"model 'gpt-9' was not seen .*'m' \(7,416,000 tokens\)"):
        plan(store, PERIOD, "gpt-9", tokens_per_s=Fraction(1))
    with pytest.raises(ConfigError, match="was not seen"):
        plan(store, Period(T0_MS - HOUR_MS, T0_MS), "m", tokens_per_s=Fraction(1))
    with pytest.raises(ConfigError, match="exactly one"):
        plan(store, PERIOD, "m")


@pytest.mark.parametrize("model", ["llama-3-70b", "mistral-7b", "llama-3-8b"])
def test_device_time_agrees_with_showback_by_model(model: str) -> None:
    """On the shared report data (two pods sharing a GPU, one serving two models), each model's
    device time by the share policy is showback's GPU-hours for it, and its tokens are all in
    the plan."""
    s = fresh_store()
    s.insert_rows(cluster_rows(hours=3))
    period = Period(T0_MS, T0_MS + 3 * HOUR_MS)
    report = plan(s, period, model, tokens_per_s=Fraction(100))
    line = next(x for x in showback(s, period, "model").lines if x.key == model)
    used_s = sum(o.measured.used_s for o in report.options)
    assert used_s == pytest.approx(line.gpu_hours * 3600, rel=1e-9)
    assert sum(o.measured.tokens for o in report.options) == pytest.approx(line.tokens)
    assert report.prompt_tokens + report.completion_tokens == line.tokens
    assert report.unplaced_tokens == 0


def test_targets_of_any_exact_type(store: ClickHouseStore) -> None:
    a = plan(store, PERIOD, "m", tokens_per_s=10_400)
    b = plan(store, PERIOD, "m", tokens_per_s=Decimal("10400.0"))
    assert [o.devices for o in a.options] == [o.devices for o in b.options] == [35, 11]
    for bad in (0, Decimal(-1)):
        with pytest.raises(ConfigError, match="more than 0"):
            plan(store, PERIOD, "m", growth=bad)

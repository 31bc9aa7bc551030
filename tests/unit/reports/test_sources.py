import pytest

from runtime.errors import ConfigError
from streams.reports.params import parse_instant, parse_month, parse_period
from streams.reports.sources import plan_ranges

H = 3_600_000


def test_plan_uses_whole_sealed_hours_only() -> None:
    plan = plan_ranges(10 * H + 5, 20 * H + 7, 15 * H)
    assert (plan.rollup_from_ms, plan.rollup_to_ms) == (11 * H, 15 * H)
    assert plan.base_ranges_ms == ((10 * H + 5, 11 * H), (15 * H, 20 * H + 7))


def test_plan_without_horizon_or_sealed_hours() -> None:
    assert plan_ranges(0, 5 * H, None).base_ranges_ms == ((0, 5 * H),)
    plan = plan_ranges(10 * H, 12 * H, 5 * H)
    assert plan.rollup_to_ms == plan.rollup_from_ms and plan.base_ranges_ms == ((10 * H, 12 * H),)
    plan = plan_ranges(10 * H, 12 * H, 20 * H)
    assert plan.base_ranges_ms == () and plan.rollup_to_ms == 12 * H


def test_periods() -> None:
    nov = parse_month("2026-11")
    assert nov.end_ms - nov.start_ms == 30 * 24 * H
    dec = parse_month("2026-12")
    assert dec.end_ms - dec.start_ms == 31 * 24 * H
    assert parse_instant("2026-11-01T01:00:00Z", option="--from") == nov.start_ms + H
    with pytest.raises(ConfigError, match="before it starts"):
        parse_period("2026-11-02", "2026-11-01", now_ms=0)
    with pytest.raises(ConfigError, match="--from"):
        parse_period("yesterday", None, now_ms=0)
    with pytest.raises(ConfigError, match="month"):
        parse_month("2026-13")

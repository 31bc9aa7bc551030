"""A cost row with every column set, for tests that need rows without running the allocation."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from streams.rows import CostRow


def cost_row(start_ms: int, device: str = "GPU-1", **changes: Any) -> CostRow:
    """A one-minute usage row of `device` starting at `start_ms`; `changes` override columns."""
    values: dict[str, Any] = dict(
        window_start_ms=start_ms,
        window_end_ms=start_ms + 60_000,
        cluster="c1",
        node="n1",
        device_uuid=device,
        gpu_uuid=device,
        gpu_model="H100",
        mig_profile="",
        namespace="ns",
        pod="p",
        pod_uid="uid-p",
        team="search",
        product="web",
        cost_center="cc",
        kind="usage",
        device_seconds=60.0,
        sm_util_avg=50.0,
        mem_bytes_avg=1e9,
        cost_usd=Decimal("0.05"),
        idle_cost_usd=Decimal(0),
        price_per_hour=Decimal("3"),
        pricing="list",
        version=1,
    )
    values.update(changes)
    return CostRow(**values)

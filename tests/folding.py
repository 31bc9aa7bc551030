"""How tests fold a GPU sample into its window: the worker device stage's own two calls."""

from __future__ import annotations

from schemas.events import CloudEvent, GpuSample
from streams.allocation import AllocationSettings, DeviceWindow, Pricer


def fold(
    window: DeviceWindow,
    event: CloudEvent[GpuSample],
    pricer: Pricer,
    settings: AllocationSettings,
) -> bool:
    """Price the sample (`Pricer.price`) and fold it in (`DeviceWindow.add_sample`), as the
    device stage does; False for a duplicate event id."""
    price, cost = pricer.price(event.data, event.time_ms)
    return window.add_sample(event.id, event.time_ms, event.data, price, cost, settings)

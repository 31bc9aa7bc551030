"""Event-time windows: tumbling, aligned to the Unix epoch (design §3 step 7)."""

from __future__ import annotations


def window_of(time_ms: int, window_s: int) -> int:
    """Start (Unix ms) of the window that contains `time_ms`."""
    size_ms = window_s * 1000
    return time_ms - time_ms % size_ms

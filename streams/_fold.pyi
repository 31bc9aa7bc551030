"""Types of the C module built from streams/_fold.c (see streams.allocation.sample_folder)."""

from typing import Any

def fold(
    policy: int,
    sm_weight: float,
    settings: Any,
    window: Any,
    event_id: str,
    time_ms: int,
    sample: Any,
    price: Any,
    cost_fusd: int,
    /,
) -> bool: ...
def init(host: str, /) -> None: ...

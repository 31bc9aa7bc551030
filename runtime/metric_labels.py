"""Label values of Prometheus series named by what the input says (a cluster, a node, a device,
a model): never longer than MAX_LABEL_CHARS, so a megabyte value costs 128 characters per
scrape, not a megabyte. Shared by the producers' and the worker's metrics."""

from __future__ import annotations

import functools
import hashlib

MAX_LABEL_CHARS = 128
OTHER = "__other__"  # the label value of a series shared by what a family has no room for
_DIGEST_BYTES = 6  # 12 hex characters: two long values that share their head stay apart


def bounded_label(value: str) -> str:
    """`value`, or, when longer than MAX_LABEL_CHARS, its head, "…" and a hash of the whole."""
    return value if len(value) <= MAX_LABEL_CHARS else _shortened(value)


@functools.lru_cache(maxsize=4096)  # a long value repeats every window: hashed once
def _shortened(value: str) -> str:
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=_DIGEST_BYTES)
    head = MAX_LABEL_CHARS - 1 - 2 * _DIGEST_BYTES
    return f"{value[:head]}\u2026{digest.hexdigest()}"


class FirstSeen:
    """The labels of a family whose values should be few: the first `max_series - 1` label
    sets keep their own series, any later one counts in the one of `__other__` (values cut to
    MAX_LABEL_CHARS)."""

    __slots__ = ("_seen", "max_series")

    def __init__(self, max_series: int) -> None:
        self.max_series = max_series
        self._seen: set[tuple[str, ...]] = set()

    def __call__(self, *labels: str) -> tuple[str, ...]:
        if labels in self._seen:
            return labels
        bounded = tuple(bounded_label(value) for value in labels)
        if bounded in self._seen:
            return bounded
        if len(self._seen) < self.max_series - 1:
            self._seen.add(bounded)
            return bounded
        return (OTHER,) * len(labels)

"""Tokens per (window, pod, model) and cost per token (design §3, last paragraphs).

A pod's cost in a window (all its devices) is split across the models it served in proportion
to their tokens; with no tokens at all it is split evenly so no cost disappears, and
cost_per_1m_tokens is null.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from schemas.events import CloudEvent, TokenDelta
from streams.allocation import id_digest, split_exact
from streams.rows import TokenCostRow, TokenRow

_ZERO = Decimal(0)
_MILLION = Decimal(1_000_000)
CPT_QUANTUM = Decimal("1e-9")
SECONDS_QUANTUM = Decimal("1e-6")  # prefill and decode time, summed exactly


class TokenWindow:
    """Sums of the token deltas of one (window, pod uid, model); order independent. Delta ids
    are strings while live; a restored window knows its earlier ones by `known_digests`
    (streams.worker.packing)."""

    __slots__ = (
        "cached_tokens",
        "completion_tokens",
        "decode_s",
        "delta_ids",
        "identity",
        "known_count",
        "known_digests",
        "prefill_s",
        "prompt_tokens",
        "requests",
    )

    def __init__(self) -> None:
        self.delta_ids: set[str] = set()
        self.known_digests: frozenset[int] = frozenset()
        self.known_count = 0
        self.identity: tuple[int, str, str, str, str] | None = None  # time, id, cluster, ns, pod
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.requests = 0
        self.cached_tokens = 0
        self.prefill_s = _ZERO
        self.decode_s = _ZERO

    def add(self, event: CloudEvent[TokenDelta]) -> bool:
        if event.id in self.delta_ids or (
            self.known_digests and id_digest(event.id) in self.known_digests
        ):
            return False
        self.delta_ids.add(event.id)
        d = event.data
        self.prompt_tokens += d.prompt_tokens
        self.completion_tokens += d.completion_tokens
        self.requests += d.requests
        self.cached_tokens += d.cached_tokens or 0
        if d.prefill_s is not None:
            self.prefill_s += Decimal(repr(d.prefill_s)).quantize(SECONDS_QUANTUM)
        if d.decode_s is not None:
            self.decode_s += Decimal(repr(d.decode_s)).quantize(SECONDS_QUANTUM)
        ident = (event.time_ms, event.id, d.cluster, d.namespace, d.pod)
        if self.identity is None or ident[:2] > self.identity[:2]:
            self.identity = ident
        return True

    @property
    def count(self) -> int:
        """Deltas folded in: a version input."""
        return len(self.delta_ids) + self.known_count

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def row(
        self, window_start_ms: int, window_end_ms: int, pod_uid: str, model: str, version: int
    ) -> TokenRow:
        _, _, cluster, namespace, pod = self.identity or (0, "", "", "", "")
        return TokenRow(
            window_start_ms=window_start_ms,
            window_end_ms=window_end_ms,
            cluster=cluster,
            namespace=namespace,
            pod=pod,
            pod_uid=pod_uid,
            model=model,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            requests=self.requests,
            cached_tokens=self.cached_tokens,
            prefill_s=float(self.prefill_s),
            decode_s=float(self.decode_s),
            version=version,
        )


@dataclass(frozen=True, slots=True)
class PodOwner:
    """Labels of the pod a cost-per-token row belongs to."""

    cluster: str
    namespace: str
    pod: str
    team: str
    product: str
    cost_center: str


def cost_per_1m_tokens(cost_usd: Decimal, tokens: int) -> Decimal | None:
    if tokens <= 0:
        return None
    return (cost_usd * _MILLION / tokens).quantize(CPT_QUANTUM)


def token_cost_rows(
    window_start_ms: int,
    window_end_ms: int,
    pod_uid: str,
    pod_cost_usd: Decimal,
    token_rows: Mapping[str, TokenRow],
    owner: PodOwner,
    version: int,
) -> list[TokenCostRow]:
    """Cost-per-token rows of one pod in one window, one per model it served."""
    if not token_rows:
        return []
    total_tokens = sum(r.prompt_tokens + r.completion_tokens for r in token_rows.values())
    if total_tokens > 0:
        weights = [
            (m, Decimal(r.prompt_tokens + r.completion_tokens)) for m, r in token_rows.items()
        ]
    else:
        weights = [(m, Decimal(1)) for m in token_rows]
    shares = split_exact(pod_cost_usd, weights) if pod_cost_usd > 0 else {}
    rows = []
    for model, tr in sorted(token_rows.items()):
        cost = shares.get(model, _ZERO)
        rows.append(
            TokenCostRow(
                window_start_ms=window_start_ms,
                window_end_ms=window_end_ms,
                cluster=owner.cluster,
                namespace=owner.namespace,
                pod=owner.pod,
                pod_uid=pod_uid,
                team=owner.team,
                product=owner.product,
                cost_center=owner.cost_center,
                model=model,
                cost_usd=cost,
                prompt_tokens=tr.prompt_tokens,
                completion_tokens=tr.completion_tokens,
                requests=tr.requests,
                cached_tokens=tr.cached_tokens,
                prefill_s=tr.prefill_s,
                decode_s=tr.decode_s,
                cost_per_1m_tokens=cost_per_1m_tokens(
                    cost, tr.prompt_tokens + tr.completion_tokens
                ),
                version=version,
            )
        )
    return rows


@dataclass(frozen=True, slots=True)
class InputOutputCost:
    """An estimate of how a model's cost splits between input (prefill) and output (decode)."""

    input_cost_usd: Decimal
    output_cost_usd: Decimal
    basis: str  # "time" (prefill vs decode seconds) or "weight" (output:input token weight)


def split_input_output(
    cost_usd: Decimal,
    prompt_tokens: int,
    completion_tokens: int,
    prefill_s: float,
    decode_s: float,
    output_weight: float = 3.0,
) -> InputOutputCost:
    """Input cost = cost * prefill_s / (prefill_s + decode_s) where times are known; otherwise
    tokens weighted output:input = `output_weight`:1. Both are estimates."""
    if prefill_s + decode_s > 0:
        frac = Decimal(repr(prefill_s)) / (Decimal(repr(prefill_s)) + Decimal(repr(decode_s)))
        basis = "time"
    else:
        weighted_out = Decimal(repr(output_weight)) * completion_tokens
        denominator = prompt_tokens + weighted_out
        frac = Decimal(prompt_tokens) / denominator if denominator > 0 else Decimal(0)
        basis = "weight"
    input_cost = (cost_usd * frac).quantize(Decimal("1e-15"))
    return InputOutputCost(input_cost, cost_usd - input_cost, basis)

"""Tokens per (window, pod, model) and cost per token."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from schemas.events import TokenDelta, make_event
from streams.rows import TokenRow
from streams.tokens import PodOwner, TokenWindow, split_input_output, token_cost_rows

OWNER = PodOwner("c1", "search", "vllm-0", "search", "assistant", "CC-1")


def delta(
    event_id: str,
    model: str,
    prompt: int,
    completion: int,
    requests: int = 1,
    prefill_s: float | None = None,
    decode_s: float | None = None,
) -> TokenWindow:
    window = TokenWindow()
    ev = make_event(
        TokenDelta(
            "c1",
            "search",
            "vllm-0",
            "uid-1",
            model,
            prompt,
            completion,
            requests,
            15.0,
            cached_tokens=10,
            prefill_s=prefill_s,
            decode_s=decode_s,
        ),
        event_id=event_id,
        source="t",
        time_ms=0,
    )
    assert window.add(ev)
    assert not window.add(ev)  # a duplicate id changes nothing
    return window


def rows_of(*windows: tuple[str, TokenWindow]) -> dict[str, TokenRow]:
    return {m: w.row(0, 60_000, "uid-1", m, 1) for m, w in windows}


def test_pod_cost_splits_across_models_by_tokens() -> None:
    # 0.06 USD; llama served 3000 tokens, mistral 1000 -> 0.045 and 0.015 USD
    tokens = rows_of(
        ("llama", delta("a", "llama", 2000, 1000)), ("mistral", delta("b", "mistral", 800, 200))
    )
    rows = {
        r.model: r for r in token_cost_rows(0, 60_000, "uid-1", Decimal("0.06"), tokens, OWNER, 7)
    }
    assert rows["llama"].cost_usd == Decimal("0.045")
    assert rows["mistral"].cost_usd == Decimal("0.015")
    # 0.045 USD / 3000 tokens * 1e6 = 15 USD per 1M tokens
    assert rows["llama"].cost_per_1m_tokens == Decimal("15")
    assert rows["mistral"].cost_per_1m_tokens == Decimal("15")
    assert rows["llama"].team == "search" and rows["llama"].version == 7
    assert rows["llama"].cached_tokens == 10


def test_no_tokens_keeps_the_cost_and_gives_null_cost_per_token() -> None:
    tokens = rows_of(
        ("llama", delta("a", "llama", 0, 0, 0)), ("mistral", delta("b", "mistral", 0, 0, 0))
    )
    rows = token_cost_rows(0, 60_000, "uid-1", Decimal("0.01"), tokens, OWNER, 1)
    assert sum(r.cost_usd for r in rows) == Decimal("0.01")
    assert all(r.cost_per_1m_tokens is None for r in rows)


@given(
    st.dictionaries(
        st.sampled_from(["m1", "m2", "m3", "m4"]),
        st.tuples(st.integers(0, 10**7), st.integers(0, 10**7)),
        min_size=1,
    ),
    st.decimals(min_value=0, max_value=1000, places=15),
)
def test_cost_per_token_rows_add_up_to_the_pod_cost(
    models: dict[str, tuple[int, int]], cost: Decimal
) -> None:
    tokens = rows_of(*((m, delta(m, m, p, c)) for m, (p, c) in models.items()))
    rows = token_cost_rows(0, 60_000, "uid-1", cost, tokens, OWNER, 1)
    assert sum(r.cost_usd for r in rows) == cost
    assert {r.model for r in rows} == set(models)


def test_input_output_split_by_time_when_known() -> None:
    split = split_input_output(Decimal("1.00"), 3000, 1000, prefill_s=1.0, decode_s=3.0)
    assert (split.input_cost_usd, split.output_cost_usd, split.basis) == (
        Decimal("0.25"),
        Decimal("0.75"),
        "time",
    )


def test_input_output_split_by_weight_otherwise() -> None:
    # 3000 input tokens at weight 1, 1000 output tokens at weight 3 -> half each
    split = split_input_output(Decimal("1.00"), 3000, 1000, 0.0, 0.0, output_weight=3.0)
    assert (split.input_cost_usd, split.output_cost_usd, split.basis) == (
        Decimal("0.5"),
        Decimal("0.5"),
        "weight",
    )

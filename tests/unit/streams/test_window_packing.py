"""Packed windows (streams.worker.packing): a window packed part-way and unpacked folds on to the
rows, versions and duplicate refusals of the window it was packed from; damaged bytes are a
StateError, never another exception."""

from __future__ import annotations

import contextlib
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from checkpoint_store import gpu_sample, token_delta
from folding import fold
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import CloudEvent, GpuSample, PodInfo, TokenDelta
from streams.allocation import (
    IDLE_POLICIES,
    SHARE_POLICIES,
    AllocationSettings,
    DeviceWindow,
    Pricer,
    finalize_device_window,
)
from streams.labels import PodHistory
from streams.pricing import EXAMPLE_PRICE_BOOK, load_price_book
from streams.rows import CostRow
from streams.tokens import TokenWindow
from streams.worker import packing
from streams.worker.device_stage import StreamSettings
from streams.worker.packing import (
    StateError,
    pack_device,
    pack_digests,
    pack_pod,
    pack_tokens,
    unpack_device,
    unpack_digests,
    unpack_pod,
    unpack_tokens,
)
from streams.worker.pod_stage import PodStage

BOOK = load_price_book(EXAMPLE_PRICE_BOOK)
T0 = 1_795_000_020_000  # a window start
PODS = PodHistory()
PODS.add("pod-a:1", T0 - 5_000, PodInfo("c1", "pod-a", "search", "a-0", "n", {"team": "s"}, {}))
PODS.add("pod-b:1", T0 + 80_000, PodInfo("c1", "pod-b", "ads", "b-0", "n", {}, {"team": "ads"}))

process = st.tuples(
    st.sampled_from(["pod-a", "pod-b", "pod-c", None]),
    st.floats(min_value=0, max_value=60, allow_nan=False),
    st.none() | st.floats(min_value=0, max_value=100, allow_nan=False),
)
# (id number: a small pool, so ids repeat; time in the window; interval; processes)
sample_spec = st.tuples(
    st.integers(min_value=0, max_value=40),
    st.integers(min_value=0, max_value=59_999),
    st.sampled_from([1.0, 5.0, 10.0, 0.5]),
    st.lists(process, max_size=4),
)
policy = st.builds(
    AllocationSettings,
    share_policy=st.sampled_from(SHARE_POLICIES),
    idle_policy=st.sampled_from(IDLE_POLICIES),
)
MIG = st.sampled_from([None, ("3g.40gb", 3)])


def events_of(specs: list[Any], mig: tuple[str, int] | None) -> list[CloudEvent[GpuSample]]:
    # A repeated id is a redelivery: the same event, whatever the spec says of it after.
    first: dict[int, CloudEvent[GpuSample]] = {}
    out = []
    for number, offset_ms, interval_s, procs in specs:
        if number not in first:
            first[number] = gpu_sample(
                "GPU-1", T0 + offset_ms, f"s-{number}", procs, interval_s=interval_s, mig=mig
            )
        out.append(first[number])
    return out


def snapshot(window: DeviceWindow) -> tuple[Any, ...]:
    """Everything a window's rows and version are made of."""
    s = window.first_sample
    device = (
        None
        if s is None
        else (s.cluster, s.node, s.device_uuid, s.gpu_uuid, s.gpu_model, s.mig_profile)
    )
    return (
        window.window_start_ms,
        window.cost_fusd,
        window.idle_fusd,
        window.interval_ns,
        window.sm_pct_us,
        window.mem_byte_seconds,
        {owner: list(totals) for owner, totals in window.owners.items()},
        window.first_key,
        device,
        window.first_price,
        window.sample_count,
    )


def rows_of(window: DeviceWindow, cfg: AllocationSettings, version: int = 7) -> list[CostRow]:
    as_of = window.window_start_ms + 70_000
    return finalize_device_window(window, lambda uid: PODS.as_of(uid, as_of), cfg, version)


@settings(max_examples=200, deadline=None)
@given(st.lists(sample_spec, min_size=1, max_size=30), st.data(), policy, MIG)
def test_a_window_packed_part_way_folds_on_to_the_same_window(
    specs: list[Any], data: st.DataObject, cfg: AllocationSettings, mig: tuple[str, int] | None
) -> None:
    events = events_of(specs, mig)
    cut = data.draw(st.integers(min_value=1, max_value=len(events)), label="cut")
    pricer = Pricer(BOOK)
    whole = DeviceWindow(T0)
    accepted_whole = [fold(whole, ev, pricer, cfg) for ev in events]

    part = DeviceWindow(T0)
    accepted = [fold(part, ev, pricer, cfg) for ev in events[:cut]]
    blob = pack_device(part, 41)
    restored, version = unpack_device(blob)
    assert version == 41
    assert snapshot(restored)[:8] == snapshot(part)[:8]
    assert restored.sample_count == part.sample_count == sum(accepted)
    assert rows_of(restored, cfg) == rows_of(part, cfg)
    accepted += [fold(restored, ev, pricer, cfg) for ev in events[cut:]]

    assert accepted == accepted_whole  # the same samples refused as duplicates
    assert snapshot(restored) == snapshot(whole)
    assert rows_of(restored, cfg) == rows_of(whole, cfg)


@settings(max_examples=100, deadline=None)
@given(st.lists(sample_spec, min_size=1, max_size=30), policy, MIG)
def test_a_sample_folded_before_packing_is_refused_after_it(
    specs: list[Any], cfg: AllocationSettings, mig: tuple[str, int] | None
) -> None:
    pricer = Pricer(BOOK)
    window = DeviceWindow(T0)
    events = events_of(specs, mig)
    for ev in events:
        fold(window, ev, pricer, cfg)
    restored, _ = unpack_device(pack_device(window, 1))
    before = snapshot(restored)
    for ev in events:
        assert not fold(restored, ev, pricer, cfg)
        # The same id with other content is the same event redelivered: refused too.
        other = gpu_sample("GPU-1", ev.time_ms, ev.id, [("pod-z", 10, 50.0)], interval_s=3.0)
        assert not fold(restored, other, pricer, cfg)
    assert snapshot(restored) == before


@settings(max_examples=100, deadline=None)
@given(st.lists(sample_spec, min_size=1, max_size=30), policy, MIG)
def test_packing_a_restored_window_again_gives_the_same_bytes(
    specs: list[Any], cfg: AllocationSettings, mig: tuple[str, int] | None
) -> None:
    pricer = Pricer(BOOK)
    window = DeviceWindow(T0)
    for ev in events_of(specs, mig):
        fold(window, ev, pricer, cfg)
    once = pack_device(window, 9)
    restored, version = unpack_device(once)
    twice = pack_device(restored, version)
    assert twice == once
    again, _ = unpack_device(twice)
    assert snapshot(again) == snapshot(restored)
    assert rows_of(again, cfg) == rows_of(window, cfg)


def test_an_empty_window_has_no_state() -> None:
    with pytest.raises(StateError):
        pack_device(DeviceWindow(T0), 0)


def colliding_digest(event_id: str) -> int:
    """Three digests for every id: collisions in nearly every window."""
    return sum(map(ord, event_id)) % 3


@settings(max_examples=100, deadline=None)
@given(
    st.sets(st.text(min_size=1, max_size=6), max_size=20),
    st.sets(st.integers(min_value=0, max_value=5), max_size=4),
    st.integers(min_value=0, max_value=5),
)
def test_digests_keep_the_count_when_ids_collide(
    ids: set[str], known: set[int], extra: int
) -> None:
    extra = extra if known else 0  # a count beyond the digests stands for repeats of one
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(packing, "id_digest", colliding_digest)
        raw = pack_digests(ids, frozenset(known), len(known) + extra)
    digests, count = unpack_digests(raw)
    assert count == len(ids) + len(known) + extra
    assert digests == {*known, *map(colliding_digest, ids)}
    again, count_again = unpack_digests(pack_digests(set(), digests, count))
    assert (again, count_again) == (digests, count)


@settings(max_examples=50, deadline=None)
@given(st.lists(sample_spec, min_size=1, max_size=30), policy)
def test_a_window_whose_ids_collide_keeps_its_sample_count(
    specs: list[Any], cfg: AllocationSettings
) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(packing, "id_digest", colliding_digest)
        window = DeviceWindow(T0)
        pricer = Pricer(BOOK)
        for ev in events_of(specs, None):
            fold(window, ev, pricer, cfg)
        restored, _ = unpack_device(pack_device(window, 3))
        assert restored.sample_count == window.sample_count
        assert len(restored.known_digests) <= 3
        twice, _ = unpack_device(pack_device(restored, 3))
        assert twice.sample_count == window.sample_count


# ------------------------------------------------------------------ stage two

token_spec = st.tuples(
    st.integers(min_value=0, max_value=30),  # id number (repeats are redeliveries)
    st.integers(min_value=0, max_value=59_999),
    st.integers(min_value=0, max_value=10_000),
    st.integers(min_value=0, max_value=5_000),
)


def deltas_of(specs: list[Any], model: str = "m1") -> list[CloudEvent[TokenDelta]]:
    first: dict[int, CloudEvent[TokenDelta]] = {}
    for number, offset_ms, prompt, completion in specs:
        if number not in first:
            first[number] = token_delta(
                "pod-a", model, T0 + offset_ms, f"t-{model}-{number}", prompt, completion
            )
    return [first[number] for number, *_ in specs]


def token_snapshot(window: TokenWindow) -> tuple[Any, ...]:
    return (
        window.prompt_tokens,
        window.completion_tokens,
        window.requests,
        window.cached_tokens,
        window.prefill_s,
        window.decode_s,
        window.identity,
        window.count,
        window.row(T0, T0 + 60_000, "pod-a", "m1", window.count),
    )


@settings(max_examples=150, deadline=None)
@given(st.lists(token_spec, min_size=1, max_size=30), st.data())
def test_a_token_window_packed_part_way_folds_on_to_the_same_window(
    specs: list[Any], data: st.DataObject
) -> None:
    deltas = deltas_of(specs)
    cut = data.draw(st.integers(min_value=0, max_value=len(deltas)), label="cut")
    whole = TokenWindow()
    accepted_whole = [whole.add(ev) for ev in deltas]
    part = TokenWindow()
    accepted = [part.add(ev) for ev in deltas[:cut]]
    restored = unpack_tokens(pack_tokens(part))
    assert token_snapshot(restored) == token_snapshot(part)
    # Through the bytes of a pod checkpoint too.
    _, _, tokens, _ = unpack_pod(pack_pod(1, [], {"m1": part}, {}))
    assert token_snapshot(tokens["m1"]) == token_snapshot(part)
    restored = tokens["m1"]
    accepted += [restored.add(ev) for ev in deltas[cut:]]
    assert accepted == accepted_whole
    assert token_snapshot(restored) == token_snapshot(whole)
    before = token_snapshot(restored)
    assert not any(unpack_tokens(pack_tokens(restored)).add(ev) for ev in deltas)
    assert token_snapshot(restored) == before


partial = st.tuples(
    st.text(min_size=1, max_size=8),
    st.decimals(min_value=0, max_value=10**6, places=15, allow_nan=False).map(
        lambda d: format(d, "f")
    ),
    st.integers(min_value=0, max_value=2**31),
    st.integers(min_value=0, max_value=2**62),
)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(min_value=0, max_value=2**62),
    st.lists(partial, max_size=5),
    st.dictionaries(
        st.sampled_from(["m1", "m2", "m3"]), st.lists(token_spec, min_size=1, max_size=8)
    ),
    st.dictionaries(st.text(max_size=20), st.integers(min_value=0, max_value=2**62)),
)
def test_a_pod_checkpoint_unpacks_to_what_was_packed_and_packs_again_alike(
    version: int,
    partials: list[tuple[str, str, int, int]],
    token_specs: dict[str, list[Any]],
    emitted: dict[str, int],
) -> None:
    tokens = {}
    for model, specs in token_specs.items():
        tokens[model] = TokenWindow()
        for ev in deltas_of(specs, model):
            tokens[model].add(ev)
    blob = pack_pod(version, partials, tokens, emitted)
    got_version, got_partials, got_tokens, got_emitted = unpack_pod(blob)
    assert (got_version, got_partials, got_emitted) == (version, partials, emitted)
    assert got_tokens.keys() == tokens.keys()
    for model, window in tokens.items():
        assert token_snapshot(got_tokens[model])[:8] == token_snapshot(window)[:8]
    assert pack_pod(got_version, got_partials, got_tokens, got_emitted) == blob


# ------------------------------------------------------------------ damaged checkpoints


def a_device_checkpoint() -> bytes:
    window = DeviceWindow(T0)
    pricer = Pricer(BOOK)
    for i in range(6):
        ev = gpu_sample("GPU-1", T0 + 10_000 * i, f"s{i}", [("pod-a", 30, 60.0), (None, 1, None)])
        fold(window, ev, pricer, AllocationSettings())
    return pack_device(window, 5)


def a_pod_checkpoint() -> bytes:
    window = TokenWindow()
    window.add(token_delta("pod-a", "m1", T0, "t1"))
    return pack_pod(3, [("GPU-1", "0.25", 6, 5)], {"m1": window}, {"k": 3})


def mutations(blob: bytes) -> st.SearchStrategy[bytes]:
    """`blob` cut short, with bytes overwritten, or with bytes inserted."""
    n = len(blob)
    cut = st.integers(min_value=0, max_value=n - 1).map(lambda i: blob[:i])
    overwrite = st.lists(
        st.tuples(st.integers(min_value=0, max_value=n - 1), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ).map(lambda changes: _overwrite(blob, changes))
    insert = st.tuples(st.integers(min_value=0, max_value=n), st.binary(min_size=1, max_size=9))
    return cut | overwrite | insert.map(lambda p: blob[: p[0]] + p[1] + blob[p[0] :])


def _overwrite(blob: bytes, changes: list[tuple[int, int]]) -> bytes:
    out = bytearray(blob)
    for index, value in changes:
        out[index] = value
    return bytes(out)


DEVICE_BLOB = a_device_checkpoint()
POD_BLOB = a_pod_checkpoint()


@settings(max_examples=500, deadline=None)
@given(st.binary() | mutations(DEVICE_BLOB))
def test_any_bytes_unpack_to_a_device_window_or_a_state_error(raw: bytes) -> None:
    with contextlib.suppress(StateError):
        unpack_device(raw)


@settings(max_examples=500, deadline=None)
@given(st.binary() | mutations(POD_BLOB))
def test_any_bytes_unpack_to_a_pod_window_or_a_state_error(raw: bytes) -> None:
    with contextlib.suppress(StateError):
        unpack_pod(raw)


def test_a_pod_checkpoint_that_unpacks_can_be_corrected() -> None:
    """What `restore` accepts (it unpacks) must not stop stage two when input arrives for it:
    a partial's cost that is not a number is a damaged checkpoint like any other."""
    window = TokenWindow()
    window.add(token_delta("pod-a", "m1", T0, "t1"))
    damaged = pack_pod(3, [("GPU-1", "not a cost", 6, 5)], {"m1": window}, {})
    settings_ = StreamSettings(retention_s=120, late_horizon_s=600)
    stage = PodStage(settings_, PodHistory())
    stage.raise_lookup_floor(T0 + 60_000)
    key = (T0, "pod-a")
    assert stage.missing(("gpuledger.tokens", 0), [key]) == {key}
    damaged_keys = stage.restore(("gpuledger.tokens", 0), {key}, {key: damaged})
    if damaged_keys == [key]:
        return  # reported as damaged and taken as a new window: fine
    stage.add_tokens(("gpuledger.tokens", 0), 0, token_delta("pod-a", "m1", T0 + 1, "t2"), 1.0)
    stage.poll(1.0)


def test_a_device_checkpoint_with_a_price_that_is_not_a_number_is_damaged() -> None:
    state = packing._DEVICE_DECODER.decode(DEVICE_BLOB)
    for text in ("abc", "", "1.2.3"):
        damaged = msgspec.msgpack.encode(
            msgspec.structs.replace(state, price=(text, *state.price[1:]))
        )
        with pytest.raises(StateError):
            unpack_device(damaged)
    window, version = unpack_device(DEVICE_BLOB)
    assert window.first_price is not None
    assert window.first_price.price_per_hour_usd > Decimal(0)
    assert version == 5

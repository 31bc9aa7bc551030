"""Closed windows in a compact form: in memory for the retention, and as the checkpoints a
restart or a late correction restores them from (design §5).

A closed (window, device) keeps what its rows need — the per-owner totals, the device
attributes and price of its first sample — and, to refuse a duplicate, an 8-byte digest per
sample id (`id_digest`), all in one msgpack string: about 0.9 KB for a minute of one device
sampled at 1 Hz, where the live window holds the ids as strings and the first sample whole.
Packing and unpacking are exact: a window restored from its packed form gives the same rows
and versions, and refuses the same duplicates, as the window it was packed from.
"""

from __future__ import annotations

from decimal import Decimal

import msgspec
from msgspec import Struct

from streams.allocation import DeviceAttributes, DevicePrice, DeviceWindow, id_digest
from streams.tokens import TokenWindow


class StateError(ValueError):
    """A checkpoint that does not decode: written by another version, or damaged."""


def pack_digests(ids: set[str], known: frozenset[int], known_count: int) -> bytes:
    """Sorted 8-byte digests of `ids` and `known`, one per sample: where two samples share a
    digest, copies of the first one pad it to `len(ids) + known_count` (`unpack_digests`
    counts them), so a window's sample count, a version input, survives packing."""
    digests = sorted({*known, *map(id_digest, ids)})
    out = b"".join(d.to_bytes(8) for d in digests)
    missing = len(ids) + known_count - len(digests)
    return out + out[:8] * missing if missing > 0 and out else out


def unpack_digests(raw: bytes) -> tuple[frozenset[int], int]:
    """The digests of a packed window and how many samples they stand for."""
    if len(raw) % 8:
        raise StateError(f"digests of {len(raw)} bytes")
    count = len(raw) // 8
    return frozenset(int.from_bytes(raw[i : i + 8]) for i in range(0, len(raw), 8)), count


class _Device(Struct, array_like=True, frozen=True):
    version: int
    window_start_ms: int
    digests: bytes
    totals: tuple[int, int, int, int, int]  # cost, idle, interval ns, SM %·µs, memory byte·s
    owners: list[tuple[str, int, int, int, int]]
    first: tuple[int, str]  # (event time, id) of the first sample
    device: tuple[str, str, str, str, str, str | None]
    price: tuple[str, str, bool]  # per hour (decimal), pricing class, known model


_ENCODER = msgspec.msgpack.Encoder()
_DEVICE_DECODER = msgspec.msgpack.Decoder(_Device)


def pack_device(window: DeviceWindow, version: int) -> bytes:
    """The closed window as bytes (its rows were emitted with `version`)."""
    s, price, first = window.first_sample, window.first_price, window.first_key
    if s is None or price is None or first is None:
        raise StateError("an empty window has no state")
    return _ENCODER.encode(
        _Device(
            version,
            window.window_start_ms,
            pack_digests(window.sample_ids, window.known_digests, window.known_count),
            (
                window.cost_fusd,
                window.idle_fusd,
                window.interval_ns,
                window.sm_pct_us,
                window.mem_byte_seconds,
            ),
            [(owner, *totals) for owner, totals in window.owners.items()],  # type: ignore[misc]
            first,
            (s.cluster, s.node, s.device_uuid, s.gpu_uuid, s.gpu_model, s.mig_profile),
            (format(price.price_per_hour_usd, "f"), price.pricing, price.known_model),
        )
    )


def unpack_device(raw: bytes) -> tuple[DeviceWindow, int]:
    """The window `pack_device` packed, and the version its rows were emitted with."""
    try:
        state = _DEVICE_DECODER.decode(raw)
        digests, count = unpack_digests(state.digests)
        price = DevicePrice(Decimal(state.price[0]), state.price[1], state.price[2])
    except (msgspec.MsgspecError, ArithmeticError, ValueError) as exc:
        raise StateError(f"device window state does not decode: {exc}") from None
    window = DeviceWindow(state.window_start_ms)
    window.known_digests, window.known_count = digests, count
    (
        window.cost_fusd,
        window.idle_fusd,
        window.interval_ns,
        window.sm_pct_us,
        window.mem_byte_seconds,
    ) = state.totals
    window.owners = {owner: list(totals) for owner, *totals in state.owners}
    window.first_key = state.first
    window.first_sample = DeviceAttributes(*state.device)
    window.first_price = price
    return window, state.version


class _Tokens(Struct, array_like=True, frozen=True):
    digests: bytes
    counts: tuple[int, int, int, int]  # prompt, completion, requests, cached
    busy: tuple[str, str]  # prefill and decode seconds (decimal)
    identity: tuple[int, str, str, str, str] | None


def pack_tokens(window: TokenWindow) -> _Tokens:
    return _Tokens(
        pack_digests(window.delta_ids, window.known_digests, window.known_count),
        (window.prompt_tokens, window.completion_tokens, window.requests, window.cached_tokens),
        (format(window.prefill_s, "f"), format(window.decode_s, "f")),
        window.identity,
    )


def unpack_tokens(state: _Tokens) -> TokenWindow:
    window = TokenWindow()
    # Decimal() of a damaged text raises ArithmeticError (InvalidOperation): the caller's.
    window.known_digests, window.known_count = unpack_digests(state.digests)
    (
        window.prompt_tokens,
        window.completion_tokens,
        window.requests,
        window.cached_tokens,
    ) = state.counts
    window.prefill_s, window.decode_s = Decimal(state.busy[0]), Decimal(state.busy[1])
    window.identity = state.identity
    return window


class _Pod(Struct, array_like=True, frozen=True):
    version: int
    partials: list[tuple[str, str, int, int]]  # device uuid, cost (decimal), samples, version
    tokens: list[tuple[str, _Tokens]]  # per model
    emitted: list[tuple[str, int]]  # row key -> version emitted


_POD_DECODER = msgspec.msgpack.Decoder(_Pod)

PodParts = tuple[
    int, list[tuple[str, str, int, int]], dict[str, TokenWindow], dict[str, int]
]  # version, partials, token windows by model, emitted versions by row key


def pack_pod(
    version: int,
    partials: list[tuple[str, str, int, int]],
    tokens: dict[str, TokenWindow],
    emitted: dict[str, int],
) -> bytes:
    """A closed (window, pod) of stage two as bytes."""
    return _ENCODER.encode(
        _Pod(
            version,
            partials,
            [(model, pack_tokens(window)) for model, window in tokens.items()],
            list(emitted.items()),
        )
    )


def unpack_pod(raw: bytes) -> PodParts:
    try:
        state = _POD_DECODER.decode(raw)
        tokens = {model: unpack_tokens(packed) for model, packed in state.tokens}
        for _, cost, _, _ in state.partials:
            Decimal(cost)  # a partial that will not restore must fail here, as damage
    except (msgspec.MsgspecError, ArithmeticError, ValueError) as exc:
        raise StateError(f"pod window state does not decode: {exc}") from None
    return state.version, list(state.partials), tokens, dict(state.emitted)

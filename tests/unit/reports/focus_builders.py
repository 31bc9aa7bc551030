"""Hourly cost and token rows for the chargeback tests, priced as the worker prices them: each
owner's cost is the device's rate x its device-seconds / 3600, in 1e-15 quanta."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

from streams.reports.focus_charges import HourCost, HourTokens

HOUR_MS = 3_600_000
NOV_2026_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z
H100 = "NVIDIA H100 80GB HBM3"


def priced(price: str, seconds: float) -> Decimal:
    return (Decimal(price) * Decimal(repr(seconds)) / 3600).quantize(
        Decimal("1e-15"), ROUND_HALF_EVEN
    )


def cost_row(
    *,
    hour: int = 0,
    device: str = "GPU-aaaa",
    pod: str = "pod-1",
    team: str = "search",
    product: str = "ask",
    cost_center: str = "cc-1",
    kind: str = "usage",
    seconds: float = 1800.0,
    price: str = "4.00",
    usd: str | None = None,
    mig: str = "",
    pricing: str = "on_demand",
    cluster: str = "prod",
    model: str = H100,
) -> HourCost:
    return HourCost(
        NOV_2026_MS + hour * HOUR_MS,
        cluster,
        "node-a",
        device,
        model,
        mig,
        pricing,
        Decimal(price),
        pod,
        team,
        product,
        cost_center,
        kind,
        Decimal(usd) if usd is not None else priced(price, seconds),
        seconds,
    )


def idle_row(
    *,
    hour: int = 0,
    device: str = "GPU-aaaa",
    seconds: float = 1800.0,
    price: str = "4.00",
    mig: str = "",
) -> HourCost:
    return cost_row(
        hour=hour,
        device=device,
        pod="__idle__",
        team="platform",
        product="__idle__",
        cost_center="__idle__",
        kind="idle",
        seconds=seconds,
        price=price,
        mig=mig,
    )


def token_row(
    *,
    hour: int = 0,
    pod: str = "pod-1",
    team: str = "search",
    product: str = "ask",
    cost_center: str = "cc-1",
    model: str = "llama-3-70b",
    usd: str = "1",
    prompt: int = 1000,
    completion: int = 500,
    requests: int = 10,
) -> HourTokens:
    return HourTokens(
        NOV_2026_MS + hour * HOUR_MS,
        pod,
        team,
        product,
        cost_center,
        model,
        Decimal(usd),
        prompt,
        completion,
        requests,
    )

"""`supervise`: the worker's loops as one task group (no broker needed)."""

from __future__ import annotations

import asyncio

import pytest

from streams.worker.app import supervise


async def _until(stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        await asyncio.sleep(0.01)


async def test_a_loop_that_raises_stops_the_others_and_its_error_propagates() -> None:
    stopping = asyncio.Event()
    cancelled = asyncio.Event()

    async def healthy() -> None:
        try:
            await _until(stopping)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def dies() -> None:
        await asyncio.sleep(0.05)
        raise ValueError("broken loop")

    with pytest.raises(ValueError, match="broken loop"):
        await asyncio.wait_for(supervise({"a": healthy(), "b": dies()}, stopping, 5), 5)
    assert cancelled.is_set()


async def test_a_loop_that_returns_before_the_stop_is_an_error() -> None:
    stopping = asyncio.Event()

    async def returns() -> None:
        await asyncio.sleep(0.01)

    with pytest.raises(RuntimeError, match="quitter loop ended"):
        await asyncio.wait_for(supervise({"quitter": returns()}, stopping, 5), 5)


async def test_a_stop_lets_loops_finish_and_cancels_those_that_do_not() -> None:
    stopping = asyncio.Event()
    finished: list[str] = []

    async def polite() -> None:
        await _until(stopping)
        finished.append("polite")

    async def stubborn() -> None:
        await asyncio.sleep(3600)

    asyncio.get_running_loop().call_later(0.05, stopping.set)
    began = asyncio.get_running_loop().time()
    await asyncio.wait_for(supervise({"a": polite(), "b": stubborn()}, stopping, 0.2), 5)
    assert finished == ["polite"]
    assert asyncio.get_running_loop().time() - began < 2

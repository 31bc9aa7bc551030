"""The bounded buffer and the Kafka sender: a broker outage loses nothing within the bound."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import orjson
import pytest
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError
from prometheus_client import CollectorRegistry

from agents.metrics import BufferMetrics
from agents.publisher import DryRunPublisher, EventBuffer, KafkaPublisher, Outgoing
from runtime.kafka import KafkaSettings
from schemas.events import PodInfo, make_event

LABELS = {"cluster": "c", "node": "n"}


def _items(n: int, start: int = 0) -> list[Outgoing]:
    """Event i is dated i seconds after the epoch."""
    return [
        Outgoing("t", str(i).encode(), str(i).encode(), event_time_ms=i * 1000)
        for i in range(start, start + n)
    ]


class FakeClock:
    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def _metrics(clock: FakeClock | None = None) -> tuple[BufferMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    wall_clock_s = clock if clock is not None else FakeClock(0.0)
    metrics = BufferMetrics(registry, "gpuledger_agent", "c", "n", wall_clock_s=wall_clock_s)
    return metrics, registry


def _oldest_age_s(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("gpuledger_agent_buffer_oldest_age_seconds", LABELS)


def test_buffer_drops_oldest_beyond_its_bound_and_counts_them() -> None:
    metrics, registry = _metrics()
    buffer = EventBuffer(5, metrics)
    buffer.put(_items(8))
    assert len(buffer) == 5
    assert [i.key for i in buffer.take(10)] == [b"3", b"4", b"5", b"6", b"7"]
    labels = {"cluster": "c", "node": "n"}
    assert registry.get_sample_value("gpuledger_agent_buffer_dropped_total", labels) == 3
    assert registry.get_sample_value("gpuledger_agent_buffer_events", labels) == 0


def test_oldest_age_is_zero_while_nothing_is_buffered() -> None:
    clock = FakeClock(1_000.0)
    metrics, registry = _metrics(clock)
    assert _oldest_age_s(registry) == 0
    buffer = EventBuffer(10, metrics)
    buffer.put(_items(2))
    buffer.take(10)
    buffer.acknowledge()
    assert buffer.oldest_event_time_ms() is None
    assert _oldest_age_s(registry) == 0


def test_oldest_age_is_now_minus_the_head_event_time_and_grows_while_waiting() -> None:
    clock = FakeClock(100.0)
    metrics, registry = _metrics(clock)
    buffer = EventBuffer(10, metrics)
    buffer.put(_items(3, start=40))  # events at 40 s, 41 s, 42 s
    assert _oldest_age_s(registry) == 60
    clock.now_s = 3_700.0  # the broker stays away; nothing is put or taken
    assert _oldest_age_s(registry) == 3_660


def test_oldest_age_counts_the_batch_out_until_acknowledged_then_the_next_oldest() -> None:
    clock = FakeClock(100.0)
    metrics, registry = _metrics(clock)
    buffer = EventBuffer(10, metrics)
    buffer.put(_items(5, start=10))  # 10 s .. 14 s
    batch = buffer.take(2)
    assert len(buffer) == 3
    assert _oldest_age_s(registry) == 90  # 10 s is out but not in Kafka yet
    buffer.put_back(batch)
    assert _oldest_age_s(registry) == 90
    buffer.take(2)
    buffer.acknowledge()
    assert _oldest_age_s(registry) == 88  # next oldest: 12 s


def test_oldest_age_follows_overflow_drops() -> None:
    clock = FakeClock(100.0)
    metrics, registry = _metrics(clock)
    buffer = EventBuffer(3, metrics)
    buffer.put(_items(5))  # 0 s and 1 s dropped
    assert _oldest_age_s(registry) == 98


def test_put_back_keeps_order_ahead_of_newer_events() -> None:
    buffer = EventBuffer(100)
    buffer.put(_items(4))
    batch = buffer.take(3)
    buffer.put(_items(2, start=4))
    buffer.put_back(batch)
    assert [i.key for i in buffer.take(10)] == [b"0", b"1", b"2", b"3", b"4", b"5"]


class FlakyProducer:
    """Stands in for AIOKafkaProducer during an outage: start and send fail while `down`."""

    def __init__(self, world: dict[str, Any]) -> None:
        self.world = world

    async def start(self) -> None:
        if self.world["down"]:
            raise KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9)]")

    async def stop(self) -> None:
        return None

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.world["down"]:
            future.set_exception(KafkaTimeoutError())
        else:
            self.world["sent"].append(value)
            future.set_result(None)
        return future


def _event(i: int) -> Any:
    info = PodInfo("c", f"uid-{i}", "ns", f"pod-{i}", "node")
    return make_event(info, event_id=f"uid-{i}:1", source="test", time_ms=1_000 + i)


async def test_outage_loses_nothing_and_keeps_order() -> None:
    world: dict[str, Any] = {"down": True, "sent": []}
    clock = FakeClock(61.0)
    metrics, registry = _metrics(clock)
    publisher = KafkaPublisher(
        KafkaSettings(),
        [],
        metrics,
        retry_max_s=0.05,
        producer_factory=lambda _: FlakyProducer(world),
    )
    await publisher.start()
    for i in range(50):
        publisher.publish("gpuledger.pods", f"uid-{i}", _event(i))
        await asyncio.sleep(0.002)
    assert world["sent"] == []
    assert _oldest_age_s(registry) == 60  # the first event, dated 1 s, waits
    world["down"] = False
    for i in range(50, 60):
        publisher.publish("gpuledger.pods", f"uid-{i}", _event(i))
    for _ in range(200):
        if len(world["sent"]) >= 60:
            break
        await asyncio.sleep(0.01)
    await publisher.stop()
    ids = [orjson.loads(v)["id"] for v in world["sent"]]
    assert ids == [f"uid-{i}:1" for i in range(60)]
    assert _oldest_age_s(registry) == 0
    assert (
        registry.get_sample_value(
            "gpuledger_agent_publish_errors_total", {"cluster": "c", "node": "n"}
        )
        >= 1
    )
    assert (
        registry.get_sample_value(
            "gpuledger_agent_events_published_total", {"cluster": "c", "node": "n"}
        )
        == 60
    )


async def test_a_dead_sender_fails_loudly() -> None:
    metrics, _ = _metrics()

    def broken(_: KafkaSettings) -> Any:
        raise RuntimeError("bug in the sender")

    publisher = KafkaPublisher(KafkaSettings(), [], metrics, producer_factory=broken)
    await publisher.start()
    await asyncio.sleep(0.05)
    with pytest.raises(Exception, match="sender died"):
        publisher.check()
    await publisher.stop()


async def test_dry_run_prints_one_json_line_per_event() -> None:
    out = io.StringIO()
    publisher = DryRunPublisher(out=out)
    publisher.publish("gpuledger.pods", "uid-1", _event(1))
    publisher.publish("gpuledger.pods", "uid-2", _event(2))
    lines = out.getvalue().splitlines()
    assert [orjson.loads(line)["id"] for line in lines] == ["uid-1:1", "uid-2:1"]

"""The log of dead letters already written stays bounded: keys older than its horizon are
forgotten, at most `max_keys` are kept, and a start reads only the recent part of the topic."""

from __future__ import annotations

import time

from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from hypothesis import given
from hypothesis import strategies as st

from runtime.horizon import LATE_HORIZON_S
from runtime.kafka import KafkaSettings
from streams.worker.intake import DEAD_LETTER_HORIZON_S, DeadLetterLog
from streams.worker.outbox import Outbox
from streams.worker.tables import load_dead_letter_keys


class Clock:
    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def record(offset: int) -> ConsumerRecord:
    return ConsumerRecord("gpuledger.gpu-samples", 0, offset, 0, 0, b"k", b"v", None, 1, 1, ())


def test_the_default_horizon_is_the_late_horizon_and_an_hour() -> None:
    assert DEAD_LETTER_HORIZON_S == LATE_HORIZON_S + 3600
    assert DeadLetterLog().horizon_s == DEAD_LETTER_HORIZON_S


def test_a_letter_is_written_once_while_its_key_is_within_the_horizon() -> None:
    clock = Clock(1_000_000.0)
    log = DeadLetterLog(horizon_s=600, clock=clock)
    outbox = Outbox()
    assert log.add(outbox, record(1), "too_late", "old")
    assert not log.add(outbox, record(1), "too_late", "old")
    assert log.add_window(outbox, ("gpuledger.gpu-samples", 0), 5, 9, "w|dev", "unemittable", "")
    assert not log.add_window(outbox, ("gpuledger.gpu-samples", 0), 5, 9, "w|dev", "x", "")
    assert len(outbox.messages) == 2 and len(log) == 2
    clock.now_s += 601
    assert log.add(outbox, record(2), "too_late", "old")  # noting one expires the old ones
    assert b"gpuledger.gpu-samples|0|1" not in log and len(log) == 1
    assert log.add(outbox, record(1), "too_late", "old"), "forgotten: written again"
    assert log.evicted == 0


def test_a_letter_older_than_the_horizon_is_not_kept() -> None:
    log = DeadLetterLog(horizon_s=600, clock=Clock(10_000.0))
    assert not log.remember(b"old", 10_000.0 - 601)
    assert log.remember(b"new", 10_000.0 - 599)
    assert b"old" not in log and b"new" in log


def test_at_most_max_keys_are_kept_the_oldest_evicted_first() -> None:
    clock = Clock(5_000.0)
    log = DeadLetterLog(max_keys=3, clock=clock)
    outbox = Outbox()
    for offset in range(5):
        clock.now_s += 1
        assert log.add(outbox, record(offset), "too_late", "")
    assert len(log) == 3 and log.evicted == 2
    kept = [offset for offset in range(5) if f"gpuledger.gpu-samples|0|{offset}".encode() in log]
    assert kept == [2, 3, 4]


@given(
    st.lists(st.tuples(st.binary(min_size=1, max_size=3), st.integers(0, 50)), max_size=60),
    st.integers(1, 8),
)
def test_the_log_holds_the_newest_keys_within_the_horizon(
    notes: list[tuple[bytes, int]], max_keys: int
) -> None:
    """Noted in time order (as the worker writes them): the log holds exactly the last
    `max_keys` distinct keys noted, among those within the horizon."""
    log = DeadLetterLog(horizon_s=10, max_keys=max_keys)
    now = 0
    latest: dict[bytes, int] = {}
    for key, step in notes:
        now += step
        log.remember(key, now, now)
        latest.pop(key, None)
        latest[key] = now
        assert len(log) <= max_keys
    within = [key for key, written in latest.items() if written >= now - 10]
    want = set(within[-max_keys:])
    assert {key for key in latest if key in log} == want


async def _dead_letter_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
        )
    finally:
        await admin.close()


async def test_a_start_reads_the_letters_within_the_horizon_only(
    kafka_bootstrap: str, topic_name: str
) -> None:
    await _dead_letter_topic(kafka_bootstrap, topic_name, 3)
    now = time.time()
    old_ms, new_ms = int((now - 7200) * 1000), int((now - 60) * 1000)
    letters = [  # (partition, key, timestamp)
        *[(0, f"old-0-{i}".encode(), old_ms + i) for i in range(5)],
        *[(0, f"new-0-{i}".encode(), new_ms + i) for i in range(3)],
        (0, b"stale-after-new", old_ms),  # an older stamp after the start: read, not kept
        *[(1, f"old-1-{i}".encode(), old_ms + i) for i in range(4)],  # nothing recent
        *[(2, f"new-2-{i}".encode(), new_ms + i) for i in range(2)],
    ]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for partition, key, stamp in letters:
            await producer.send_and_wait(
                topic_name, b"{}", key=key, partition=partition, timestamp_ms=stamp
            )
    finally:
        await producer.stop()

    settings = KafkaSettings(bootstrap=kafka_bootstrap)
    log = DeadLetterLog(horizon_s=3600)
    read = await load_dead_letter_keys(settings, 3, log, topic=topic_name, now_s=now)
    assert read == 3 + 1 + 2, "each partition is read from its first recent record"
    recent = {key for _, key, stamp in letters if stamp == new_ms or stamp > new_ms}
    assert {key for _, key, _ in letters if key in log} == recent
    assert len(log) == 5 and log.evicted == 0

    capped = DeadLetterLog(horizon_s=3600, max_keys=2)
    assert await load_dead_letter_keys(settings, 3, capped, topic=topic_name, now_s=now) == 6
    assert len(capped) == 2 and capped.evicted == 3

    later = DeadLetterLog(horizon_s=30)  # every letter older than the horizon: nothing read
    assert await load_dead_letter_keys(settings, 3, later, topic=topic_name, now_s=now) == 0
    assert len(later) == 0

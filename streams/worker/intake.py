"""Decoding, dead letters and input counters, shared by every handler (`Intake`), and the log
of dead letters already written (`DeadLetterLog`), so a replay writes none twice (design §2)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import orjson
from aiokafka import ConsumerRecord

from runtime.horizon import LATE_HORIZON_S
from schemas.events import (
    DEAD_LETTER_TOPIC,
    Decoded,
    Ok,
    Rejected,
    decode_event,
    format_time,
)
from streams.metrics import WorkerMetrics
from streams.worker.device_stage import DUPLICATE, LATE, TOO_LATE, Unemittable
from streams.worker.outbox import MAX_LETTER_BYTES, Outbox, dead_letter_key, dead_letter_message
from streams.worker.watermark import HeldOffsets, Partition

log = logging.getLogger("gpuledger.worker")

TOO_LATE_DETAIL = "event time is older than the retention"
CLOCK_SKEW = "clock_skew"
UNEMITTABLE = "unemittable"


def moment(time_ms: int | None) -> str:
    """A time for a detail text; one that is no date says so instead of raising."""
    if time_ms is None:
        return "none"
    try:
        return format_time(time_ms)
    except (ValueError, OverflowError, OSError):
        return f"{time_ms} ms since 1970 (not a date)"


DEAD_LETTER_HORIZON_S = LATE_HORIZON_S + 3600
DEAD_LETTER_MAX_KEYS = 1_000_000


class DeadLetterLog:
    """Keys of the dead letters written lately, so a replay does not write a record twice.

    A replay reaches back no further than the committed offsets, which trail event time by at
    most the late horizon: a letter written more than `horizon_s` ago (default the late horizon
    plus an hour) is for a record no replay reads again, so its key is forgotten. At most
    `max_keys` are kept: beyond that the oldest noted is forgotten and counted in `evicted`
    (should its record be replayed after all, its letter is written a second time). Keys are
    forgotten in the order they were noted, so each lasts at most `horizon_s` after that.

    The letters it builds stay within `max_letter_bytes`: a record too large to travel in one
    is dead-lettered by reference (design §2).
    """

    __slots__ = ("_written", "clock", "evicted", "horizon_s", "max_keys", "max_letter_bytes")

    def __init__(
        self,
        horizon_s: float = DEAD_LETTER_HORIZON_S,
        max_keys: int = DEAD_LETTER_MAX_KEYS,
        clock: Callable[[], float] = time.time,
        max_letter_bytes: int = MAX_LETTER_BYTES,
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, not {max_keys}")
        self.horizon_s = horizon_s
        self.max_keys = max_keys
        self.max_letter_bytes = max_letter_bytes
        self.clock = clock
        self._written: dict[bytes, float] = {}  # key -> when its letter was written, as noted
        self.evicted = 0  # keys forgotten because of `max_keys`

    def __contains__(self, key: object) -> bool:
        return key in self._written

    def __len__(self) -> int:
        return len(self._written)

    def remember(self, key: bytes, written_s: float, now_s: float | None = None) -> bool:
        """Note a letter already in the topic, written at `written_s`; False (not kept) when
        that is longer ago than the horizon."""
        now = self.clock() if now_s is None else now_s
        self.expire(now)
        if written_s < now - self.horizon_s:
            return False
        previous = self._written.pop(key, None)
        self._written[key] = written_s if previous is None else max(previous, written_s)
        if len(self._written) > self.max_keys:
            del self._written[next(iter(self._written))]
            self.evicted += 1
        return True

    def expire(self, now_s: float) -> None:
        """Forget the keys noted first whose letters are older than the horizon."""
        written, oldest_s = self._written, now_s - self.horizon_s
        while written:
            key, written_s = next(iter(written.items()))
            if written_s >= oldest_s:
                return
            del written[key]

    def add(self, outbox: Outbox, msg: ConsumerRecord, reason: str, detail: str) -> bool:
        key = dead_letter_key(msg.topic, msg.partition, msg.offset)
        if key in self._written:
            return False
        now = self.clock()
        self.remember(key, now, now)
        outbox.messages.append(
            dead_letter_message(
                msg.topic,
                msg.partition,
                msg.offset,
                msg.key,
                msg.value,
                reason,
                detail,
                now,
                max_bytes=self.max_letter_bytes,
            )
        )
        return True

    def add_window(
        self,
        outbox: Outbox,
        partition: Partition,
        first: int,
        last: int | None,
        window: str,
        reason: str,
        detail: str,
    ) -> bool:
        """A letter for a window's inputs on one partition, offsets `first` to `last` (their
        bytes stay in the input topic); keyed by the window too, so a replay writes it once."""
        topic, number = partition
        key = dead_letter_key(topic, number, first) + b"|window|" + window.encode()
        if key in self._written:
            return False
        now = self.clock()
        self.remember(key, now, now)
        _, _, body, _ = dead_letter_message(topic, number, first, None, None, reason, detail, now)
        doc = orjson.loads(body)
        doc["last_offset"] = last
        doc["window"] = window
        outbox.messages.append((DEAD_LETTER_TOPIC, key, orjson.dumps(doc), key))
        return True


class Intake:
    """Decoding, dead letters and input counters, shared by every handler."""

    def __init__(self, metrics: WorkerMetrics, dead_letters: DeadLetterLog) -> None:
        self.metrics = metrics
        self.dead_letters = dead_letters

    def reject(self, msg: ConsumerRecord, outbox: Outbox, reason: str, detail: str) -> None:
        self.metrics.event_rejected(msg.topic, reason)
        if self.dead_letters.add(outbox, msg, reason, detail):
            self.metrics.dead_lettered(msg.topic, reason)

    def decode(self, msg: ConsumerRecord, expected_type: str, outbox: Outbox) -> Ok | None:  # type: ignore[type-arg]
        decoded = decode_event(msg.value)
        if isinstance(decoded, Ok) and decoded.event.type == expected_type:
            return decoded
        self.reject_decoded(msg, decoded, outbox)
        return None

    def reject_decoded(self, msg: ConsumerRecord, decoded: Decoded, outbox: Outbox) -> None:
        """Dead-letter a record that did not decode, or decoded to another topic's type."""
        if isinstance(decoded, Rejected):
            self.reject(msg, outbox, decoded.reason, decoded.detail)
        else:
            kind = decoded.event.type
            self.reject(msg, outbox, "wrong_topic", f"{kind} does not belong on {msg.topic}")

    def reject_window(
        self, outbox: Outbox, failed: Unemittable, held: HeldOffsets, what: str
    ) -> None:
        """Dead-letter the inputs of a window whose rows cannot be emitted (the stage dropped
        it and released its offsets): one letter per input partition it held."""
        window = f"{failed.window_start_ms}|{failed.unit}"
        log.warning(
            "%s %s, window %s: rows cannot be emitted, inputs dead-lettered: %s",
            what,
            failed.unit,
            moment(failed.window_start_ms),
            failed.error,
        )
        for partition, first in sorted(failed.held.items()):
            last = held.last_read(partition)
            detail = (
                f"the rows of {what} {failed.unit} in the window starting "
                f"{moment(failed.window_start_ms)} cannot be emitted ({failed.error}); its "
                f"inputs are among offsets {first} to {last} of {partition[0]} partition "
                f"{partition[1]}"
            )
            self.metrics.event_rejected(partition[0], UNEMITTABLE)
            if self.dead_letters.add_window(
                outbox, partition, first, last, window, UNEMITTABLE, detail
            ):
                self.metrics.dead_lettered(partition[0], UNEMITTABLE)

    def count(self, status: str, msg: ConsumerRecord, outbox: Outbox) -> None:
        """Count one event by what the stage made of it (a too-late one is dead-lettered)."""
        if status == DUPLICATE:
            self.metrics.events_duplicate(msg.topic)
        elif status == TOO_LATE:
            self.reject(msg, outbox, "too_late", TOO_LATE_DETAIL)
        else:
            self.metrics.events_used(msg.topic)
            if status == LATE:
                self.metrics.events_late(msg.topic)

"""Decoding, dead letters and input counters, shared by every handler (`Intake`), and the log
of dead letters already written (`DeadLetterLog`), so a replay writes none twice (design §2)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import orjson
from aiokafka import ConsumerRecord

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
from streams.worker.outbox import Outbox, dead_letter_key, dead_letter_message
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


@dataclass
class DeadLetterLog:
    """Keys already in the dead-letter topic, so a replay does not write a record twice."""

    seen: set[bytes] = field(default_factory=set)

    def add(self, outbox: Outbox, msg: ConsumerRecord, reason: str, detail: str) -> bool:
        key = dead_letter_key(msg.topic, msg.partition, msg.offset)
        if key in self.seen:
            return False
        self.seen.add(key)
        outbox.messages.append(
            dead_letter_message(
                msg.topic,
                msg.partition,
                msg.offset,
                msg.key,
                msg.value,
                reason,
                detail,
                time.time(),
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
        if key in self.seen:
            return False
        self.seen.add(key)
        _, _, body, _ = dead_letter_message(
            topic, number, first, None, None, reason, detail, time.time()
        )
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

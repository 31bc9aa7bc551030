"""Dead letters stay small whatever they are given: the detail is cut to DETAIL_CHARS and says
how long it was; the original bytes travel whole while the letter fits MAX_LETTER_BYTES, and
beyond that the letter points at them where they stay, in the input topic at their offset."""

from __future__ import annotations

import base64
from typing import Any

import orjson
from aiokafka import ConsumerRecord
from prometheus_client import CollectorRegistry
from row_builders import cost_row

from schemas.events import DEAD_LETTER_TOPIC, GPU_SAMPLES_TOPIC
from streams.metrics import WorkerMetrics
from streams.worker.intake import DeadLetterLog, Intake
from streams.worker.outbox import (
    DETAIL_CHARS,
    MAX_LETTER_BYTES,
    Outbox,
    dead_letter_message,
    refused_message_letter,
    unstorable_row_message,
)

START_MS = 1_795_046_400_000


def record(value: bytes, key: bytes = b"GPU-1", offset: int = 12) -> ConsumerRecord:
    return ConsumerRecord(
        GPU_SAMPLES_TOPIC, 1, offset, 0, 0, key, value, None, len(key), len(value), ()
    )


def event_with_type(kind: str) -> bytes:
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": "e-1",
            "source": "agent/n1",
            "type": kind,
            "time": "2026-11-20T00:00:00Z",
            "data": {},
        }
    )


def rejected(msg: ConsumerRecord, log: DeadLetterLog | None = None) -> tuple[bytes, dict[str, Any]]:
    """The one letter an intake writes for `msg`, which is not a GPU sample."""
    outbox = Outbox()
    intake = Intake(WorkerMetrics(CollectorRegistry()), DeadLetterLog() if log is None else log)
    assert intake.decode(msg, "io.gpuledger.gpu.sample.v1", outbox) is None
    [(topic, _, value, _)] = outbox.messages
    assert topic == DEAD_LETTER_TOPIC
    return value, orjson.loads(value)


def test_a_100_kb_type_gives_a_bounded_detail_and_the_whole_record() -> None:
    raw = event_with_type("t" * 100_000)
    encoded, letter = rejected(record(raw))
    assert letter["reason"] in {"unknown_type", "too_long"}  # whichever the decoder names
    assert len(letter["detail"]) <= DETAIL_CHARS == 1000
    assert base64.b64decode(letter["value_base64"]) == raw  # the original bytes, whole
    assert base64.b64decode(letter["key_base64"]) == b"GPU-1"
    assert letter["value_bytes"] == len(raw) and letter["by_reference"] is False
    assert len(encoded) < 140_000


def test_a_100_000_character_detail_is_cut_whoever_wrote_it() -> None:
    outbox = Outbox()
    intake = Intake(WorkerMetrics(CollectorRegistry()), DeadLetterLog())
    intake.reject(record(b"{}"), outbox, "unknown_type", "type " + "t" * 99_995)
    [(_, _, value, _)] = outbox.messages
    detail = orjson.loads(value)["detail"]
    assert len(detail) == DETAIL_CHARS and detail.startswith("type ttt")
    assert detail.endswith("\u2026 (100,000 characters)")  # says it was cut, and from how long


def test_a_short_detail_is_left_as_it_is() -> None:
    _, _, value, _ = dead_letter_message(GPU_SAMPLES_TOPIC, 0, 1, None, b"x", "empty", "short", 0)
    assert orjson.loads(value)["detail"] == "short"


def test_a_record_whose_letter_would_pass_the_limit_is_dead_lettered_by_reference() -> None:
    raw = b"{" * 900_000  # fits the broker as an input, not base64-encoded in a letter
    encoded, letter = rejected(record(raw))
    assert len(encoded) <= MAX_LETTER_BYTES == 1_000_000
    assert letter["by_reference"] is True and letter["value_base64"] is None
    assert (letter["topic"], letter["partition"], letter["offset"]) == (GPU_SAMPLES_TOPIC, 1, 12)
    assert letter["value_bytes"] == 900_000 and letter["reason"] == "invalid_json"
    assert base64.b64decode(letter["key_base64"]) == b"GPU-1"  # a short key still travels
    assert f"stays in {GPU_SAMPLES_TOPIC} partition 1 at offset 12" in letter["detail"]
    assert len(letter["detail"]) <= DETAIL_CHARS


def letter_for(size: int, limit: int) -> dict[str, Any]:
    value = b"x" * size
    _, _, letter, _ = dead_letter_message(
        GPU_SAMPLES_TOPIC, 0, 3, b"k", value, "invalid_json", "not JSON", 0, max_bytes=limit
    )
    assert len(letter) <= limit
    return orjson.loads(letter)


def test_the_largest_record_that_fits_travels_whole_and_one_byte_more_does_not() -> None:
    _, _, whole, _ = dead_letter_message(
        GPU_SAMPLES_TOPIC, 0, 3, b"k", b"x" * 3000, "invalid_json", "not JSON", 0
    )
    assert letter_for(3000, len(whole))["by_reference"] is False
    assert letter_for(3001, len(whole))["by_reference"] is True


def test_a_huge_key_is_left_out_too() -> None:
    _, letter = rejected(record(b"not json", key=b"k" * 900_000))
    assert letter["by_reference"] is True
    assert letter["key_base64"] is None and letter["key_bytes"] == 900_000
    assert letter["value_base64"] is None  # the record's bytes are read back whole, at its offset


def test_the_log_takes_its_limit() -> None:
    log = DeadLetterLog(max_letter_bytes=5_000)
    encoded, letter = rejected(record(b"{" * 4_000), log)
    assert len(encoded) <= 5_000 and letter["by_reference"] is True


def test_an_unstorable_row_too_large_for_a_letter_leaves_out_its_json() -> None:
    row = cost_row(START_MS, "gpu-a", team="t" * 900_000)
    _, _, value, _ = unstorable_row_message(row, "ValueError: " + "e" * 50_000, 0)
    letter = orjson.loads(value)
    assert len(value) <= MAX_LETTER_BYTES
    assert letter["value_base64"] is None and letter["value_bytes"] > 900_000
    assert letter["by_reference"] is False  # a row has no offset to read it back from
    assert len(letter["detail"]) <= DETAIL_CHARS and "original bytes omitted" in letter["detail"]


def test_a_letter_the_broker_refuses_anyway_goes_again_by_reference() -> None:
    message = dead_letter_message(
        GPU_SAMPLES_TOPIC, 2, 7, b"k", b"{" * 90_000, "invalid_json", "bad " * 2000, 0
    )
    _, key, value, _ = refused_message_letter(message, "MessageSizeTooLargeError", 0)
    letter = orjson.loads(value)
    assert key == b"gpuledger.gpu-samples|2|7"
    assert letter["value_base64"] is None and letter["by_reference"] is True
    assert letter["value_bytes"] == 90_000
    assert "stays in gpuledger.gpu-samples partition 2 at offset 7" in letter["detail"]
    assert len(letter["detail"]) <= DETAIL_CHARS

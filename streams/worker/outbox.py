"""The worker's output waiting to be written (`Outbox`) and the messages it is made of: billing
rows, dead letters of inputs (design §2) and of output the sinks refused for good, each kept
below the broker's size limit, with error texts that never show credentials.

A dead letter is bounded whoever built its detail: the detail is cut to DETAIL_CHARS (saying how
long it was), and the original bytes travel whole only while the letter stays within
MAX_LETTER_BYTES. Beyond that the letter carries where the record is (topic, partition, offset),
its size and the reason, and the bytes stay in the input topic at that offset."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import orjson

from runtime.redaction import redact
from schemas.events import DEAD_LETTER_TOPIC, format_time
from streams.rows import Row, WindowStateRow, as_json

CLICKHOUSE = "clickhouse"
KAFKA = "kafka"
DETAIL_CHARS = 1000  # a dead letter's detail (an error text) is cut to this
# The largest dead letter built with the original bytes in it. A topic takes record batches up
# to its max.message.bytes (Kafka's default 1,048,588, which the worker's topics keep) and the
# producer requests up to max_request_size (aiokafka's default 1,048,576): this leaves room for
# the batch and record headers and the letter's key. A letter refused all the same (a topic
# configured lower) is sent again without the bytes (`refused_message_letter`).
MAX_LETTER_BYTES = 1_000_000
MAX_LETTER_KEY_BYTES = 1000  # a longer original key is left out of a shrunk dead letter
UNSTORABLE = "unstorable"  # ClickHouse refused the row
MESSAGE_TOO_LARGE = "message_too_large"  # the broker refused the message for its size


@dataclass
class Outbox:
    """Output waiting for the next flush."""

    rows: list[Row] = field(default_factory=list)
    # (topic, key, value, route): route is a partition number, or the bytes whose hash picks
    # the partition as Kafka's default partitioner would (murmur2)
    messages: list[tuple[str, bytes, bytes, int | bytes]] = field(default_factory=list)
    # The checkpoints among `rows`, by (stage, window start, unit): the latest state of a
    # window that ClickHouse may not have yet (a stage restoring a window looks here first).
    states: dict[tuple[str, int, str], bytes] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows) + len(self.messages)

    def add_states(self, states: list[WindowStateRow]) -> None:
        self.rows += states
        for row in states:
            self.states[(row.stage, row.window_start_ms, row.unit)] = row.state

    def take(self) -> Outbox:
        taken = Outbox(self.rows, self.messages, self.states)
        self.rows, self.messages, self.states = [], [], {}
        return taken

    def restore(self, taken: Outbox) -> None:
        """Put back what `take` took (it was not written), before what was added since."""
        self.rows[:0] = taken.rows
        self.messages[:0] = taken.messages
        self.states = {**taken.states, **self.states}


Message = tuple[str, bytes, bytes, int | bytes]


def row_message(topic: str, row: Row, route: bytes) -> Message:
    """A billing-topic message; `route` (device or pod uid) keeps a key on one partition."""
    return topic, row.key.encode(), orjson.dumps(as_json(row)), route


def dead_letter_message(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    reason: str,
    detail: str,
    now_s: float,
    *,
    max_bytes: int = MAX_LETTER_BYTES,
) -> Message:
    """The original bytes travel base64-encoded beside where they came from and why, or, where
    the letter would outgrow `max_bytes`, stay in the input topic at that offset."""
    body = _letter(topic, partition, offset, key, value, reason, detail, now_s, max_bytes)
    key = dead_letter_key(topic, partition, offset)
    return DEAD_LETTER_TOPIC, key, orjson.dumps(body), key


def dead_letter_key(topic: str, partition: int, offset: int) -> bytes:
    return f"{topic}|{partition}|{offset}".encode()


def unstorable_row_message(
    row: Row, error: str, now_s: float, *, max_bytes: int = MAX_LETTER_BYTES
) -> Message:
    """A row ClickHouse refused, as a dead letter: `topic` is its table (`partition` and
    `offset` are null, `sink` is "clickhouse"), the original bytes are its key and its
    billing-topic JSON (left out where the letter would outgrow `max_bytes`: a row has no
    offset to be read back from, its key and version name it), the detail is the error. Keyed
    by table, row key and version, so a replay writes the same letter again, not another."""
    value = orjson.dumps(as_json(row), default=str)
    key = row.key.encode()
    body = _letter(row.TABLE, None, None, key, value, UNSTORABLE, error, now_s, max_bytes)
    body["sink"] = CLICKHOUSE
    key = f"{UNSTORABLE}|{row.TABLE}|{row.key}|{row.version}".encode()
    return DEAD_LETTER_TOPIC, key, orjson.dumps(body), key


def refused_message_letter(message: Message, error: str, now_s: float) -> Message:
    """What replaces a message the broker refused for its size: for a dead letter, the same
    letter without the original bytes; for any other message, a small dead letter naming its
    topic, partition (when known) and key (`sink` is "kafka")."""
    topic, key, value, route = message
    body = _json_object(value) if topic == DEAD_LETTER_TOPIC else None
    if body is not None:
        drop_key = len(body.get("key_base64") or "") > MAX_LETTER_KEY_BYTES
        why = f"the {len(value):,}-byte letter was refused ({error})"
        _leave_out_bytes(body, why, drop_key=drop_key)
        return topic, key, orjson.dumps(body), route
    partition = route if isinstance(route, int) else None
    short_key = key if len(key) <= MAX_LETTER_KEY_BYTES else None
    detail = f"the {len(value)}-byte message was refused: {error}"
    body = _letter(topic, partition, None, short_key, None, MESSAGE_TOO_LARGE, detail, now_s)
    body["sink"] = KAFKA
    letter_key = f"{MESSAGE_TOO_LARGE}|{topic}|".encode() + key[:MAX_LETTER_KEY_BYTES]
    return DEAD_LETTER_TOPIC, letter_key, orjson.dumps(body), letter_key


def _json_object(value: bytes) -> dict[str, Any] | None:
    try:
        body = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def _letter(
    topic: str,
    partition: int | None,
    offset: int | None,
    key: bytes | None,
    value: bytes | None,
    reason: str,
    detail: str,
    now_s: float,
    max_bytes: int = MAX_LETTER_BYTES,
) -> dict[str, Any]:
    """A letter's fields; the original bytes are left out where they would take the encoded
    letter past `max_bytes` (the key too, where it alone would)."""
    body: dict[str, Any] = {
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "reason": reason,
        "detail": _cut(detail),
        "key_base64": None,
        "value_base64": None,
        "key_bytes": len(key) if key is not None else None,
        "value_bytes": len(value) if value is not None else None,
        "by_reference": False,
        "dead_lettered_at": format_time(int(now_s * 1000)),
    }
    # "null" gives way to the quoted base64 text: the size is known before encoding it
    bare = len(orjson.dumps(body))
    if bare + _quoted_base64_bytes(key) + _quoted_base64_bytes(value) - 8 <= max_bytes:
        body["key_base64"] = _base64(key)
        body["value_base64"] = _base64(value)
        return body
    body["key_base64"] = _base64(key)
    _leave_out_bytes(body, f"the letter would pass {max_bytes:,} bytes", detail=detail)
    if key is not None and len(orjson.dumps(body)) > max_bytes:
        body["key_base64"] = None  # the key alone is too large: it stays with the value
    return body


def _leave_out_bytes(
    body: dict[str, Any], why: str, *, drop_key: bool = False, detail: str | None = None
) -> None:
    """Take the original value (and the key, with `drop_key`) out of a letter, and say at the
    head of its detail (`detail`, or the letter's own) why and where the bytes are: in the
    input topic at the letter's offset, when it has one (`by_reference`), or nowhere else (a
    refused row: its key and version name it)."""
    body["value_base64"] = None
    if drop_key:
        body["key_base64"] = None
    size = body.get("value_bytes")
    what = f"the {size:,}-byte value" if isinstance(size, int) else "the value"
    if body.get("offset") is not None and body.get("partition") is not None:
        body["by_reference"] = True
        where = f"stays in {body['topic']} partition {body['partition']} at offset {body['offset']}"
    else:
        where = "is not kept elsewhere"
    note = f"original bytes omitted ({why}): {what} {where}"
    text = body.get("detail", "") if detail is None else detail
    body["detail"] = _cut(f"{note}; {text}")


def _base64(raw: bytes | None) -> str | None:
    return base64.b64encode(raw).decode() if raw is not None else None


def _quoted_base64_bytes(raw: bytes | None) -> int:
    """What `raw` takes in a letter: its base64 text in quotes, or `null`."""
    return 4 if raw is None else 4 * ((len(raw) + 2) // 3) + 2


def _cut(text: str, limit: int = DETAIL_CHARS) -> str:
    """`text`, or as much of it as fits `limit` characters with a note of its full length."""
    if len(text) <= limit:
        return text
    note = f"… ({len(text):,} characters)"
    return text[: limit - len(note)] + note


def describe(exc: BaseException) -> str:
    """An error's type and first line, short, with any credentials in it masked."""
    text = str(exc).strip()
    first = redact(text.splitlines()[0]) if text else ""
    return _cut(f"{type(exc).__name__}: {first}" if first else type(exc).__name__, 300)

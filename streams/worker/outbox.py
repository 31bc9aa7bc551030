"""The worker's output waiting to be written (`Outbox`) and the messages it is made of: billing
rows, dead letters of inputs (design §2) and of output the sinks refused for good, each kept
below the broker's size limit, with error texts that never show credentials."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from schemas.events import DEAD_LETTER_TOPIC, format_time
from streams.rows import Row, WindowStateRow, as_json

CLICKHOUSE = "clickhouse"
KAFKA = "kafka"
DETAIL_CHARS = 1000  # a dead letter's detail (an error text) is cut to this
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
) -> Message:
    """The original bytes travel base64-encoded beside where they came from and why."""
    body = _letter(topic, partition, offset, key, value, reason, detail, now_s)
    key = dead_letter_key(topic, partition, offset)
    return DEAD_LETTER_TOPIC, key, orjson.dumps(body), key


def dead_letter_key(topic: str, partition: int, offset: int) -> bytes:
    return f"{topic}|{partition}|{offset}".encode()


def unstorable_row_message(row: Row, error: str, now_s: float) -> Message:
    """A row ClickHouse refused, as a dead letter: `topic` is its table (`partition` and
    `offset` are null, `sink` is "clickhouse"), the original bytes are its key and its
    billing-topic JSON, the detail is the error. Keyed by table, row key and version, so a
    replay writes the same letter again, not another."""
    value = orjson.dumps(as_json(row), default=str)
    body = _letter(row.TABLE, None, None, row.key.encode(), value, UNSTORABLE, error, now_s)
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
        body["value_base64"] = None
        if len(body.get("key_base64") or "") > MAX_LETTER_KEY_BYTES:
            body["key_base64"] = None
        omitted = f"original bytes omitted: the {len(value)}-byte letter was refused ({error})"
        body["detail"] = _cut(f"{omitted}; {body.get('detail', '')}")
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
) -> dict[str, Any]:
    return {
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "reason": reason,
        "detail": _cut(detail),
        "key_base64": base64.b64encode(key).decode() if key is not None else None,
        "value_base64": base64.b64encode(value).decode() if value is not None else None,
        "dead_lettered_at": format_time(int(now_s * 1000)),
    }


def _cut(text: str, limit: int = DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


_CREDENTIALS = re.compile(r"(://[^/@\s:]*:)[^/@\s]*@|((?:password|secret|token)=)[^&\s]+", re.I)


def describe(exc: BaseException) -> str:
    """An error's type and first line, short, with any credentials in it masked."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    masked = _CREDENTIALS.sub(_mask, first)
    return _cut(f"{type(exc).__name__}: {masked}" if masked else type(exc).__name__, 300)


def _mask(match: re.Match[str]) -> str:
    if match.group(1):
        return f"{match.group(1)}***@"
    return f"{match.group(2)}***"

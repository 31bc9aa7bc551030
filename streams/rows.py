"""The output rows of design §4, shared by the ClickHouse sink, the Kafka sink and reports.

Money is Decimal (stored as Decimal(38, 15) in ClickHouse): sums are exact and the same on every
run. Usage (device_seconds) sits beside the price used so a past period can be re-priced.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Any, ClassVar

KIND_USAGE = "usage"
KIND_IDLE = "idle"
KIND_HOST = "host"

HOST = "__host__"
IDLE = "__idle__"
UNTAGGED = "__untagged__"
UNKNOWN = "__unknown__"

# What a row's times can be: ClickHouse's DateTime64(3) range, which RFC 3339 can also write.
ROW_TIME_MIN_MS = -2_208_988_800_000  # 1900-01-01T00:00:00Z
ROW_TIME_MAX_MS = 10_413_791_999_999  # 2299-12-31T23:59:59.999Z


def check_window_times(start_ms: int, end_ms: int) -> None:
    """Raise ValueError when a window's rows could not be stored or written (design §5: such
    a window is dead-lettered, not emitted)."""
    if not (ROW_TIME_MIN_MS <= start_ms <= end_ms <= ROW_TIME_MAX_MS):
        raise ValueError(
            f"window {start_ms}..{end_ms} ms is outside the times a row can hold "
            "(1900-01-01 to 2299-12-31)"
        )


@dataclass(frozen=True, slots=True)
class CostRow:
    TABLE: ClassVar[str] = "gpu_cost_windows"

    window_start_ms: int
    window_end_ms: int
    cluster: str
    node: str
    device_uuid: str
    gpu_uuid: str
    gpu_model: str
    mig_profile: str
    namespace: str
    pod: str
    pod_uid: str
    team: str
    product: str
    cost_center: str
    kind: str
    device_seconds: float
    sm_util_avg: float
    mem_bytes_avg: float
    cost_usd: Decimal
    idle_cost_usd: Decimal
    price_per_hour: Decimal
    pricing: str
    version: int

    @property
    def key(self) -> str:
        return f"{self.window_start_ms}|{self.device_uuid}|{self.pod_uid}"


@dataclass(frozen=True, slots=True)
class TokenRow:
    TABLE: ClassVar[str] = "token_windows"

    window_start_ms: int
    window_end_ms: int
    cluster: str
    namespace: str
    pod: str
    pod_uid: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    requests: int
    cached_tokens: int
    prefill_s: float
    decode_s: float
    version: int

    @property
    def key(self) -> str:
        return f"{self.window_start_ms}|{self.pod_uid}|{self.model}"


@dataclass(frozen=True, slots=True)
class TokenCostRow:
    TABLE: ClassVar[str] = "cost_per_token_windows"

    window_start_ms: int
    window_end_ms: int
    cluster: str
    namespace: str
    pod: str
    pod_uid: str
    team: str
    product: str
    cost_center: str
    model: str
    cost_usd: Decimal
    prompt_tokens: int
    completion_tokens: int
    requests: int
    cached_tokens: int
    prefill_s: float
    decode_s: float
    cost_per_1m_tokens: Decimal | None
    version: int

    @property
    def key(self) -> str:
        return f"{self.window_start_ms}|{self.pod_uid}|{self.model}"


@dataclass(frozen=True, slots=True)
class WindowStateRow:
    """A closed window's checkpoint (design §5): what a restart or a late correction restores
    it from. `stage` is "device" (unit: device uuid) or "pod" (unit: pod uid); `state` is the
    packed window (streams.worker.packing); the highest version per key is the latest."""

    TABLE: ClassVar[str] = "window_state"

    stage: str
    window_start_ms: int
    unit: str
    version: int
    state: bytes
    source: int = -1  # the input partition that fed the window (-1: a mark, not a window)
    owners: tuple[str, ...] = ()  # the pod uids its rows name: found again by pod

    @property
    def key(self) -> str:
        return f"{self.stage}|{self.window_start_ms}|{self.unit}"


@dataclass(frozen=True, slots=True)
class NodeEventRow:
    """One node event of gpuledger.nodes, as published (schemas/clickhouse.sql, `node_events`):
    a node's cloud identity and capacity from `time` on. Unversioned: the same event read again
    is the same row, and ReplacingMergeTree keeps one per (cluster, node, time, event_id)."""

    TABLE: ClassVar[str] = "node_events"

    cluster: str
    node: str
    provider_id: str
    instance_type: str
    gpus: int
    cpu_millicores: int
    memory_bytes: int
    deleted: bool
    time_ms: int
    event_id: str
    gpu_capacity: Mapping[str, int] = field(default_factory=dict)  # GPU resource -> count

    @property
    def key(self) -> str:
        return f"{self.cluster}|{self.node}|{self.time_ms}|{self.event_id}"

    @property
    def window_start_ms(self) -> int:
        """The time the table is partitioned by (toYYYYMM(time)), named as the other rows'."""
        return self.time_ms

    @property
    def version(self) -> int:
        return 0


@dataclass(frozen=True, slots=True)
class PodGpuRequestsRow:
    """One pod event of gpuledger.pods for a pod that requests, or requested, GPU resources
    (schemas/clickhouse.sql, `pod_gpu_requests`): from `time` on, the pod holds `requests`
    (GPU resource -> count; empty: nothing, it finished or was deleted). Owners as on its cost
    rows. Unversioned, as node events: the same event read again is the same row."""

    TABLE: ClassVar[str] = "pod_gpu_requests"

    cluster: str
    node: str
    namespace: str
    pod: str
    pod_uid: str
    team: str
    product: str
    cost_center: str
    requests: Mapping[str, int]
    time_ms: int
    event_id: str

    @property
    def key(self) -> str:
        return f"{self.cluster}|{self.pod_uid}|{self.time_ms}|{self.event_id}"

    @property
    def window_start_ms(self) -> int:
        """The time the table is partitioned by (toYYYYMM(time)), named as the other rows'."""
        return self.time_ms

    @property
    def version(self) -> int:
        return 0


Row = CostRow | TokenRow | TokenCostRow | WindowStateRow | NodeEventRow | PodGpuRequestsRow


def column_names(row_type: type[Row]) -> list[str]:
    """ClickHouse column names: `window_start_ms` is stored as `window_start` (DateTime64(3))."""
    return [f.name.removesuffix("_ms") for f in fields(row_type)]


def as_values(row: Row) -> tuple[Any, ...]:
    """The row's values in column order (no copies: rows are frozen)."""
    getter = _VALUE_GETTERS.get(type(row))
    if getter is None:
        getter = _VALUE_GETTERS[type(row)] = operator.attrgetter(*_field_names(type(row)))
    values: tuple[Any, ...] = getter(row)
    return values


_VALUE_GETTERS: dict[type[Any], Any] = {}


def as_json(row: Row) -> dict[str, Any]:
    """The billing-topic form: money as decimal strings, times as Unix ms and RFC 3339."""
    out: dict[str, Any] = {}
    for name in _field_names(type(row)):
        value = getattr(row, name)
        if name.endswith("_ms"):
            out[name] = value
            out[name[:-3]] = _time_text(value)
        elif isinstance(value, Decimal):
            out[name] = format(value, "f")
        elif isinstance(value, bytes):
            out[name] = value.hex()
        else:
            out[name] = value
    return out


_FIELD_NAMES: dict[type[Any], tuple[str, ...]] = {}


def _field_names(row_type: type[Any]) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(row_type)
    if names is None:
        names = _FIELD_NAMES[row_type] = tuple(f.name for f in fields(row_type))
    return names


@functools.lru_cache(maxsize=4096)
def _time_text(time_ms: int) -> str:
    from schemas.events import format_time

    return format_time(time_ms)

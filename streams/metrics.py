"""Every Prometheus metric the worker exposes, declared once on an injected registry.

Business code calls the named hooks; it never touches prometheus-client directly. Names follow
Prometheus conventions: `gpuledger_` prefix, `_total` counters, base units, `_usd` money.
Series labelled by input partition are removed when the partition is revoked, so a worker
exposes only the partitions it owns.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from streams.rows import KIND_IDLE, UNTAGGED, CostRow

M = TypeVar("M", bound=MetricWrapperBase)

# Event sources (CloudEvent `source`, e.g. `agent/node-7`) come from event data: the first
# MAX_SOURCES get a series of their own, the rest share OTHER_SOURCE.
MAX_SOURCES = 2000
OTHER_SOURCE = "__other__"
CLOCK_SERIES_TTL_S = 900.0  # a source silent this long loses its clock-offset series


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._events = Counter(
            "gpuledger_events_total", "Input events decoded and used", ["topic"], registry=registry
        )
        self._rejected = Counter(
            "gpuledger_events_rejected_total",
            "Input records that could not be used",
            ["topic", "reason"],
            registry=registry,
        )
        self._duplicates = Counter(
            "gpuledger_events_duplicate_total",
            "Input events dropped because their id was already seen",
            ["topic"],
            registry=registry,
        )
        self._late = Counter(
            "gpuledger_events_late_total",
            "Events for closed windows within retention (they re-emit corrected rows)",
            ["topic"],
            registry=registry,
        )
        self._dead_letters = Counter(
            "gpuledger_dead_letters_total",
            "Records written to the dead-letter topic",
            ["topic", "reason"],
            registry=registry,
        )
        self._emit_lag = Histogram(
            "gpuledger_window_emit_lag_seconds",
            "Wall-clock time from a window's end to its rows being written",
            buckets=(1, 5, 10, 15, 30, 60, 120, 300, 900, 3600),
            registry=registry,
        )
        self._consumer_lag = Gauge(
            "gpuledger_consumer_lag_messages",
            "Messages between the worker's position and the partition's end",
            ["topic", "partition"],
            registry=registry,
        )
        self._sink_batch = Histogram(
            "gpuledger_sink_batch_seconds",
            "Time to write one batch to a sink",
            ["sink"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self._sink_failures = Counter(
            "gpuledger_sink_failures_total",
            "Failed attempts to write a batch (retried)",
            ["sink"],
            registry=registry,
        )
        self._idle_burn = Gauge(
            "gpuledger_idle_burn_usd_per_hour",
            "Idle cost rate of a device over its latest closed window",
            ["cluster", "node", "device_uuid"],
            registry=registry,
        )
        self._untagged_rate = Gauge(
            "gpuledger_untagged_cost_usd_per_hour",
            "Cost rate of untagged pods over each device's latest closed window",
            ["cluster"],
            registry=registry,
        )
        self._cost_rate = Gauge(
            "gpuledger_cost_usd_per_hour",
            "Cost rate by team over each device's latest closed window (idle under the "
            "platform team)",
            ["cluster", "team"],
            registry=registry,
        )
        self._unknown_model = Counter(
            "gpuledger_unknown_gpu_model_samples_total",
            "Samples priced at the price book's default because their model is not listed",
            ["gpu_model"],
            registry=registry,
        )
        self._open_windows = Gauge(
            "gpuledger_open_windows", "(window, device) pairs not yet closed", registry=registry
        )
        self._clock_offset = Gauge(
            "gpuledger_clock_offset_seconds",
            "Event time minus Kafka record timestamp of the source's latest event",
            ["source"],
            registry=registry,
        )
        self._clock_skew = Counter(
            "gpuledger_clock_skew_events_total",
            "Events dead-lettered because their time is outside the clock bounds",
            ["topic", "source"],
            registry=registry,
        )
        self._sources: set[str] = set()
        self._offset_seen: dict[str, float] = {}  # source label -> wall time of its last value
        self._next_sweep_s = 0.0
        self._latest: dict[str, tuple[int, list[CostRow]]] = {}
        self._window_s = 60
        self._idle_series: set[tuple[str, str, str]] = set()
        self._team_series: set[tuple[str, str]] = set()
        self._untagged_series: set[str] = set()
        # Label children, cached: `labels()` costs microseconds, and some hooks run per event.
        self._children: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}
        self._lag: dict[tuple[str, int], Gauge] = {}

    def _child(self, metric: M, *labels: str) -> M:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child  # type: ignore[return-value]

    # ------------------------------------------------------------------ input

    def events_used(self, topic: str, count: int = 1) -> None:
        """Events decoded and folded in (late ones included)."""
        self._child(self._events, topic).inc(count)

    def events_late(self, topic: str, count: int = 1) -> None:
        """Events for closed windows within retention: corrections."""
        self._child(self._late, topic).inc(count)

    def events_duplicate(self, topic: str, count: int = 1) -> None:
        self._child(self._duplicates, topic).inc(count)

    def event_rejected(self, topic: str, reason: str) -> None:
        self._rejected.labels(topic, reason).inc()

    def dead_lettered(self, topic: str, reason: str) -> None:
        self._dead_letters.labels(topic, reason).inc()

    def unknown_gpu_model(self, gpu_model: str) -> None:
        """A sample priced at the price book's default."""
        self._unknown_model.labels(gpu_model).inc()

    def _source(self, source: str) -> str:
        """The label for an event source: its own for the first MAX_SOURCES, then shared."""
        if source in self._sources:
            return source
        if len(self._sources) < MAX_SOURCES:
            self._sources.add(source)
            return source
        return OTHER_SOURCE

    def clock_offset(self, source: str, seconds: float, now_s: float) -> None:
        """`source`'s latest event time minus its Kafka record timestamp. Series of sources
        silent for CLOCK_SERIES_TTL_S are removed (checked at most once a minute)."""
        label = self._source(source)
        self._child(self._clock_offset, label).set(seconds)
        self._offset_seen[label] = now_s
        if now_s >= self._next_sweep_s:
            self._next_sweep_s = now_s + 60.0
            for stale in [
                s for s, t in self._offset_seen.items() if now_s - t > CLOCK_SERIES_TTL_S
            ]:
                del self._offset_seen[stale]
                self._children.pop((id(self._clock_offset), (stale,)), None)
                self._clock_offset.remove(stale)

    def clock_skewed(self, topic: str, source: str) -> None:
        """An event of `source` dead-lettered as `clock_skew`."""
        self._child(self._clock_skew, topic, self._source(source)).inc()

    # ------------------------------------------------------------------ partitions

    def partition_lag(self, topic: str, partition: int, lag: int) -> None:
        """Messages between the worker's position in a partition and its end."""
        gauge = self._lag.get((topic, partition))
        if gauge is None:
            gauge = self._lag[(topic, partition)] = self._consumer_lag.labels(topic, str(partition))
        gauge.set(lag)

    def partitions_revoked(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Remove the series of partitions this worker no longer owns."""
        for topic, partition in partitions:
            if self._lag.pop((topic, partition), None) is not None:
                self._consumer_lag.remove(topic, str(partition))

    # ------------------------------------------------------------------ state and output

    def windows_open(self, count: int) -> None:
        """(window, device) pairs not yet closed."""
        self._open_windows.set(count)

    def sink_failed(self, sink: str) -> None:
        """A write to `sink` failed (it is retried)."""
        self._sink_failures.labels(sink).inc()

    def sink_wrote(self, sink: str, seconds: float) -> None:
        """One batch written to `sink`, in `seconds`."""
        self._sink_batch.labels(sink).observe(seconds)

    def rows_emitted(self, rows: Iterable[CostRow], window_s: int, now_s: float) -> None:
        """Refresh the cost-rate gauges from each device's most recent window."""
        fresh: dict[str, list[CostRow]] = {}
        for row in rows:
            fresh.setdefault(row.device_uuid, []).append(row)
        for device, device_rows in fresh.items():
            start = device_rows[0].window_start_ms
            previous = self._latest.get(device)
            if previous is not None and previous[0] > start:
                continue  # a correction of an older window: the gauges show the latest
            if previous is None or previous[0] < start:
                self._emit_lag.observe(max(0.0, now_s - device_rows[0].window_end_ms / 1000))
            self._latest[device] = (start, device_rows)
        self._window_s = window_s
        self._refresh_rates()

    def devices_revoked(self, devices: Iterable[str]) -> None:
        """Forget the cost-rate series of devices whose partitions this worker no longer owns
        (their new owner reports them), so two workers never expose the same device."""
        for device in devices:
            if self._latest.pop(device, None) is None:
                continue
            for labels in [k for k in self._idle_series if k[2] == device]:
                self._idle_series.discard(labels)
                self._idle_burn.remove(*labels)
        self._refresh_rates()

    def _refresh_rates(self) -> None:
        """Set the rate gauges from each owned device's latest window; a team or cluster no
        longer in any of them loses its series."""
        per_hour = 3600 / self._window_s
        team_rates: dict[tuple[str, str], float] = {}
        untagged: dict[str, float] = {}
        for _, device_rows in self._latest.values():
            for row in device_rows:
                rate = float(row.cost_usd) * per_hour
                team_rates[(row.cluster, row.team)] = team_rates.get((row.cluster, row.team), 0)
                team_rates[(row.cluster, row.team)] += rate
                untagged.setdefault(row.cluster, 0.0)
                if row.team == UNTAGGED:
                    untagged[row.cluster] += rate
                if row.kind == KIND_IDLE:
                    labels = (row.cluster, row.node, row.device_uuid)
                    self._idle_series.add(labels)
                    self._idle_burn.labels(*labels).set(float(row.idle_cost_usd) * per_hour)
        for (cluster, team), rate in team_rates.items():
            self._cost_rate.labels(cluster, team).set(rate)
        for cluster, rate in untagged.items():
            self._untagged_rate.labels(cluster).set(rate)
        for team_labels in self._team_series - team_rates.keys():
            self._cost_rate.remove(*team_labels)
        for cluster in self._untagged_series - untagged.keys():
            self._untagged_rate.remove(cluster)
        self._team_series = set(team_rates)
        self._untagged_series = set(untagged)

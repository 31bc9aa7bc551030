"""Every Prometheus metric of the three producers, declared here and nowhere else.

Each producer builds one metrics object from an injected registry; business code calls the named
hooks. Names are part of the contract (alerts and dashboards use them). Labels named by what
NVML or the API server reports are bounded: a family labelled by device keeps the
MAX_DEVICE_SERIES most recently updated devices (and `devices_present` removes the gauges of
devices gone), one labelled by an error or event type keeps the first MAX_NAMED_SERIES and
counts the rest under `__other__`, and no label value is longer than MAX_LABEL_CHARS.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from runtime.metric_labels import FirstSeen, bounded_label

# A node has at most 8 GPUs of 7 MIG instances each: room for every device a node can hold
# several times over, never for an unbounded stream of them.
MAX_DEVICE_SERIES = 256
# NVML error names, watch event types: a handful each, capped all the same.
MAX_NAMED_SERIES = 256


class _DeviceSeries:
    """The devices of one family with a series, least recently updated first: past
    `max_series` the oldest is removed."""

    __slots__ = ("_devices", "_metric", "max_series")

    def __init__(self, metric: Gauge | Counter, max_series: int = MAX_DEVICE_SERIES) -> None:
        self._metric = metric
        self.max_series = max_series
        self._devices: dict[str, tuple[str, ...]] = {}  # device label -> its series' labels

    def labels(self, device_uuid: str, *labels: str) -> tuple[str, ...]:
        device = bounded_label(device_uuid)
        full = (*labels, device)
        if self._devices.pop(device, None) is None:
            while len(self._devices) >= self.max_series:
                self._metric.remove(*self._devices.pop(next(iter(self._devices))))
        self._devices[device] = full
        return full

    def keep_only(self, device_uuids: Iterable[str]) -> None:
        present = {bounded_label(uuid) for uuid in device_uuids}
        for device in [d for d in self._devices if d not in present]:
            self._metric.remove(*self._devices.pop(device))


class BufferMetrics:
    """The bounded send buffer shared by every producer, prefixed by the producer's name.

    `wall_clock_s` (Unix seconds) dates the oldest buffered event at each scrape: its age grows
    while the buffer stands still, so a value set at the last change would understate it.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        prefix: str,
        cluster: str,
        node: str,
        *,
        wall_clock_s: Callable[[], float] = time.time,
    ) -> None:
        labels = ("cluster", "node")
        cluster, node = bounded_label(cluster), bounded_label(node)
        self._wall_clock_s = wall_clock_s
        self._oldest_event_time_s: float | None = None
        self._size = Gauge(
            f"{prefix}_buffer_events",
            "Events waiting in the local buffer for the broker",
            labels,
            registry=registry,
        ).labels(cluster, node)
        self._dropped = Counter(
            f"{prefix}_buffer_dropped_total",
            "Events dropped because the local buffer was full (oldest first)",
            labels,
            registry=registry,
        ).labels(cluster, node)
        self._published = Counter(
            f"{prefix}_events_published_total",
            "Events acknowledged by the broker (or printed in --dry-run)",
            labels,
            registry=registry,
        ).labels(cluster, node)
        self._errors = Counter(
            f"{prefix}_publish_errors_total",
            "Failed attempts to reach or write to the broker",
            labels,
            registry=registry,
        ).labels(cluster, node)
        self._last_publish = Gauge(
            f"{prefix}_last_publish_timestamp_seconds",
            "Unix time of the last broker acknowledgement",
            labels,
            registry=registry,
        ).labels(cluster, node)
        Gauge(
            f"{prefix}_buffer_oldest_age_seconds",
            "Age (now minus event time) of the oldest event not yet acknowledged by the broker; "
            "0 when there is none",
            labels,
            registry=registry,
        ).labels(cluster, node).set_function(self._oldest_age_s)

    def buffer_size(self, events: int) -> None:
        self._size.set(events)

    def oldest_event(self, event_time_ms: int | None) -> None:
        """Event time of the oldest buffered event, None when the buffer is empty."""
        self._oldest_event_time_s = None if event_time_ms is None else event_time_ms / 1000

    def _oldest_age_s(self) -> float:
        oldest_s = self._oldest_event_time_s
        if oldest_s is None:
            return 0.0
        return max(0.0, self._wall_clock_s() - oldest_s)  # an event dated ahead is not old

    def dropped(self, events: int) -> None:
        self._dropped.inc(events)

    def published(self, events: int, now_s: float) -> None:
        self._published.inc(events)
        self._last_publish.set(now_s)

    def publish_error(self) -> None:
        self._errors.inc()


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry, cluster: str, node: str) -> None:
        cluster, node = bounded_label(cluster), bounded_label(node)
        self.cluster, self.node = cluster, node
        labels = ("cluster", "node")
        self.buffer = BufferMetrics(registry, "gpuledger_agent", cluster, node)
        self._last_sample = Gauge(
            "gpuledger_agent_last_sample_timestamp_seconds",
            "Sample time (Unix seconds) of the last GPU sample handed to the publisher",
            labels,
            registry=registry,
        ).labels(cluster, node)
        self._samples = Counter(
            "gpuledger_agent_samples",
            "GPU samples produced (one per device per interval)",
            labels,
            registry=registry,
        ).labels(cluster, node)
        self._devices = Gauge(
            "gpuledger_agent_devices",
            "Devices (whole GPUs and MIG instances) being sampled",
            labels,
            registry=registry,
        ).labels(cluster, node)
        self._nvml_errors = Counter(
            "gpuledger_agent_nvml_errors",
            "NVML calls that failed, by call and NVML error",
            (*labels, "call", "error"),
            registry=registry,
        )
        self._util_unsupported = Gauge(
            "gpuledger_agent_process_util_unsupported",
            "1 when NVML reports per-process SM utilisation NOT_SUPPORTED on the device "
            "(MIG instances, older GPUs): its processes carry sm_util_pct null",
            (*labels, "device_uuid"),
            registry=registry,
        )
        self._reinits = Counter(
            "gpuledger_agent_nvml_reinit",
            "NVML initialisations attempted after a driver-level failure",
            (*labels, "result"),
            registry=registry,
        )
        self._lost = Counter(
            "gpuledger_agent_devices_lost",
            "Times a device answered GPU_IS_LOST or RESET_REQUIRED",
            (*labels, "device_uuid"),
            registry=registry,
        )
        self._unresolved = Counter(
            "gpuledger_agent_pid_unresolved",
            "GPU processes whose /proc/<pid>/cgroup could not be read (exited, or no hostPID)",
            labels,
            registry=registry,
        ).labels(cluster, node)
        self._nvml_error_labels = FirstSeen(MAX_NAMED_SERIES)
        self._util_devices = _DeviceSeries(self._util_unsupported)
        self._lost_devices = _DeviceSeries(self._lost)
        self._duration = Histogram(
            "gpuledger_agent_sample_duration_seconds",
            "Time to sample every device once",
            labels,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=registry,
        ).labels(cluster, node)

    def sampled(self, devices: int, sample_time_s: float, duration_s: float) -> None:
        if devices:
            self._samples.inc(devices)
            self._last_sample.set(sample_time_s)
        self._duration.observe(duration_s)

    def devices(self, count: int) -> None:
        self._devices.set(count)

    def nvml_error(self, call: str, error: str) -> None:
        labels = self._nvml_error_labels(call, error)
        self._nvml_errors.labels(self.cluster, self.node, *labels).inc()

    def process_util_unsupported(self, device_uuid: str, unsupported: bool) -> None:
        labels = self._util_devices.labels(device_uuid, self.cluster, self.node)
        self._util_unsupported.labels(*labels).set(int(unsupported))

    def devices_present(self, device_uuids: Iterable[str]) -> None:
        """The devices found: the per-device gauges of the others are removed (the loss
        counters stay, within MAX_DEVICE_SERIES, for alerts to see the loss)."""
        self._util_devices.keep_only(device_uuids)

    def reinit(self, ok: bool) -> None:
        self._reinits.labels(self.cluster, self.node, "ok" if ok else "failed").inc()

    def device_lost(self, device_uuid: str) -> None:
        self._lost.labels(*self._lost_devices.labels(device_uuid, self.cluster, self.node)).inc()

    def pid_unresolved(self) -> None:
        self._unresolved.inc()


class PodsMetrics:
    def __init__(self, registry: CollectorRegistry, cluster: str) -> None:
        labels = ("cluster",)
        self.cluster = cluster = bounded_label(cluster)
        self._watch_labels = FirstSeen(MAX_NAMED_SERIES)
        self.buffer = BufferMetrics(registry, "gpuledger_pods", cluster, "")
        self._events = Counter(
            "gpuledger_pods_events",
            "Pod events produced, by kind (added, updated, deleted)",
            (*labels, "kind"),
            registry=registry,
        )
        self._watch_events = Counter(
            "gpuledger_pods_watch_events",
            "Watch events received from the API server, by resource and type",
            (*labels, "resource", "type"),
            registry=registry,
        )
        self._relists = Counter(
            "gpuledger_pods_relists",
            "Full lists, by resource and reason (start, expired = 410 Gone, error)",
            (*labels, "resource", "reason"),
            registry=registry,
        )
        self._api_errors = Counter(
            "gpuledger_pods_api_errors",
            "Failed Kubernetes API requests",
            (*labels, "resource"),
            registry=registry,
        )
        self._pods = Gauge(
            "gpuledger_pods_known", "Pods currently known", labels, registry=registry
        ).labels(cluster)
        self._node_events = Counter(
            "gpuledger_pods_node_events",
            "Node events produced, by kind (added, updated, deleted)",
            (*labels, "kind"),
            registry=registry,
        )
        self._nodes = Gauge(
            "gpuledger_pods_nodes_known", "Nodes currently known", labels, registry=registry
        ).labels(cluster)
        self._last_node_event = Gauge(
            "gpuledger_pods_last_node_event_timestamp_seconds",
            "Unix time of the last node event produced",
            labels,
            registry=registry,
        ).labels(cluster)
        self._last_event = Gauge(
            "gpuledger_pods_last_event_timestamp_seconds",
            "Unix time of the last pod event produced",
            labels,
            registry=registry,
        ).labels(cluster)

    def pod_event(self, kind: str, now_s: float) -> None:
        self._events.labels(self.cluster, kind).inc()
        self._last_event.set(now_s)

    def watch_event(self, resource: str, event_type: str) -> None:
        labels = self._watch_labels(resource, event_type)
        self._watch_events.labels(self.cluster, *labels).inc()

    def relist(self, resource: str, reason: str) -> None:
        self._relists.labels(self.cluster, resource, reason).inc()

    def api_error(self, resource: str) -> None:
        self._api_errors.labels(self.cluster, resource).inc()

    def pods_known(self, count: int) -> None:
        self._pods.set(count)

    def node_event(self, kind: str, now_s: float) -> None:
        self._node_events.labels(self.cluster, kind).inc()
        self._last_node_event.set(now_s)

    def nodes_known(self, count: int) -> None:
        self._nodes.set(count)


class TokensMetrics:
    def __init__(self, registry: CollectorRegistry, cluster: str, node: str) -> None:
        labels = ("cluster", "node")
        cluster, node = bounded_label(cluster), bounded_label(node)
        self.cluster, self.node = cluster, node
        self.buffer = BufferMetrics(registry, "gpuledger_tokens", cluster, node)
        self._targets = Gauge(
            "gpuledger_tokens_targets",
            "Inference endpoints being scraped",
            labels,
            registry=registry,
        ).labels(cluster, node)
        self._scrapes = Counter(
            "gpuledger_tokens_scrapes",
            "Scrapes of inference endpoints, by result (ok, error, unparsable, too_large)",
            (*labels, "result"),
            registry=registry,
        )
        self._resets = Counter(
            "gpuledger_tokens_counter_resets",
            "Series whose counters went down (server restart): the delta is the new value",
            labels,
            registry=registry,
        ).labels(cluster, node)
        self._deltas = Counter(
            "gpuledger_tokens_deltas",
            "Token delta events produced",
            labels,
            registry=registry,
        ).labels(cluster, node)
        self._last_scrape = Gauge(
            "gpuledger_tokens_last_scrape_timestamp_seconds",
            "Unix time of the last successful scrape",
            labels,
            registry=registry,
        ).labels(cluster, node)

    def targets(self, count: int) -> None:
        self._targets.set(count)

    def scrape(self, result: str, now_s: float) -> None:
        self._scrapes.labels(self.cluster, self.node, result).inc()
        if result == "ok":
            self._last_scrape.set(now_s)

    def counter_reset(self) -> None:
        self._resets.inc()

    def deltas(self, count: int) -> None:
        self._deltas.inc(count)

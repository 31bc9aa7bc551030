"""Every Prometheus metric the worker exposes, declared once on an injected registry.

Business code calls the named hooks; it never touches prometheus-client directly. Names follow
Prometheus conventions: `gpuledger_` prefix, `_total` counters, base units, `_usd` money.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from streams.rows import KIND_IDLE, UNTAGGED, CostRow


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events = Counter(
            "gpuledger_events_total", "Input events decoded and used", ["topic"], registry=registry
        )
        self.rejected = Counter(
            "gpuledger_events_rejected_total",
            "Input records that could not be used",
            ["topic", "reason"],
            registry=registry,
        )
        self.duplicates = Counter(
            "gpuledger_events_duplicate_total",
            "Input events dropped because their id was already seen",
            ["topic"],
            registry=registry,
        )
        self.late = Counter(
            "gpuledger_events_late_total",
            "Events for closed windows within retention (they re-emit corrected rows)",
            ["topic"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "gpuledger_dead_letters_total",
            "Records written to the dead-letter topic",
            ["topic", "reason"],
            registry=registry,
        )
        self.emit_lag = Histogram(
            "gpuledger_window_emit_lag_seconds",
            "Wall-clock time from a window's end to its rows being written",
            buckets=(1, 5, 10, 15, 30, 60, 120, 300, 900, 3600),
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "gpuledger_consumer_lag_messages",
            "Messages between the worker's position and the partition's end",
            ["topic", "partition"],
            registry=registry,
        )
        self.sink_batch = Histogram(
            "gpuledger_sink_batch_seconds",
            "Time to write one batch to a sink",
            ["sink"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.sink_failures = Counter(
            "gpuledger_sink_failures_total",
            "Failed attempts to write a batch (retried)",
            ["sink"],
            registry=registry,
        )
        self.idle_burn = Gauge(
            "gpuledger_idle_burn_usd_per_hour",
            "Idle cost rate of a device over its latest closed window",
            ["cluster", "node", "device_uuid"],
            registry=registry,
        )
        self.untagged_rate = Gauge(
            "gpuledger_untagged_cost_usd_per_hour",
            "Cost rate of untagged pods over each device's latest closed window",
            ["cluster"],
            registry=registry,
        )
        self.cost_rate = Gauge(
            "gpuledger_cost_usd_per_hour",
            "Cost rate by team over each device's latest closed window (idle under the "
            "platform team)",
            ["cluster", "team"],
            registry=registry,
        )
        self.unknown_model = Counter(
            "gpuledger_unknown_gpu_model_samples_total",
            "Samples priced at the price book's default because their model is not listed",
            ["gpu_model"],
            registry=registry,
        )
        self.open_windows = Gauge(
            "gpuledger_open_windows", "(window, device) pairs not yet closed", registry=registry
        )
        self._latest: dict[str, tuple[int, list[CostRow]]] = {}

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
                self.emit_lag.observe(max(0.0, now_s - device_rows[0].window_end_ms / 1000))
            self._latest[device] = (start, device_rows)
        per_hour = 3600 / window_s
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
                    self.idle_burn.labels(row.cluster, row.node, row.device_uuid).set(
                        float(row.idle_cost_usd) * per_hour
                    )
        for (cluster, team), rate in team_rates.items():
            self.cost_rate.labels(cluster, team).set(rate)
        for cluster, rate in untagged.items():
            self.untagged_rate.labels(cluster).set(rate)

"""Every Prometheus metric the worker exposes, declared once on an injected registry.

Business code calls the named hooks; it never touches prometheus-client directly. Names follow
Prometheus conventions: `gpuledger_` prefix, `_total` counters, base units, `_usd` money.
Series labelled by input partition are removed when the partition is revoked, so a worker
exposes only the partitions it owns. Series labelled by what the input names (device, node,
cluster, GPU model, event source, team) are bounded: `prune(now_s)` removes those not updated
for `series_ttl_s`, and no family holds more than `max_series` (the least recently updated go
first; the team rates fold the smallest into `__other__`). The rejection and dead-letter
counters, labelled by topic and reason, keep the first MAX_REASON_SERIES label pairs and count
the rest under `__other__`. Every label value taken from the input is cut to MAX_LABEL_CHARS
(`bounded_label`). The budget and forecast gauges (`budgets_refreshed`) hold the budgets'
owners and at most `max_series` owners in all, the smallest forecasts folded into `__other__`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from runtime.metric_labels import OTHER, FirstSeen, bounded_label
from streams.rows import KIND_IDLE, UNTAGGED, CostRow

M = TypeVar("M", bound=MetricWrapperBase)

# Event sources (CloudEvent `source`, e.g. `agent/node-7`) come from event data: the first
# MAX_SOURCES get a series of their own, the rest share OTHER_SOURCE.
MAX_SOURCES = 2000
OTHER_SOURCE = OTHER
CLOCK_SERIES_TTL_S = 900.0  # a source silent this long loses its clock-offset series
SERIES_TTL_S = 3600.0  # the default retention: a device, model or source silent this long
MAX_SERIES = 50_000  # per label family
# Topics and reasons come from the worker's own code, a few dozen pairs; a cap all the same, so
# that no change upstream can make them grow without bound.
MAX_REASON_SERIES = 1000


class WorkerMetrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        series_ttl_s: float = SERIES_TTL_S,
        max_series: int = MAX_SERIES,
    ) -> None:
        if max_series < 2:
            raise ValueError(f"max_series must be at least 2, not {max_series}")
        self.registry = registry
        self.series_ttl_s = series_ttl_s
        self.max_series = max_series
        self.series_evicted = 0  # series removed because their family was full
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
        self._state_entries = Gauge(
            "gpuledger_worker_state_entries",
            "Entries the worker holds in memory, per structure (closed windows, pod slots, pods, "
            "dead-letter keys)",
            ["structure"],
            registry=registry,
        )
        self._state_evicted = Counter(
            "gpuledger_worker_state_evicted_total",
            "Entries dropped from a structure because it reached its configured size",
            ["structure"],
            registry=registry,
        )
        self._checkpoints_restored = Counter(
            "gpuledger_checkpoints_restored_total",
            "Closed windows restored from their checkpoint (after a restart, a rebalance, or "
            "for a sample older than the retention)",
            ["stage"],
            registry=registry,
        )
        owner = ["dimension", "owner"]
        self._budget = Gauge(
            "gpuledger_budget_usd",
            "Monthly budget of an owner (budgets file)",
            owner,
            registry=registry,
        )
        self._budget_threshold = Gauge(
            "gpuledger_budget_threshold_usd",
            "Amount at which an owner's alert threshold is reached (threshold_pct of its budget)",
            [*owner, "threshold_pct"],
            registry=registry,
        )
        self._month_to_date = Gauge(
            "gpuledger_budget_month_to_date_usd",
            "GPU cost of an owner this month so far (the forecast report's month to date)",
            owner,
            registry=registry,
        )
        self._forecasts = {
            bound: Gauge(
                f"gpuledger_forecast{suffix}_usd",
                f"Month-end GPU cost forecast of an owner: {text}",
                owner,
                registry=registry,
            )
            for bound, suffix, text in (
                ("point", "", "the point forecast"),
                ("low80", "_low80", "bottom of the 80 % prediction interval"),
                ("high80", "_high80", "top of the 80 % prediction interval"),
                ("low95", "_low95", "bottom of the 95 % prediction interval"),
                ("high95", "_high95", "top of the 95 % prediction interval"),
            )
        }
        self._budget_refreshed = Gauge(
            "gpuledger_budget_last_refresh_timestamp_seconds",
            "When the budget and forecast gauges were last computed (Unix time)",
            registry=registry,
        )
        self._budget_failures = Counter(
            "gpuledger_budget_refresh_failures_total",
            "Budget and forecast refreshes that failed (the gauges keep their last values)",
            registry=registry,
        )
        self._budget_series: set[tuple[str, str]] = set()
        self._threshold_series: set[tuple[str, str, str]] = set()
        self._forecast_series: set[tuple[str, str]] = set()
        self._evicted_seen: dict[str, int] = {}
        self._rejected_labels = FirstSeen(MAX_REASON_SERIES)
        self._dead_letter_labels = FirstSeen(MAX_REASON_SERIES)
        self._sources: set[str] = set()
        # When each series named by the input was last updated (wall time), oldest first.
        self._offsets = _Recency()  # (source,)
        self._skews = _Recency()  # (topic, source)
        self._models = _Recency()  # (gpu_model,)
        self._devices = _Recency()  # (device_uuid,): its cost-rate and idle series
        self._next_sweep_s = 0.0
        self._latest: dict[str, tuple[int, list[CostRow]]] = {}
        self._window_s = 60
        self._idle_series: dict[str, tuple[str, str, str]] = {}  # device -> its idle labels
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

    def _remove(self, metric: MetricWrapperBase, labels: tuple[str, ...]) -> None:
        self._children.pop((id(metric), labels), None)
        metric.remove(*labels)

    def _touch(
        self, recency: _Recency, labels: tuple[str, ...], now_s: float
    ) -> list[tuple[str, ...]]:
        """Note `labels` updated now; the series to remove to keep the family's cap."""
        evicted = recency.touch(labels, now_s, self.max_series)
        self.series_evicted += len(evicted)
        return evicted

    # ------------------------------------------------------------------ bounds

    def prune(self, now_s: float) -> None:
        """Remove the series of devices, GPU models and sources not updated for
        `series_ttl_s` (clock offsets: CLOCK_SERIES_TTL_S, where shorter); a source left
        with no series gives up its place among the MAX_SOURCES."""
        before_s = now_s - self.series_ttl_s
        stale = [device for (device,) in self._devices.stale(before_s)]
        if stale:
            self._forget_devices(stale)
            self._refresh_rates()
        for labels in self._models.stale(before_s):
            self._remove(self._unknown_model, labels)
        for labels in self._skews.stale(before_s):
            self._remove(self._clock_skew, labels)
        for labels in self._offsets.stale(now_s - min(CLOCK_SERIES_TTL_S, self.series_ttl_s)):
            self._remove(self._clock_offset, labels)
        live = {source for (source,) in self._offsets} | {source for _, source in self._skews}
        self._sources &= live

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
        self._child(self._rejected, *self._rejected_labels(topic, reason)).inc()

    def dead_lettered(self, topic: str, reason: str) -> None:
        self._child(self._dead_letters, *self._dead_letter_labels(topic, reason)).inc()

    def unknown_gpu_model(self, gpu_model: str, now_s: float | None = None) -> None:
        """A sample priced at the price book's default."""
        now = time.time() if now_s is None else now_s
        gpu_model = bounded_label(gpu_model)
        for labels in self._touch(self._models, (gpu_model,), now):
            self._remove(self._unknown_model, labels)
        self._child(self._unknown_model, gpu_model).inc()

    def _source(self, source: str) -> str:
        """The label for an event source: its own for the first MAX_SOURCES, then shared."""
        source = bounded_label(source)
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
        for labels in self._touch(self._offsets, (label,), now_s):
            self._remove(self._clock_offset, labels)
        self._child(self._clock_offset, label).set(seconds)
        if now_s >= self._next_sweep_s:
            self._next_sweep_s = now_s + 60.0
            for labels in self._offsets.stale(now_s - CLOCK_SERIES_TTL_S):
                self._remove(self._clock_offset, labels)

    def clock_skewed(self, topic: str, source: str, now_s: float | None = None) -> None:
        """An event of `source` dead-lettered as `clock_skew`."""
        now = time.time() if now_s is None else now_s
        key = (topic, self._source(source))
        for labels in self._touch(self._skews, key, now):
            self._remove(self._clock_skew, labels)
        self._child(self._clock_skew, *key).inc()

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
        full: list[str] = []
        for device, device_rows in fresh.items():
            full.extend(labels[0] for labels in self._touch(self._devices, (device,), now_s))
            start = device_rows[0].window_start_ms
            previous = self._latest.get(device)
            if previous is not None and previous[0] > start:
                continue  # a correction of an older window: the gauges show the latest
            if previous is None or previous[0] < start:
                self._emit_lag.observe(max(0.0, now_s - device_rows[0].window_end_ms / 1000))
            self._latest[device] = (start, device_rows)
        self._forget_devices(full)
        self._window_s = window_s
        self._refresh_rates()

    def worker_state(self, entries: Mapping[str, int], evicted: Mapping[str, int]) -> None:
        """Sizes of the worker's in-memory structures, and how many entries each one's cap
        has dropped since start (running totals; series evicted by this class included)."""
        for structure, count in entries.items():
            self._child(self._state_entries, structure).set(count)
        for structure, total in {**evicted, "metric_series": self.series_evicted}.items():
            delta = total - self._evicted_seen.get(structure, 0)
            if delta > 0:
                self._child(self._state_evicted, structure).inc(delta)
            self._evicted_seen[structure] = total

    def checkpoints_restored(self, stage: str, count: int) -> None:
        self._child(self._checkpoints_restored, stage).inc(count)

    # ------------------------------------------------------------------ budgets

    def budgets_refreshed(
        self,
        budgets: Sequence[BudgetValues],
        owners: Sequence[OwnerForecast],
        now_s: float,
    ) -> None:
        """Set the budget gauges and each owner's month to date and forecast, replacing the
        last refresh's: an owner or budget gone loses its series. Owners with a budget come
        first; past `max_series` owners the smallest forecasts are folded into `__other__`
        (their amounts summed, bounds too: not an interval of the sum)."""
        budget_labels = {(b.dimension, bounded_label(b.owner)): b for b in budgets}
        thresholds: set[tuple[str, str, str]] = set()
        for (dimension, owner), budget in budget_labels.items():
            self._budget.labels(dimension, owner).set(float(budget.budget_usd))
            for pct in budget.thresholds_pct:
                key = (dimension, owner, format(pct, "f"))
                thresholds.add(key)
                self._budget_threshold.labels(*key).set(float(budget.budget_usd * pct / 100))
        for labels in self._budget_series - budget_labels.keys():
            self._budget.remove(*labels)
        for key in self._threshold_series - thresholds:
            self._budget_threshold.remove(*key)
        self._budget_series, self._threshold_series = set(budget_labels), thresholds
        shown = _fold_owners(owners, set(budget_labels), self.max_series)
        for (dimension, owner), f in shown.items():
            self._month_to_date.labels(dimension, owner).set(float(f.month_to_date_usd))
            for bound, amount in (
                ("point", f.forecast_usd),
                ("low80", f.low80_usd),
                ("high80", f.high80_usd),
                ("low95", f.low95_usd),
                ("high95", f.high95_usd),
            ):
                self._forecasts[bound].labels(dimension, owner).set(float(amount))
        for labels in self._forecast_series - shown.keys():
            self._month_to_date.remove(*labels)
            for gauge in self._forecasts.values():
                gauge.remove(*labels)
        self._forecast_series = set(shown)
        self._budget_refreshed.set(now_s)

    def budget_refresh_failed(self) -> None:
        """A refresh of the budget and forecast gauges failed; they keep their last values."""
        self._budget_failures.inc()

    def devices_revoked(self, devices: Iterable[str]) -> None:
        """Forget the cost-rate series of devices whose partitions this worker no longer owns
        (their new owner reports them), so two workers never expose the same device."""
        gone = list(devices)
        for device in gone:
            self._devices.discard((device,))
        self._forget_devices(gone)
        self._refresh_rates()

    def _forget_devices(self, devices: Iterable[str]) -> None:
        for device in devices:
            self._latest.pop(device, None)
            labels = self._idle_series.pop(device, None)
            if labels is not None:
                self._idle_burn.remove(*labels)

    def _refresh_rates(self) -> None:
        """Set the rate gauges from each owned device's latest window; a team or cluster no
        longer in any of them loses its series. Devices are at most `max_series`, so are the
        idle series (one a device) and the clusters (at most one a device); the team rates
        are folded to fit."""
        per_hour = 3600 / self._window_s
        team_rates: dict[tuple[str, str], float] = {}
        untagged: dict[str, float] = {}
        for _, device_rows in self._latest.values():
            for row in device_rows:
                rate = float(row.cost_usd) * per_hour
                cluster = bounded_label(row.cluster)
                team_key = (cluster, bounded_label(row.team))
                team_rates[team_key] = team_rates.get(team_key, 0.0) + rate
                untagged.setdefault(cluster, 0.0)
                if row.team == UNTAGGED:
                    untagged[cluster] += rate
                if row.kind == KIND_IDLE:
                    labels = (cluster, bounded_label(row.node), bounded_label(row.device_uuid))
                    previous = self._idle_series.get(row.device_uuid)
                    if previous != labels:
                        if previous is not None:
                            self._idle_burn.remove(*previous)
                        self._idle_series[row.device_uuid] = labels
                    self._idle_burn.labels(*labels).set(float(row.idle_cost_usd) * per_hour)
        if len(team_rates) > self.max_series:
            team_rates = _fold_smallest(team_rates, self.max_series)
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


OTHER_TEAM = OTHER


@dataclass(frozen=True, slots=True)
class BudgetValues:
    """One budget, as the gauges show it."""

    dimension: str
    owner: str
    budget_usd: Decimal
    thresholds_pct: tuple[Decimal, ...]


@dataclass(frozen=True, slots=True)
class OwnerForecast:
    """One owner's month to date and month-end forecast, as the gauges show it."""

    dimension: str
    owner: str
    month_to_date_usd: Decimal
    forecast_usd: Decimal
    low80_usd: Decimal
    high80_usd: Decimal
    low95_usd: Decimal
    high95_usd: Decimal


def _fold_owners(
    owners: Sequence[OwnerForecast], budgeted: set[tuple[str, str]], max_series: int
) -> dict[tuple[str, str], OwnerForecast]:
    """The owners by (dimension, bounded owner): those with a budget first, then by forecast;
    past `max_series`, the rest summed into one `__other__` owner (of their dimension where
    they are of one)."""
    by_labels: dict[tuple[str, str], OwnerForecast] = {}
    for f in owners:
        by_labels.setdefault((f.dimension, bounded_label(f.owner)), f)
    ranked = sorted(
        by_labels.items(), key=lambda item: (item[0] not in budgeted, -item[1].forecast_usd)
    )
    if len(ranked) <= max_series:
        return dict(ranked)
    kept, rest = dict(ranked[: max_series - 1]), [f for _, f in ranked[max_series - 1 :]]
    dimensions = {f.dimension for f in rest}
    dimension = dimensions.pop() if len(dimensions) == 1 else OTHER
    zero = Decimal(0)
    kept[(dimension, OTHER)] = OwnerForecast(
        dimension,
        OTHER,
        sum((f.month_to_date_usd for f in rest), zero),
        sum((f.forecast_usd for f in rest), zero),
        sum((f.low80_usd for f in rest), zero),
        sum((f.high80_usd for f in rest), zero),
        sum((f.low95_usd for f in rest), zero),
        sum((f.high95_usd for f in rest), zero),
    )
    return kept


def _fold_smallest(
    team_rates: dict[tuple[str, str], float], max_series: int
) -> dict[tuple[str, str], float]:
    """The `max_series - 1` largest team rates, and the rest summed in one more series: the
    cluster's `__other__` team where the rest is of one cluster, else `__other__` of cluster
    `__other__`. So the family never holds more than `max_series`, and the total is kept."""
    ranked = sorted(team_rates.items(), key=lambda item: item[1], reverse=True)
    kept = dict(ranked[: max_series - 1])
    rest = ranked[max_series - 1 :]
    clusters = {cluster for (cluster, _), _ in rest}
    target = (clusters.pop() if len(clusters) == 1 else OTHER, OTHER_TEAM)
    kept[target] = kept.get(target, 0.0) + sum(rate for _, rate in rest)
    return kept


class _Recency:
    """When each series of one label family was last updated, least recently first."""

    __slots__ = ("_updated",)

    def __init__(self) -> None:
        self._updated: dict[tuple[str, ...], float] = {}

    def __iter__(self) -> Iterator[tuple[str, ...]]:
        return iter(self._updated)

    def touch(
        self, labels: tuple[str, ...], now_s: float, max_series: int
    ) -> list[tuple[str, ...]]:
        """Note `labels` updated at `now_s`; the least recently updated others beyond
        `max_series`, forgotten here, for their series to be removed."""
        updated, evicted = self._updated, []
        if updated.pop(labels, None) is None:
            while len(updated) >= max_series:
                evicted.append(next(iter(updated)))
                del updated[evicted[-1]]
        updated[labels] = now_s
        return evicted

    def stale(self, before_s: float) -> list[tuple[str, ...]]:
        """Forget, and return, the labels last updated before `before_s`."""
        updated, gone = self._updated, []
        for labels, updated_s in updated.items():
            if updated_s >= before_s:
                break
            gone.append(labels)
        for labels in gone:
            del updated[labels]
        return gone

    def discard(self, labels: tuple[str, ...]) -> None:
        self._updated.pop(labels, None)

"""The GPU requests of pod events into ClickHouse's `pod_gpu_requests`, one row per event.

Rows are written for pods that request GPU resources, or did: a pod whose events never named
any writes none. From a row's `time` on, the pod holds its `requests`; a pod that finished holds
nothing (its event says so), and a deletion writes empty requests whatever the event carries.
Owners are resolved from the event's labels by the worker's label policy, as cost rows are.
"""

from __future__ import annotations

from collections.abc import Callable

from schemas.events import CloudEvent, PodInfo
from streams.labels import LabelSettings, label_value
from streams.rows import PodGpuRequestsRow


def requests_row(event: CloudEvent[PodInfo], labels: LabelSettings) -> PodGpuRequestsRow:
    """The row of one pod event: what the pod holds from the event's time on."""
    pod = event.data
    return PodGpuRequestsRow(
        cluster=pod.cluster,
        node=pod.node,
        namespace=pod.namespace,
        pod=pod.name,
        pod_uid=pod.uid,
        team=label_value(labels.team_key, pod.labels, pod.namespace_labels),
        product=label_value(labels.product_key, pod.labels, pod.namespace_labels),
        cost_center=label_value(labels.cost_center_key, pod.labels, pod.namespace_labels),
        requests={} if pod.deleted else dict(pod.gpu_requests),
        time_ms=event.time_ms,
        event_id=event.id,
    )


class PodRequests:
    """Which pods requested GPU resources, so their later events (finished, deleted) are
    written too; bounded by the pod history it follows (`forget`)."""

    def __init__(self, labels: LabelSettings) -> None:
        self.labels = labels
        self._requesting: set[str] = set()  # pod uids whose events named GPU requests

    def __len__(self) -> int:
        return len(self._requesting)

    def requesting(self, uid: str) -> bool:
        """Whether an event of this pod named GPU requests."""
        return uid in self._requesting

    def row(self, event: CloudEvent[PodInfo]) -> PodGpuRequestsRow | None:
        """The event's row, or None for a pod that never requested GPU resources."""
        pod = event.data
        if pod.gpu_requests:
            self._requesting.add(pod.uid)
        elif pod.uid not in self._requesting:
            return None
        return requests_row(event, self.labels)

    def forget(self, known: Callable[[str], bool]) -> None:
        """Drop the pods the history no longer knows."""
        self._requesting = {uid for uid in self._requesting if known(uid)}

"""Watches pods and namespaces (and nodes, unless told not to) through the Kubernetes API and
hands `PodEmission`s (and `NodeEmission`s) to callbacks.

List, then watch from the list's resourceVersion; when the server says the version is too old
(HTTP 410 Gone, or an ERROR event with code 410) list again and let `PodState.resync_*` emit what
changed meanwhile, deletions included, so nothing is lost across the gap. A periodic full resync
(`--interval`) guards against anything a watch could have missed. Nodes are optional: where the
API server refuses them (403), the watcher says so in one line and goes on with pods, trying
nodes again at each periodic resync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from agents.kube_client import KubeClient
from agents.metrics import PodsMetrics
from agents.node_state import NodeEmission, NodeState
from agents.pod_state import PodEmission, PodState
from runtime.errors import KubeApiError

log = logging.getLogger(__name__)

PATHS = {"namespaces": "/api/v1/namespaces", "pods": "/api/v1/pods", "nodes": "/api/v1/nodes"}
FORBIDDEN = 403


class _Expired(Exception):
    """The watch's resourceVersion is gone: list again."""


class PodWatcher:
    def __init__(
        self,
        client: KubeClient,
        state: PodState,
        emit: Callable[[PodEmission], None],
        metrics: PodsMetrics,
        *,
        clock: Callable[[], float] = time.time,
        watch_timeout_s: int = 300,
        retry_max_s: float = 30.0,
        nodes: NodeState | None = None,
        emit_node: Callable[[NodeEmission], None] | None = None,
    ) -> None:
        self.client = client
        self.state = state
        self.emit = emit
        # None: nodes are not watched (`--no-nodes`)
        self.nodes = nodes if emit_node is not None else None
        self.emit_node = emit_node
        self.nodes_forbidden = False  # the API server answered 403 for nodes
        self.metrics = metrics
        self.clock = clock
        self.watch_timeout_s = watch_timeout_s
        self.retry_max_s = retry_max_s
        self.synced = False
        self.last_contact_s: float | None = None
        self._versions: dict[str, str] = {}

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _publish(self, emissions: list[PodEmission]) -> None:
        for emission in emissions:
            self.emit(emission)
            self.metrics.pod_event(emission.kind, emission.time_ms / 1000)
        self.metrics.pods_known(len(self.state.pods))

    def _publish_nodes(self, emissions: list[NodeEmission]) -> None:
        assert self.emit_node is not None and self.nodes is not None
        for emission in emissions:
            self.emit_node(emission)
            self.metrics.node_event(emission.kind, emission.time_ms / 1000)
        self.metrics.nodes_known(len(self.nodes.published))

    @property
    def resources(self) -> tuple[str, ...]:
        """What this watcher lists and watches."""
        return ("namespaces", "pods", "nodes") if self.nodes is not None else ("namespaces", "pods")

    async def list_resource(self, resource: str, reason: str) -> None:
        try:
            items, version = await self.client.list_all(PATHS[resource])
        except KubeApiError as exc:
            if resource == "nodes" and exc.status == FORBIDDEN:
                self._nodes_refused(exc)
                return
            raise
        self.metrics.relist(resource, reason)
        now_ms = self._now_ms()
        if resource == "namespaces":
            self._publish(self.state.resync_namespaces(items, now_ms))
        elif resource == "nodes":
            assert self.nodes is not None
            if self.nodes_forbidden:
                log.info("nodes are readable again: publishing node events")
            self.nodes_forbidden = False
            self._publish_nodes(self.nodes.resync_nodes(items, now_ms))
        else:
            self._publish(self.state.resync_pods(items, now_ms))
        self._versions[resource] = version
        self.last_contact_s = self.clock()

    def _nodes_refused(self, exc: KubeApiError) -> None:
        """403 for nodes: said once, in one line; pods go on, and every periodic resync tries
        nodes again."""
        self.metrics.api_error("nodes")
        if not self.nodes_forbidden:
            log.error(
                "the API server refuses this service account nodes (HTTP 403): no node events "
                "until it may get, list and watch nodes (ClusterRole gpuledger-pods) or "
                "--no-nodes is given; pods are watched as before"
            )
        self.nodes_forbidden = True
        self._versions["nodes"] = ""

    async def resync(self) -> None:
        """A full list of every resource (start and periodic resync). Pods never wait for
        nodes: a failed node list is retried by the node watch, with its backoff."""
        reason = "start" if not self.synced else "periodic"
        await self.list_resource("namespaces", reason)
        await self.list_resource("pods", reason)
        if self.nodes is not None:
            try:
                await self.list_resource("nodes", reason)
            except KubeApiError as exc:
                self.metrics.api_error("nodes")
                log.warning("listing nodes failed (%s); the node watch lists again", exc)
                self._versions["nodes"] = ""
        self.synced = True

    async def run(self, stop: asyncio.Event) -> None:
        """Initial list (retried until it works), then every watch until `stop`."""
        backoff_s = 1.0
        while not stop.is_set() and not self.synced:
            try:
                await self.resync()
            except KubeApiError as exc:
                self.metrics.api_error("list")
                log.warning("initial list failed (%s); retrying in %.0f s", exc, backoff_s)
                await _sleep_or_stop(stop, backoff_s)
                backoff_s = min(backoff_s * 2, self.retry_max_s)
        watches = [
            asyncio.create_task(self._watch_loop(resource, stop)) for resource in self.resources
        ]
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopper, *watches], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in [*watches]:
                task.cancel()
            for task in watches:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            stopper.cancel()

    async def _watch_loop(self, resource: str, stop: asyncio.Event) -> None:
        backoff_s = 1.0
        while not stop.is_set():
            if resource == "nodes" and self.nodes_forbidden:
                await _sleep_or_stop(stop, self.retry_max_s)  # the periodic resync asks again
                continue
            try:
                await self._watch_once(resource)
                backoff_s = 1.0
            except (_Expired, KubeApiError) as exc:
                if resource == "nodes" and getattr(exc, "status", 0) == FORBIDDEN:
                    assert isinstance(exc, KubeApiError)
                    self._nodes_refused(exc)
                    continue
                expired = isinstance(exc, _Expired) or getattr(exc, "status", 0) == 410
                if not expired:
                    self.metrics.api_error(resource)
                    log.warning(
                        "watch %s failed (%s); retrying in %.0f s", resource, exc, backoff_s
                    )
                    await _sleep_or_stop(stop, backoff_s)
                    backoff_s = min(backoff_s * 2, self.retry_max_s)
                    continue
                log.info("watch %s expired (410 Gone): listing again", resource)
                try:
                    await self.list_resource(resource, "expired")
                except KubeApiError as list_exc:
                    self.metrics.api_error(resource)
                    log.warning("relist %s failed (%s)", resource, list_exc)
                    self._versions[resource] = ""  # stays expired: list again next time
                    await _sleep_or_stop(stop, backoff_s)
                    backoff_s = min(backoff_s * 2, self.retry_max_s)

    async def _watch_once(self, resource: str) -> None:
        version = self._versions.get(resource, "")
        if not version:
            raise _Expired()
        async for event in self.client.watch(
            PATHS[resource], version, timeout_s=self.watch_timeout_s
        ):
            self.last_contact_s = self.clock()
            kind = str(event.get("type", ""))
            obj: Any = event.get("object") or {}
            self.metrics.watch_event(resource, kind)
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise _Expired()
                raise KubeApiError(
                    f"watch {resource}: {obj.get('message', obj)}", status=int(obj.get("code") or 0)
                )
            new_version = (obj.get("metadata") or {}).get("resourceVersion")
            if kind != "BOOKMARK":
                now_ms = self._now_ms()
                if resource == "nodes":
                    assert self.nodes is not None
                    self._publish_nodes(self.nodes.apply_node(kind, obj, now_ms))
                elif resource == "namespaces":
                    if kind == "DELETED":
                        self.state.delete_namespace(
                            str((obj.get("metadata") or {}).get("name", ""))
                        )
                    else:
                        self._publish(self.state.apply_namespace(obj, now_ms))
                else:
                    self._publish(self.state.apply_pod(kind, obj, now_ms))
            if new_version:
                self._versions[resource] = str(new_version)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)

"""The demo's producers: the real node agent (one per simulated node, on the fake NVML), the real
pod watcher and token scraper (against the simulated cluster API), each publishing through the
real Kafka publisher. Every one reads the same simulated clock, so events carry simulated time.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import aiohttp
from prometheus_client import CollectorRegistry

from agents.fake_nvml import FakeNvml
from agents.kube_client import KubeClient, KubeSettings
from agents.metrics import AgentMetrics, BufferMetrics, PodsMetrics, TokensMetrics
from agents.node_state import NodeEmission, NodeState
from agents.pod_state import PodEmission, PodState
from agents.pod_watcher import PodWatcher
from agents.publisher import KafkaPublisher
from agents.sampler import DeviceSampler, SamplerSettings
from agents.scenario import Scenario, SimClock
from agents.scenario_views import cgroup_reader
from agents.token_scraper import TokenScraper, http_fetcher, targets_from_pods
from gpuledger.demo.cluster_api import SimulatedClusterApi
from runtime.errors import KubeApiError
from runtime.kafka import KafkaSettings, default_topics
from schemas.events import GPU_SAMPLES_TOPIC, NODES_TOPIC, PODS_TOPIC, TOKENS_TOPIC, make_event

# Events a publisher may hold before the simulation waits for the broker: a fast --speed slows
# down rather than overflow the buffer (which would drop the oldest events).
BACKLOG_PAUSE_EVENTS = 20_000
BUFFER_MAX_EVENTS = 1_000_000


@dataclass
class PublishedCounts:
    samples: int = 0
    pod_events: int = 0
    token_deltas: int = 0
    node_events: int = 0
    by_topic: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.samples + self.pod_events + self.token_deltas + self.node_events


def _publisher(kafka: KafkaSettings, metrics: BufferMetrics, *topics: str) -> KafkaPublisher:
    specs = [t for t in default_topics(3) if t.name in topics]
    return KafkaPublisher(
        kafka,
        specs,
        metrics,
        max_buffer_events=BUFFER_MAX_EVENTS,
        flush_timeout_s=60.0,
    )


class SimulatedProducers:
    """Owns the agents, the pod watcher, the token scraper and their publishers.

    `start()` connects everything; `step(t)` moves the cluster to scenario time `t` and runs one
    agent pass (and a scrape pass when one is due); `stop()` flushes every publisher."""

    def __init__(
        self,
        scenario: Scenario,
        clock: SimClock,
        kafka: KafkaSettings,
        *,
        sample_interval_s: float,
        scrape_interval_s: float,
    ) -> None:
        self.scenario = scenario
        self.clock = clock
        self.sample_interval_s = sample_interval_s
        self.scrape_interval_s = scrape_interval_s
        self.counts = PublishedCounts()
        self.api = SimulatedClusterApi(scenario, clock)
        self.samplers: list[DeviceSampler] = []
        for node in scenario.nodes:
            metrics = AgentMetrics(CollectorRegistry(), scenario.cluster, node.name)
            settings = SamplerSettings(
                cluster=scenario.cluster,
                node=node.name,
                interval_s=sample_interval_s,
                node_labels=dict(node.labels),
            )
            self.samplers.append(
                DeviceSampler(
                    FakeNvml(scenario, node.name, clock),
                    settings,
                    metrics,
                    cgroup_reader=cgroup_reader(scenario),
                    wall_clock=clock,
                    monotonic_clock=clock,
                )
            )
        registry = CollectorRegistry()
        self.pods_metrics = PodsMetrics(registry, scenario.cluster)
        self.tokens_metrics = TokensMetrics(registry, scenario.cluster, "")
        agent_buffer = AgentMetrics(CollectorRegistry(), scenario.cluster, "all").buffer
        self.publishers = {
            GPU_SAMPLES_TOPIC: _publisher(kafka, agent_buffer, GPU_SAMPLES_TOPIC),
            # the pod watcher's: pod and node events, as in `gpuledger pods`
            PODS_TOPIC: _publisher(kafka, self.pods_metrics.buffer, PODS_TOPIC, NODES_TOPIC),
            TOKENS_TOPIC: _publisher(kafka, self.tokens_metrics.buffer, TOKENS_TOPIC),
        }
        self._kube: KubeClient | None = None
        self._scrape_session: aiohttp.ClientSession | None = None
        self._scraper: TokenScraper | None = None
        self._watcher: PodWatcher | None = None
        self._watch_stop = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self._next_scrape_s = 0.0

    async def start(self) -> None:
        await self.api.start()  # first: pod objects name its port
        await self.api.advance(0.0)
        for publisher in self.publishers.values():
            await publisher.start()
        self._kube = KubeClient(KubeSettings(server=self.api.url))
        await self._kube.start()
        self._watcher = PodWatcher(
            self._kube,
            PodState(self.scenario.cluster),
            self._emit_pod,
            self.pods_metrics,
            clock=self.clock,
            nodes=NodeState(self.scenario.cluster),
            emit_node=self._emit_node,
        )
        self._watch_task = asyncio.create_task(self._watcher.run(self._watch_stop), name="pods")
        self._scrape_session = aiohttp.ClientSession()
        self._scraper = TokenScraper(
            self.scenario.cluster,
            self.tokens_metrics,
            http_fetcher(self._scrape_session, timeout_s=5.0),
            self.clock,
        )

    async def step(self, t: float) -> None:
        """Move to scenario time `t`: cluster changes first, then the agents read the GPUs."""
        self.clock.now_s = self.scenario.start_unix_s + t
        await self.api.advance(t)
        publish = self.publishers[GPU_SAMPLES_TOPIC].publish
        for sampler in self.samplers:
            for event in sampler.sample():
                publish(GPU_SAMPLES_TOPIC, event.data.device_uuid, event)
                self.counts.samples += 1
        if t >= self._next_scrape_s:
            self._next_scrape_s = t + self.scrape_interval_s
            await self._scrape()
        self.check()
        await self._wait_for_backlog()

    async def _scrape(self) -> None:
        assert self._kube is not None and self._scraper is not None
        try:
            pods, _ = await self._kube.list_all("/api/v1/pods")
        except KubeApiError:
            return  # the next pass discovers again, as the scraper does in a cluster
        publish = self.publishers[TOKENS_TOPIC].publish
        for event in await self._scraper.scrape_all(targets_from_pods(pods)):
            publish(TOKENS_TOPIC, event.data.pod_uid, event)
            self.counts.token_deltas += 1

    def _emit_pod(self, emission: PodEmission) -> None:
        event = make_event(
            emission.info,
            event_id=emission.event_id,
            source=f"gpuledger/pods/{self.scenario.cluster}",
            time_ms=emission.time_ms,
        )
        self.publishers[PODS_TOPIC].publish(PODS_TOPIC, emission.info.uid, event)
        self.counts.pod_events += 1

    def _emit_node(self, emission: NodeEmission) -> None:
        event = make_event(
            emission.info,
            event_id=emission.event_id,
            source=f"gpuledger/pods/{self.scenario.cluster}",
            time_ms=emission.time_ms,
        )
        self.publishers[PODS_TOPIC].publish(NODES_TOPIC, emission.key, event)
        self.counts.node_events += 1

    async def wait_synced(self, timeout_s: float = 30.0) -> None:
        """Until the pod watcher has listed the cluster once (its first pod events are out)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._watcher is not None and not self._watcher.synced:
            self.check()
            if loop.time() > deadline:
                raise TimeoutError("the pod watcher did not list the simulated cluster")
            await asyncio.sleep(0.05)

    def check(self) -> None:
        """Raise if a publisher's sender or the pod watcher died."""
        for publisher in self.publishers.values():
            publisher.check()
        task = self._watch_task
        if task is not None and task.done() and not task.cancelled():
            exc = task.exception()
            if exc is not None:
                raise exc

    def backlog(self) -> int:
        return sum(len(p.buffer) for p in self.publishers.values())

    async def _wait_for_backlog(self) -> None:
        while self.backlog() > BACKLOG_PAUSE_EVENTS:
            self.check()
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Stop watching and scraping, then send everything still buffered."""
        self._watch_stop.set()
        if self._watch_task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._watch_task, timeout=5.0)
        for sampler in self.samplers:
            sampler.close()
        if self._kube is not None:
            await self._kube.close()
        if self._scrape_session is not None:
            await self._scrape_session.close()
        await self.api.stop()
        for publisher in self.publishers.values():
            await publisher.stop()

"""The node events of `gpuledger.nodes` into ClickHouse's `node_events`, one row per event.

Every worker reads the compacted topic whole at start and keeps following it, as it does the
pods topic (streams.worker.tables): outside any consumer group, nothing committed. That is
at-least-once, and harmless: an event read again is the same row, and the table keeps one row
per (cluster, node, time, event_id). Bad records are dead-lettered as on every input topic.
The loop runs beside the stages and nothing waits for it: the stages start without it having
caught up, and its writes retry in its own task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from runtime.kafka import KafkaSettings
from schemas.events import NODE_TYPE, NODES_TOPIC, CloudEvent, NodeInfo
from streams.rows import NodeEventRow
from streams.worker.clocks import ClockCheck
from streams.worker.intake import Intake
from streams.worker.outbox import Outbox
from streams.worker.runner import FETCH_MAX_RECORDS, all_partitions_consumer, write_then_commit
from streams.worker.sinks import Sinks

log = logging.getLogger("gpuledger.worker")

FETCH_TIMEOUT_MS = 200
FETCH_RETRY_S = 1.0


def node_row(event: CloudEvent[NodeInfo]) -> NodeEventRow:
    node = event.data
    return NodeEventRow(
        cluster=node.cluster,
        node=node.node,
        provider_id=node.provider_id,
        instance_type=node.instance_type,
        gpus=node.gpus,
        cpu_millicores=node.cpu_millicores,
        memory_bytes=node.memory_bytes,
        deleted=node.deleted,
        time_ms=event.time_ms,
        event_id=event.id,
        gpu_capacity=dict(node.gpu_capacity),
    )


class NodesTable:
    """Follows the nodes topic from its first record and stores each event (`follow`)."""

    def __init__(
        self,
        settings: KafkaSettings,
        partitions: int,
        intake: Intake,
        sinks: Sinks,
        *,
        max_clock_skew_s: float,
    ) -> None:
        self.consumer = all_partitions_consumer(settings)
        self.tps = [TopicPartition(NODES_TOPIC, p) for p in range(partitions)]
        self.intake = intake
        # Node events carry the node's creation time from the API server: no clock offsets.
        self.clock = ClockCheck(intake, max_clock_skew_s, offsets=False)
        self.sinks = sinks
        self.outbox = Outbox()
        self.read = 0  # records read since start
        self._started = False

    def handle(self, msg: ConsumerRecord, outbox: Outbox) -> bool:
        """One record: its row into `outbox`, or its dead letter. True if it was a node event."""
        decoded = self.intake.decode(msg, NODE_TYPE, outbox)
        if decoded is None or not self.clock.check(msg, decoded.event, time.time(), outbox):
            return False
        outbox.rows.append(node_row(decoded.event))
        self.intake.metrics.events_used(msg.topic)
        return True

    async def follow(self, stopping: asyncio.Event) -> None:
        """Read from the beginning, then keep reading, until `stopping`; what is read is
        written before the next fetch."""
        await self.consumer.start()
        self._started = True
        self.consumer.assign(self.tps)
        await self.consumer.seek_to_beginning(*self.tps)
        while not stopping.is_set():
            try:
                batch = await self.consumer.getmany(
                    timeout_ms=FETCH_TIMEOUT_MS, max_records=FETCH_MAX_RECORDS
                )
            except KafkaError as exc:
                log.warning("nodes: fetch failed: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), timeout=FETCH_RETRY_S)
                continue
            for records in batch.values():
                for msg in records:
                    self.handle(msg, self.outbox)
                    self.read += 1
            if len(self.outbox):
                await write_then_commit(self.outbox, self.sinks, "nodes", None)
        if len(self.outbox):  # stopping: one more attempt; else the next start reads them again
            await write_then_commit(self.outbox, self.sinks, "nodes", None, patient=False)

    async def stop(self) -> None:
        if self._started:
            # a group-less consumer cancels a task it just created: let it start first
            await asyncio.sleep(0)
            await self.consumer.stop()

"""A billing system reading gpuledger as a faust app: one agent over `gpuledger.cost-windows`
keeps, per row key (`window_start|device_uuid|pod_uid`), the row with the highest version in a
faust Table; per-team totals are summed from that table when asked for.

    pip install faust-streaming             # or gpuledger's extra: pip install 'gpuledger[faust]'
    GPULEDGER_KAFKA_BOOTSTRAP=localhost:29092 \\
        python faust_billing.py worker -l info --web-port 6066
    curl -s localhost:6066/totals/

/totals/ answers {"teams": {team: cost_usd as a decimal string}, "rows": keys held,
"events_seen": messages read since this process started, "read_up_to": {partition: next
offset} (caught up when it equals the topic's end offsets), "ready": false while the table is
being restored or the group rebalances}.

Why the highest version per key and not a running sum: gpuledger re-sends a row at a higher
version when it corrects it (a pod's labels arrived late), a replay re-sends it at the same
version, and faust redelivers every message after its last committed offset when a worker is
killed. A table that adds `cost_usd` counts all of those again (measured: +11 % after a SIGKILL,
with `processing_guarantee="exactly_once"` too); a table holding the highest version per key is
unchanged by any redelivery, as ClickHouse's ReplacingMergeTree read with FINAL is. The totals
are a view of that table, never state of their own. Money stays a decimal string in the table
and is summed as Decimal, never float.

faust traps this app avoids:
- A table's changelog topic must have as many partitions as its source topic, or faust stops
  with PartitionsMismatch: the app reads the source topic's partition count at start and gives
  it to the table. The changelog keeps the count it was created with: after adding partitions
  to the source topic, start under a new app id (the new changelog is rebuilt from the topic).
- Message keys are bytes: the table is declared `key_type=bytes`; without it, restoring the
  table after a restart loops on "Error in recovery".
- The store is `memory://`: the changelog topic (`<app id>-rows-changelog`, compacted) is the
  state, read back into memory at each start; no RocksDB to install or to lose.
- A Table, not a GlobalTable (whose recovery stalls with multi-partition sources). One worker
  holds every partition; with several, each holds and totals only the partitions it is assigned.

Settings, from the environment:
    GPULEDGER_KAFKA_BOOTSTRAP   host:port[,host:port]   (default localhost:29092)
    GPULEDGER_BILLING_TOPIC     the source topic        (default gpuledger.cost-windows)
    GPULEDGER_BILLING_APP_ID    faust app id: the consumer group and the changelog topic's prefix
                                (default gpuledger-billing)
    GPULEDGER_BILLING_<NAME>    any faust setting by its environment name, e.g.
                                GPULEDGER_BILLING_APP_DATADIR (default ./<app id>-data),
                                GPULEDGER_BILLING_BROKER_SESSION_TIMEOUT (default 60 s: a worker
                                restarted after a kill gets its partitions only once the killed
                                one's session has expired)
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

import faust
from aiokafka.admin import AIOKafkaAdminClient
from faust.web import Request, Response, View

TOPIC = "gpuledger.cost-windows"
ENV_PREFIX = "GPULEDGER_BILLING_"


class Entry(faust.Record, serializer="json"):
    """What the ledger keeps of one cost row: enough to total it and to order its versions."""

    version: int
    team: str
    cost_usd: str  # a decimal string, as on the topic


def newer(seen: Entry | None, row: Mapping[str, Any]) -> Entry | None:
    """The entry to store for `row`, or None when `seen` holds a higher version. On equal
    versions the later message wins, as in ClickHouse's ReplacingMergeTree."""
    version = int(row["version"])
    if seen is not None and seen.version > version:
        return None
    return Entry(version=version, team=str(row["team"]), cost_usd=str(row["cost_usd"]))


def cost_by_team(entries: Iterable[Entry]) -> dict[str, Decimal]:
    totals: dict[str, Decimal] = {}
    for entry in entries:
        totals[entry.team] = totals.get(entry.team, Decimal(0)) + Decimal(entry.cost_usd)
    return dict(sorted(totals.items()))


async def partition_count(bootstrap: str, topic: str) -> int:
    """How many partitions `topic` has (the table's changelog must have as many)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if described["error_code"] or not described["partitions"]:
        raise SystemExit(f"topic {topic!r} not found on {bootstrap}: start gpuledger first")
    return len(described["partitions"])


def build_app(bootstrap: str, topic: str, app_id: str, partitions: int) -> faust.App:
    app = faust.App(
        app_id,
        broker=";".join(f"kafka://{host}" for host in bootstrap.split(",")),
        store="memory://",
        topic_partitions=partitions,
        consumer_auto_offset_reset="earliest",
        env_prefix=ENV_PREFIX,
    )
    source = app.topic(topic, key_type=bytes, value_serializer="json")
    rows = app.Table("rows", key_type=bytes, value_type=Entry, partitions=partitions)
    events_seen = 0  # since this process started: how much a restart re-read
    read_up_to: dict[int, int] = {}  # partition -> next offset: caught up when it is the end

    @app.agent(source)
    async def keep_latest(stream: faust.StreamT[Any]) -> None:
        nonlocal events_seen
        async for event in stream.events():
            events_seen += 1
            read_up_to[event.message.partition] = event.message.offset + 1
            key, row = event.key, event.value
            if key is None or row is None:
                continue
            entry = newer(rows.get(key), row)
            if entry is not None:
                rows[key] = entry

    @app.page("/totals/")
    async def totals(web: View, request: Request) -> Response:
        by_team = cost_by_team(rows.values())
        return web.json(
            {
                "teams": {team: format(cost, "f") for team, cost in by_team.items()},
                "rows": len(rows),
                "events_seen": events_seen,
                "read_up_to": read_up_to,
                "ready": not (app.in_recovery or app.rebalancing),
            }
        )

    return app


def main() -> None:
    bootstrap = os.environ.get("GPULEDGER_KAFKA_BOOTSTRAP", "localhost:29092")
    topic = os.environ.get(f"{ENV_PREFIX}TOPIC", TOPIC)
    app_id = os.environ.get(f"{ENV_PREFIX}APP_ID", "gpuledger-billing")
    partitions = asyncio.run(partition_count(bootstrap, topic))
    build_app(bootstrap, topic, app_id, partitions).main()  # faust's command line: `worker`


if __name__ == "__main__":
    main()

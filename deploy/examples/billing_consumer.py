"""A billing system reading gpuledger: consume `gpuledger.cost-windows`, keep the highest version
of every row (key `window_start|device_uuid|pod_uid`), and total `cost_usd` per team.

gpuledger re-emits a row with a higher version when it corrects it (a pod's labels arrived late,
a late sample came in), and a replay can send the same row again: summing every message would
count both. Keeping the latest version per key, as ClickHouse's ReplacingMergeTree does, gives
each row once. Money arrives as decimal strings: sum them as Decimal, never as float.

    pip install aiokafka orjson
    python billing_consumer.py --bootstrap localhost:29092 --from-beginning --idle-exit-s 10

This example holds its ledger in memory; a real billing system stores it (with the offsets it
has applied) and commits offsets only after the ledger is saved.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer

TOPIC = "gpuledger.cost-windows"


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    version: int
    team: str
    cost_usd: Decimal


@dataclass
class CostLedger:
    """The latest version of every cost row; on equal versions the later message wins."""

    entries: dict[str, LedgerEntry] = field(default_factory=dict)

    def apply(self, row: Mapping[str, Any], key: str | None = None) -> bool:
        """Fold one row in; returns False when an already-seen higher version supersedes it."""
        key = key or f"{row['window_start_ms']}|{row['device_uuid']}|{row['pod_uid']}"
        version = int(row["version"])
        seen = self.entries.get(key)
        if seen is not None and seen.version > version:
            return False
        self.entries[key] = LedgerEntry(version, str(row["team"]), Decimal(str(row["cost_usd"])))
        return True

    def cost_by_team(self) -> dict[str, Decimal]:
        totals: dict[str, Decimal] = {}
        for entry in self.entries.values():
            totals[entry.team] = totals.get(entry.team, Decimal(0)) + entry.cost_usd
        return dict(sorted(totals.items()))


async def consume(
    bootstrap: str,
    *,
    topic: str = TOPIC,
    group_id: str | None = None,
    from_beginning: bool = True,
    idle_exit_s: float | None = None,
    ledger: CostLedger | None = None,
) -> CostLedger:
    """Read `topic` into a ledger until no message arrives for `idle_exit_s` (forever if None)."""
    ledger = ledger if ledger is not None else CostLedger()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,  # commit only what the ledger has stored (see above)
        auto_offset_reset="earliest" if from_beginning else "latest",
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        while True:
            timeout_ms = int(idle_exit_s * 1000) if idle_exit_s is not None else 1000
            batches = await consumer.getmany(timeout_ms=timeout_ms)
            if not batches and idle_exit_s is not None:
                return ledger
            for messages in batches.values():
                for message in messages:
                    if message.value is None:
                        continue
                    key = message.key.decode() if message.key else None
                    ledger.apply(orjson.loads(message.value), key)
    finally:
        await consumer.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bootstrap", default="localhost:29092", help="Kafka host:port list")
    parser.add_argument("--topic", default=TOPIC)
    parser.add_argument("--group-id", default=None, help="consumer group (default: none)")
    parser.add_argument("--from-beginning", action="store_true")
    parser.add_argument(
        "--idle-exit-s", type=float, default=None, help="print totals and exit after this idle"
    )
    args = parser.parse_args(argv)
    ledger = asyncio.run(
        consume(
            args.bootstrap,
            topic=args.topic,
            group_id=args.group_id,
            from_beginning=args.from_beginning,
            idle_exit_s=args.idle_exit_s,
        )
    )
    for team, cost in ledger.cost_by_team().items():
        print(f"{team}\t{cost:f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The bill tables in ClickHouse (schemas/clickhouse_bills.sql): what is imported, the node
identities and metered rows the true-up reads, and writing a slice's next version."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from streams.billing.lines import BillLine
from streams.billing.slices import latest_versions_sql
from streams.billing.trueup import MeteredRow, NodeIdentity, TrueupRow
from streams.reports.sources import cost_source, read_plan
from streams.rollups import COST_DIMENSIONS
from streams.store import ClickHouseStore

_LINE_COLUMNS = [
    "slice",
    "version",
    "line_no",
    "source",
    "charge_period_start",
    "charge_period_end",
    "charge_category",
    "charge_class",
    "resource_id",
    "resource_name",
    "resource_key",
    "instance_type",
    "gpu_instance",
    "service_name",
    "sku_id",
    "region_id",
    "billed_cost",
    "effective_cost",
    "list_cost",
    "billing_currency",
]
_TRUEUP_DIMS = [d for d in COST_DIMENSIONS if d != "kind"]  # MeteredRow.dims()
_TRUEUP_COLUMNS = [
    "slice",
    "version",
    "hour",
    "resource_key",
    "instance_type",
    *_TRUEUP_DIMS,
    "kind",
    "device_seconds",
    "metered_cost_usd",
    "effective_cost",
    "billed_cost",
    "billing_currency",
]


@dataclass(frozen=True, slots=True)
class SliceVersion:
    slice: str
    provider: str
    billing_account_id: str
    billing_period_start_ms: int
    billing_period_end_ms: int
    billing_currency: str
    version: int
    fingerprint: str
    lines: int
    changed_periods: int
    source_files: tuple[str, ...]
    imported_at_ms: int
    non_gpu_rule: str = ""  # NonGpuRule.text() of the true-up rows of this version


def latest_versions(store: ClickHouseStore) -> dict[str, SliceVersion]:
    """The newest finished version of every slice."""
    db = store.database
    rows = store.query_rows(
        "SELECT slice, provider, billing_account_id, toUnixTimestamp(billing_period_start), "
        "toUnixTimestamp(billing_period_end), billing_currency, version, fingerprint, lines, "
        "changed_periods, source_files, toUnixTimestamp64Milli(imported_at), non_gpu_rule "
        f"FROM {db}.bill_versions FINAL WHERE {latest_versions_sql(db)} ORDER BY slice"
    )
    return {
        str(r[0]): SliceVersion(
            slice=str(r[0]),
            provider=str(r[1]),
            billing_account_id=str(r[2]),
            billing_period_start_ms=int(r[3]) * 1000,
            billing_period_end_ms=int(r[4]) * 1000,
            billing_currency=str(r[5]),
            version=int(r[6]),
            fingerprint=str(r[7]),
            lines=int(r[8]),
            changed_periods=int(r[9]),
            source_files=tuple(str(f) for f in r[10]),
            imported_at_ms=int(r[11]),
            non_gpu_rule=str(r[12]),
        )
        for r in rows
    }


def highest_version(store: ClickHouseStore, slice_id: str) -> int:
    """The highest version any write of the slice used, finished or not (0: none): a new
    version goes above it, so a half-written one is never reused."""
    db = store.database
    found = store.query_rows(
        f"SELECT greatest((SELECT max(version) FROM {db}.bill_lines WHERE slice = %(s)s), "
        f"(SELECT max(version) FROM {db}.billed_cost_hourly WHERE slice = %(s)s), "
        f"(SELECT max(version) FROM {db}.bill_versions WHERE slice = %(s)s))",
        {"s": slice_id},
    )
    return int(found[0][0] or 0) if found else 0


def read_charge_lines(store: ClickHouseStore, slice_id: str, version: int) -> list[BillLine]:
    """The lines of a slice's version that have a ResourceId, as BillLines (what the true-up
    reads; the slice's own columns are left empty)."""
    db = store.database
    rows = store.query_rows(
        "SELECT toUnixTimestamp(charge_period_start), toUnixTimestamp(charge_period_end), "
        "charge_category, charge_class, resource_id, resource_name, resource_key, instance_type, "
        "gpu_instance, service_name, sku_id, region_id, billed_cost, effective_cost, list_cost, "
        f"billing_currency FROM {db}.bill_lines FINAL "
        "WHERE slice = %(s)s AND version = %(v)s AND resource_key != '' ORDER BY line_no",
        {"s": slice_id, "v": version},
    )
    return [
        BillLine(
            provider="",
            billing_account_id="",
            billing_period_start_ms=0,
            billing_period_end_ms=0,
            charge_period_start_ms=int(r[0]) * 1000,
            charge_period_end_ms=int(r[1]) * 1000,
            charge_category=str(r[2]),
            charge_class=str(r[3]),
            resource_id=str(r[4]),
            resource_name=str(r[5]),
            resource_key=str(r[6]),
            instance_type=str(r[7]),
            gpu_instance=bool(r[8]),
            service_name=str(r[9]),
            sku_id=str(r[10]),
            region_id=str(r[11]),
            billed_cost=r[12],
            effective_cost=r[13],
            list_cost=r[14],
            billing_currency=str(r[15]),
        )
        for r in rows
    ]


def read_identities(store: ClickHouseStore) -> list[NodeIdentity]:
    """Every node identity the watcher published (node_events), deletions left out: a deleted
    node's last identity still names its past hours."""
    db = store.database
    rows = store.query_rows(
        "SELECT cluster, node, provider_id, toUnixTimestamp64Milli(time), instance_type, gpus, "
        f"cpu_millicores, memory_bytes FROM {db}.node_events FINAL WHERE deleted = 0 "
        "ORDER BY cluster, node, time, event_id"
    )
    return [
        NodeIdentity(
            cluster=str(r[0]),
            node=str(r[1]),
            provider_id=str(r[2]),
            since_ms=int(r[3]),
            instance_type=str(r[4]),
            gpus=int(r[5]),
            cpu_millicores=int(r[6]),
            memory_bytes=int(r[7]),
        )
        for r in rows
    ]


def read_metered(
    store: ClickHouseStore, start_ms: int, end_ms: int, nodes: Iterable[tuple[str, str]]
) -> list[MeteredRow]:
    """The hourly metered rows of `nodes` in [start, end): sealed rollups where sealed, base
    rows elsewhere, as every report reads them."""
    wanted = sorted(set(nodes))
    if not wanted or end_ms <= start_ms:
        return []
    db = store.database
    plan = read_plan(store, start_ms, end_ms, use_rollups=True)
    source = cost_source(db, plan)
    pairs = ", ".join(f"({_quote(c)}, {_quote(n)})" for c, n in wanted)
    dims = ", ".join(COST_DIMENSIONS)
    rows = store.query_rows(
        f"SELECT toUnixTimestamp(hour), {dims}, sum(device_seconds), sum(cost_usd) "
        f"FROM {source} WHERE hour >= toDateTime({start_ms // 1000}, 'UTC') "
        f"AND hour < toDateTime({-(-end_ms // 1000)}, 'UTC') "
        f"AND (cluster, node) IN ({pairs}) GROUP BY hour, {dims}"
    )
    # MeteredRow's fields are the hour, COST_DIMENSIONS in their order, then the two sums.
    width = len(COST_DIMENSIONS)
    fields: list[tuple[Any, ...]] = [
        (int(r[0]) * 1000, *r[1 : width + 1], float(r[width + 1]), r[width + 2]) for r in rows
    ]
    return [MeteredRow(*f) for f in fields]


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def write_lines(
    store: ClickHouseStore,
    slice_id: str,
    version: int,
    lines: Sequence[tuple[str, BillLine]],
    *,
    batch: int = 50_000,
) -> None:
    """A slice's lines (with their `file:line`) under `version`."""
    for at in range(0, len(lines), batch):
        values = [
            (
                slice_id,
                version,
                at + n,
                source,
                _utc(line.charge_period_start_ms),
                _utc(line.charge_period_end_ms),
                line.charge_category,
                line.charge_class,
                line.resource_id,
                line.resource_name,
                line.resource_key,
                line.instance_type,
                int(line.gpu_instance),
                line.service_name,
                line.sku_id,
                line.region_id,
                line.billed_cost,
                line.effective_cost,
                line.list_cost,
                line.billing_currency,
            )
            for n, (source, line) in enumerate(lines[at : at + batch])
        ]
        store.insert_values(
            "bill_lines", _LINE_COLUMNS, values, dedup_token=f"lines:{slice_id}:{version}:{at}"
        )


def write_trueup(
    store: ClickHouseStore,
    slice_id: str,
    version: int,
    rows: Sequence[TrueupRow],
    *,
    batch: int = 50_000,
) -> None:
    for at in range(0, len(rows), batch):
        values = [
            (slice_id, version, _utc(row.hour_ms), *_trueup_values(row))
            for row in rows[at : at + batch]
        ]
        store.insert_values(
            "billed_cost_hourly",
            _TRUEUP_COLUMNS,
            values,
            dedup_token=f"trueup:{slice_id}:{version}:{at}",
        )


def copy_trueup(
    store: ClickHouseStore, slice_id: str, old: int, new: int, skip_hours_ms: Iterable[int]
) -> None:
    """The true-up rows of version `old` outside `skip_hours_ms`, again under version `new`."""
    skip = ", ".join(f"toDateTime({h // 1000}, 'UTC')" for h in sorted(set(skip_hours_ms)))
    _copy_version(
        store,
        "billed_cost_hourly",
        _TRUEUP_COLUMNS,
        slice_id,
        old,
        new,
        f" AND hour NOT IN ({skip})" if skip else "",
    )


def _copy_version(
    store: ClickHouseStore,
    table: str,
    columns: list[str],
    slice_id: str,
    old: int,
    new: int,
    where: str = "",
) -> None:
    """`INSERT ... SELECT` of a slice's rows of version `old` (and `where`) under `new`."""
    db = store.database
    selected = ", ".join(f"{int(new)}" if c == "version" else c for c in columns)
    store.command(
        f"INSERT INTO {db}.{table} ({', '.join(columns)}) SELECT {selected} "
        f"FROM {db}.{table} FINAL WHERE slice = %(s)s AND version = {int(old)}{where}",
        {"s": slice_id},
    )


def finish_version(store: ClickHouseStore, version: SliceVersion) -> None:
    """The slice's bill_versions row: from now on `version` is what readers see."""
    store.insert_values(
        "bill_versions",
        [
            "slice",
            "provider",
            "billing_account_id",
            "billing_period_start",
            "billing_period_end",
            "billing_currency",
            "version",
            "fingerprint",
            "lines",
            "changed_periods",
            "source_files",
            "imported_at",
            "non_gpu_rule",
        ],
        [
            (
                version.slice,
                version.provider,
                version.billing_account_id,
                _utc(version.billing_period_start_ms),
                _utc(version.billing_period_end_ms),
                version.billing_currency,
                version.version,
                version.fingerprint,
                version.lines,
                version.changed_periods,
                list(version.source_files),
                _utc(version.imported_at_ms),
                version.non_gpu_rule,
            )
        ],
    )


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _utc(time_ms: int) -> datetime:
    return datetime.fromtimestamp(time_ms / 1000, UTC)


def copy_lines(store: ClickHouseStore, slice_id: str, old: int, new: int) -> None:
    """A slice's lines of version `old`, again under version `new`."""
    _copy_version(store, "bill_lines", _LINE_COLUMNS, slice_id, old, new)


def read_trueup(store: ClickHouseStore, slice_id: str, version: int) -> list[tuple[object, ...]]:
    """A version's true-up rows as plain tuples (hour in Unix s), sorted: for comparing."""
    db = store.database
    columns = ", ".join(
        "toUnixTimestamp(hour)" if c == "hour" else c
        for c in _TRUEUP_COLUMNS
        if c not in ("slice", "version")
    )
    return sorted(
        store.query_rows(
            f"SELECT {columns} FROM {db}.billed_cost_hourly FINAL "
            "WHERE slice = %(s)s AND version = %(v)s",
            {"s": slice_id, "v": version},
        ),
        key=repr,
    )


def trueup_tuples(rows: Sequence[TrueupRow]) -> list[tuple[object, ...]]:
    """TrueupRows shaped as read_trueup returns them."""
    return sorted(((row.hour_ms // 1000, *_trueup_values(row)) for row in rows), key=repr)


def _trueup_values(row: TrueupRow) -> tuple[object, ...]:
    """A true-up row's columns after `hour`, in _TRUEUP_COLUMNS order."""
    return (
        row.resource_key,
        row.instance_type,
        *row.dims,
        row.kind,
        row.device_seconds,
        row.metered_cost_usd,
        row.effective_cost,
        row.billed_cost,
        row.currency,
    )

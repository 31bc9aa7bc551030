"""`bill import` of provider-realistic bills: focus-data-toolkit's month of an AWS, Azure or
Google Cloud account with the simulated cluster's GPU instances in that provider's shape
(tests/provider_bills.py; validated by focus-validator in test_provider_bills.py), FOCUS 1.2 and
1.3, CSV and Parquet. The cluster's metered nodes answer to their providerIDs; every dollar of
the bill's GPU instances is found again, exactly, in the true-up: metered nodes' lines on
their metered rows, a known node without metering and a GPU instance the cluster does not have
as unmetered spend, nothing of the toolkit's other services."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from provider_bills import (
    CLUSTER_HOURS_MS,
    MAY_2026_MS,
    bill_nodes,
    cluster_nodes,
    provider_bill,
    read_csv_rows,
    unmetered_nodes,
)
from test_reports_data import cluster_rows, fresh_store

from streams.billing.importer import ImportOptions, import_bills
from streams.billing.slices import KIND_UNMETERED, latest_versions_sql
from streams.reports.params import Period
from streams.reports.showback import showback
from streams.rows import Row
from streams.store import ClickHouseStore

pytestmark = pytest.mark.slow
HOURS = len(CLUSTER_HOURS_MS)
_METERED: list[Row] = []


def metered() -> list[Row]:
    """The test cluster's rows (nodes n1 and n2) over the bill's 72 hours, made once."""
    if not _METERED:
        _METERED.extend(cluster_rows(hours=HOURS, start_ms=MAY_2026_MS, window_minutes_step=20))
    return _METERED


def store_for(provider: str) -> ClickHouseStore:
    """A store with the metered rows and node identities: n1 and n2 are the provider's first
    two cluster nodes, n3 (no metering) the third."""
    store = fresh_store()
    store.insert_rows(metered())
    at = datetime.fromtimestamp(MAY_2026_MS / 1000 - 3600, UTC)
    nodes = cluster_nodes(provider)  # type: ignore[arg-type]
    store.insert_values(
        "node_events",
        ["cluster", "node", "provider_id", "instance_type", "gpus", "cpu_millicores",
         "memory_bytes", "deleted", "time", "event_id"],
        [("c1", f"n{i + 1}", n.provider_id, n.instance_type, 8, 96_000, 1024 * 2**30, 0, at,
          f"e{i}") for i, n in enumerate(nodes)],
    )  # fmt: skip
    return store


def instance_rows(rows: list[dict[str, Any]], provider: str) -> dict[str, list[dict[str, Any]]]:
    """The bill's rows of each GPU instance of the cluster (and of the unmetered one), by the
    ResourceId the generator gave it."""
    nodes = [*bill_nodes(provider), *unmetered_nodes(provider)]  # type: ignore[arg-type]
    ids = {n.instance.billed_resource_id(): n.provider_id for n in nodes}
    out: dict[str, list[dict[str, Any]]] = {pid: [] for pid in ids.values()}
    for row in rows:
        pid = ids.get(str(row.get("ResourceId") or ""))
        if pid is not None:
            out[pid].append(row)
    return out


def effective(rows: list[dict[str, Any]]) -> Decimal:
    return sum((Decimal(str(r["EffectiveCost"])) for r in rows), Decimal(0))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("provider", ["aws", "azure", "gcp"])
def test_every_gpu_dollar_of_the_provider_bill_is_trued_up_exactly(
    provider: str, version: str, fmt: str, tmp_path: Path
) -> None:
    store = store_for(provider)
    path = provider_bill(provider, version, tmp_path, fmt)  # type: ignore[arg-type]
    _, rows = read_csv_rows(provider_bill(provider, version, tmp_path, "csv"))  # type: ignore[arg-type]
    result = import_bills(store, [path], ImportOptions())
    assert result.imported and not result.bad_rows, result.bad_rows[:3]
    assert result.rows_read == len(rows)
    by_instance = instance_rows(rows, provider)
    assert all(by_instance.values()), "every instance has bill lines"
    nodes = cluster_nodes(provider)  # type: ignore[arg-type]
    (unmetered_pid,) = [n.provider_id for n in unmetered_nodes(provider)]  # type: ignore[arg-type]
    want_total = sum((effective(r) for r in by_instance.values()), Decimal(0))
    want_unmetered = effective(by_instance[nodes[2].provider_id]) + effective(
        by_instance[unmetered_pid]
    )
    db = store.database
    found = store.query_rows(
        f"SELECT sum(effective_cost), sumIf(effective_cost, kind = '{KIND_UNMETERED}'), "
        f"sumIf(effective_cost, node = 'n1'), sumIf(effective_cost, node = 'n2') "
        f"FROM {db}.billed_cost_hourly FINAL WHERE {latest_versions_sql(db)}"
    )[0]
    assert found[0] == want_total
    assert found[1] == want_unmetered
    assert found[2] == effective(by_instance[nodes[0].provider_id])
    assert found[3] == effective(by_instance[nodes[1].provider_id])
    period = Period(MAY_2026_MS, MAY_2026_MS + HOURS * 3_600_000)
    billed = showback(store, period, "team", basis="billed")
    assert billed.reconciles and billed.total_usd == want_total
    assert billed.unmetered_usd == want_unmetered
    again = import_bills(store, [path], ImportOptions())
    assert {s.status for s in again.slices} == {"unchanged"}

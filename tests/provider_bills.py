"""Provider bills for the simulated cluster, in each provider's shape: focus-data-toolkit's
generated month of an AWS, Azure or Google Cloud account (its services, accounts, commitments)
with `gpuledger.demo.bills.bill_rows` for the cluster's GPU nodes added, as CSV and Parquet.

    path = provider_bill("aws", "1.2", tmp_path, "parquet")

The toolkit writes May 2026 (BillingPeriodStart 2026-05-01) for billing accounts of its own; the
cluster's lines are added to the same month and to the toolkit's first billing account, under
the toolkit's provider names, so the file is one provider's bill. `bill_rows` must produce
exactly the toolkit's columns (`provider_columns=False`): the shape is the provider's.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from gpuledger.demo.bill_columns import AMOUNT_COLUMNS, TIME_COLUMNS
from gpuledger.demo.bills import BillNode, Provider, bill_rows, write_bill

TOOLKIT_VERSION = "0.14.1"
TOOLKIT_ROWS = 300
TOOLKIT_SEED = 7
HOUR_MS = 3_600_000
MAY_2026_MS = int(datetime(2026, 5, 1, tzinfo=UTC).timestamp() * 1000)
# Three days of the cluster in the toolkit's month.
CLUSTER_HOURS_MS = tuple(MAY_2026_MS + i * HOUR_MS for i in range(72))
_IDENTITY_COLUMNS = (
    "ProviderName",
    "PublisherName",
    "InvoiceIssuerName",
    "ServiceProviderName",
    "HostProviderName",
)
Row = dict[str, Any]


@dataclass(frozen=True)
class ClusterNode:
    """A node of the simulated cluster (what `agents.demo_nodes.demo_nodes()` gives)."""

    name: str
    provider_id: str
    instance_type: str


def aws_cluster_nodes() -> tuple[ClusterNode, ...]:
    """The demo cluster's nodes: `agents.demo_nodes.demo_nodes()` where it exists."""
    try:
        from agents.demo_nodes import demo_nodes
    except ImportError:  # pragma: no cover - until the demo has its nodes
        return (
            ClusterNode("gpu-node-1", "aws:///us-east-1a/i-29e4e063cd05dc998", "p5.48xlarge"),
            ClusterNode("gpu-node-2", "aws:///us-east-1b/i-555bfe0a81577d864", "p4d.24xlarge"),
            ClusterNode("gpu-node-3", "aws:///us-east-1a/i-31e6ff7985fdfc727", "g6e.12xlarge"),
        )
    return tuple(ClusterNode(n.name, n.provider_id, n.instance_type) for n in demo_nodes())


_AZURE_SUB = "11111111-1111-4111-8111-111111111111"
_AZURE_RG = (
    f"/subscriptions/{_AZURE_SUB}/resourceGroups/MC_gpu_demo_eastus/providers/Microsoft.Compute"
)
_GCP = "gce://examplecorp-prod-481627/us-central1-a"
# The same three GPU nodes on Azure (AKS scale-set instances and a standalone VM) and GKE.
AZURE_CLUSTER = (
    ClusterNode(
        "aks-h100-0",
        f"azure://{_AZURE_RG}/virtualMachineScaleSets/aks-h100-31415926-vmss/virtualMachines/0",
        "Standard_ND96isr_H100_v5",
    ),
    ClusterNode(
        "nd-a100-vm", f"azure://{_AZURE_RG}/virtualMachines/nd-a100-vm", "Standard_ND96asr_v4"
    ),
    ClusterNode(
        "aks-nc-0",
        f"azure://{_AZURE_RG}/virtualMachineScaleSets/aks-nca100-27182818-vmss/virtualMachines/0",
        "Standard_NC24ads_A100_v4",
    ),
)
GCP_CLUSTER = (
    ClusterNode("gke-h100", f"{_GCP}/gke-demo-h100-pool-1a2b3c4d-x1y2", "a3-highgpu-8g"),
    ClusterNode("gke-a100", f"{_GCP}/gke-demo-a100-pool-5e6f7a8b-z3w4", "a2-highgpu-8g"),
    ClusterNode("gke-l4", f"{_GCP}/gke-demo-l4-pool-9c0d1e2f-v5u6", "g2-standard-48"),
)
# (list, effective) USD per hour and pricing of the three nodes, in order: a savings plan, a
# reservation and spot. Illustrative prices, not quotes.
_PRICES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "aws": (
        ("98.32", "70.7904", "savings_plan"),
        ("40.96", "26.624", "reserved"),
        ("10.49", "4.196", "spot"),
    ),
    "azure": (
        ("98.32", "68.824", "savings_plan"),
        ("32.77", "20.6451", "reserved"),
        ("3.673", "1.4692", "spot"),
    ),
    "gcp": (
        ("88.25", "61.775", "savings_plan"),
        ("29.39", "18.5157", "reserved"),
        ("3.9975", "1.599", "spot"),
    ),
}
_UNMETERED = {
    "aws": ClusterNode("other-team", "aws:///us-east-1c/i-0fedcba9876543210", "p5.48xlarge"),
    "azure": ClusterNode(
        "other-team",
        f"azure://{_AZURE_RG}/virtualMachines/other-team-h100",
        "Standard_ND96isr_H100_v5",
    ),
    "gcp": ClusterNode("other-team", f"{_GCP}/other-team-a3", "a3-highgpu-8g"),
}


def cluster_nodes(provider: Provider) -> tuple[ClusterNode, ...]:
    return {"aws": aws_cluster_nodes, "azure": lambda: AZURE_CLUSTER, "gcp": lambda: GCP_CLUSTER}[
        provider
    ]()


def bill_nodes(provider: Provider) -> tuple[BillNode, ...]:
    """The cluster's nodes as BillNodes: a savings plan, a reservation and spot."""
    return tuple(
        BillNode(node.provider_id, node.instance_type, Decimal(lp), Decimal(ep), pricing)  # type: ignore[arg-type]
        for node, (lp, ep, pricing) in zip(cluster_nodes(provider), _PRICES[provider], strict=True)
    )


def unmetered_nodes(provider: Provider) -> tuple[BillNode, ...]:
    """A GPU instance on the same bill that the cluster does not meter, on demand."""
    node = _UNMETERED[provider]
    price = Decimal(_PRICES[provider][0][0])
    return (BillNode(node.provider_id, node.instance_type, price, price, "on_demand"),)


def toolkit_file(provider: str, version: str, out_dir: Path) -> Path:
    """focus-data-toolkit's Cost and Usage CSV for the provider and FOCUS version (cached)."""
    target = out_dir / f"toolkit-{provider}-{version}"
    name = f"focus_{version.replace('.', '_')}_cost_and_usage_{provider}.csv"
    if not (target / name).exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "focus_data_toolkit",
                "generate",
                "--provider",
                provider,
                "--focus-version",
                version,
                "--rows",
                str(TOOLKIT_ROWS),
                "--seed",
                str(TOOLKIT_SEED),
                "--out",
                str(target),
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
    return target / name


def read_csv_rows(path: Path) -> tuple[list[str], list[Row]]:
    """A FOCUS CSV's header and its rows with typed values (Decimal amounts, UTC datetimes,
    None for empty fields), as `bill_rows` gives them."""
    with path.open(newline="", encoding="utf-8") as source:
        reader = csv.DictReader(source)
        header = list(reader.fieldnames or ())
        rows = [{name: _typed(name, text) for name, text in row.items()} for row in reader]
    return header, rows


def _typed(name: str, text: str | None) -> Any:
    if text is None or text == "":
        return None
    if name in AMOUNT_COLUMNS:
        return Decimal(text)
    if name in TIME_COLUMNS:
        return datetime.fromisoformat(text).astimezone(UTC)
    return text


def cluster_rows(
    provider: Provider, version: str, header: Sequence[str], toolkit: Sequence[Row]
) -> list[Row]:
    """`bill_rows` for the cluster in the toolkit's billing account and provider names."""
    first = toolkit[0]
    rows = bill_rows(
        provider,
        version,
        bill_nodes(provider),
        CLUSTER_HOURS_MS,  # type: ignore[arg-type]
        billing_account_id=str(first["BillingAccountId"]),
        unmetered=unmetered_nodes(provider),
        provider_columns=False,
        seed=TOOLKIT_SEED,
    )
    if list(rows[0]) != list(header):
        raise AssertionError(
            f"bill_rows' columns are not the toolkit's {provider} {version} columns: "
            f"extra {sorted(set(rows[0]) - set(header))}, "
            f"missing {sorted(set(header) - set(rows[0]))}"
        )
    for row in rows:
        row["BillingAccountName"] = first["BillingAccountName"]
        for name in _IDENTITY_COLUMNS:
            if name in header:
                row[name] = first[name]
    return rows


def provider_bill(
    provider: Provider, version: str, out_dir: Path, fmt: Literal["csv", "parquet"]
) -> Path:
    """The provider's month: the toolkit's rows, then the cluster's, written as `fmt`."""
    header, toolkit = read_csv_rows(toolkit_file(provider, version, out_dir))
    rows = [*toolkit, *cluster_rows(provider, version, header, toolkit)]
    path = out_dir / f"bill-{provider}-{version}.{fmt}"
    write_bill(path, rows, fmt)
    return path

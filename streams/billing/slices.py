"""Bill slices and their versions: one slice is one (provider, billing account, billing period
start); each import that changes a slice writes it again under the next version."""

from __future__ import annotations

# Kinds of true-up rows besides the metered kinds (usage, idle, host) they were allocated over.
KIND_NON_GPU = "non_gpu"  # the part of a GPU instance the non-GPU rule keeps off GPU users
KIND_UNMETERED = "unmetered"  # a GPU instance on the bill with no metering in the period


def slice_id(provider: str, billing_account_id: str, billing_period_start: str) -> str:
    """`billing_period_start` as `YYYY-MM-DDTHH:MM:SSZ`."""
    return f"{provider}|{billing_account_id}|{billing_period_start}"


def latest_versions_sql(database: str) -> str:
    """A condition on a table with `slice` and `version` columns: only the newest finished
    version of each slice (a version is finished once its bill_versions row is written)."""
    return (
        f"(slice, version) IN (SELECT slice, max(version) FROM {database}.bill_versions "
        "GROUP BY slice)"
    )

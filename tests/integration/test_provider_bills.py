"""Provider bills for the simulated cluster through the FinOps Foundation's validator
(focus-validator, FOCUS 1.2 rules, offline, every applicability criterion): for AWS, Azure and
Google Cloud, FOCUS 1.2 and 1.3, as CSV and Parquet, focus-data-toolkit's month with the
cluster's lines added fails no rule that the toolkit's month alone does not, and those are
listed below with their reasons; `bill_rows` alone, and a month `restate` re-issued, fail only
the rule model's defects.

The validator has only the 1.2 model, so a 1.3 file is checked against the 1.2 rules: every
column 1.2 and 1.3 share (names, types, nullability, allowed values, the cost relations). It
cannot check what 1.3 added or changed: ServiceProviderName and HostProviderName (mandatory in
1.3), ProviderName and PublisherName being deprecated, ContractApplied and the Allocated*
columns; no rule of the report names them.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import pytest
from focus_validator import KNOWN_MODEL_ARTIFACTS, ValidatorReport, run_validator
from provider_bills import (
    CLUSTER_HOURS_MS,
    TOOLKIT_SEED,
    bill_nodes,
    provider_bill,
    toolkit_file,
    unmetered_nodes,
)

from gpuledger.demo.bills import Provider, bill_rows, restate, write_bill

pytestmark = pytest.mark.slow

PROVIDERS: tuple[Provider, ...] = ("aws", "azure", "gcp")
VERSIONS = ("1.2", "1.3")
CRITERIA = ("ALL",)
# Rules of the 1.2.0.1 model that fail on any data with these columns, whatever its values.
MODEL_DEFECTS = {
    **KNOWN_MODEL_ARTIFACTS,
    "CapacityReservationStatus-C-004-C": (
        "'MUST NOT be null when CapacityReservationId is not null and ChargeCategory is Usage': "
        "the validator applies it to every row, so a bill without capacity reservations (an "
        "all-null CapacityReservationId) fails it on every row"
    ),
    "CommitmentDiscountStatus-C-004-C": (
        "'MUST NOT be null when CommitmentDiscountId is not null and ChargeCategory is Usage': "
        "the model's condition is 'CommitmentDiscountId is null', so every line without a "
        "commitment discount fails it"
    ),
}
# Failures of focus-data-toolkit's own months (measured below), and why.
TOOLKIT_FAILURES = {
    **MODEL_DEFECTS,
    "EffectiveCost-C-005-C": (
        "'EffectiveCost MUST be 0 when ChargeCategory is Purchase and the purchase is intended "
        "to cover future eligible charges': the model leaves out the second condition, so the "
        "toolkit's subscription fees (Purchase lines whose EffectiveCost is their BilledCost, "
        "as the specification wants) fail it; the cluster's commitment fees are 0 and pass"
    ),
}
# In CSV the validator infers each column's type from its text: AWS account ids are 12 digits,
# read as integers. Parquet, with string columns, passes.
AWS_CSV_FAILURES = {
    "BillingAccountId-C-002-M": "AWS's all-digit account ids, typed as integers from CSV text",
    "SubAccountId-C-001-M": "AWS's all-digit account ids, typed as integers from CSV text",
}
ONLY_1_3 = ("ServiceProviderName", "HostProviderName", "ContractApplied", "Allocated")


def plain_failures(report: ValidatorReport) -> set[str]:
    """The failed rules that are not only composites of failed rules."""
    return {f.rule_id for f in report.failures if "failed child rules" not in f.message}


def expected(provider: str, fmt: str, *, toolkit: bool) -> set[str]:
    """The rules a file fails: the model's defects that these files meet (every line has an
    InvoiceId and the CommitmentDiscountStatus column is there, so InvoiceId-C-005-C and the
    ConsumedQuantity artifacts do not fail), the toolkit's purchases, AWS's CSV account ids."""
    rules = {"InvoiceId-C-004-C", "CapacityReservationStatus-C-004-C"}
    rules.add("CommitmentDiscountStatus-C-004-C")
    if toolkit:
        rules.add("EffectiveCost-C-005-C")
    if provider == "aws" and fmt == "csv":
        rules |= set(AWS_CSV_FAILURES)
    return rules


def _cluster_only(
    provider: Provider, version: str, out: Path, fmt: str, *, restated: bool = False
) -> Path:
    rows = bill_rows(
        provider,
        version,  # type: ignore[arg-type]
        bill_nodes(provider),
        CLUSTER_HOURS_MS,
        unmetered=unmetered_nodes(provider),
        seed=TOOLKIT_SEED,
    )
    if restated:  # four hours corrected to a quarter of their usage
        rows = restate(rows, CLUSTER_HOURS_MS[10:14], Decimal("0.25"))
    path = out / f"{'restated' if restated else 'cluster'}-{provider}-{version}.{fmt}"
    write_bill(path, rows, fmt)  # type: ignore[arg-type]
    return path


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ValidatorReport]]:
    """Every file's report, validated two at a time (a run takes ~30 s)."""
    out = tmp_path_factory.mktemp("provider-bills")
    files: dict[str, Path] = {}
    for provider in PROVIDERS:
        for version in VERSIONS:
            files[f"toolkit-{provider}-{version}-csv"] = toolkit_file(provider, version, out)
            for fmt in ("csv", "parquet"):
                key = f"bill-{provider}-{version}-{fmt}"
                files[key] = provider_bill(provider, version, out, fmt)  # type: ignore[arg-type]
            files[f"cluster-{provider}-{version}-csv"] = _cluster_only(
                provider, version, out, "csv"
            )
        files[f"cluster-{provider}-1.2-parquet"] = _cluster_only(provider, "1.2", out, "parquet")
        files[f"restated-{provider}-1.2-parquet"] = _cluster_only(
            provider, "1.2", out, "parquet", restated=True
        )
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {k: pool.submit(run_validator, p, criteria=CRITERIA) for k, p in files.items()}
        yield {key: future.result() for key, future in futures.items()}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("version", VERSIONS)
def test_the_toolkits_month_fails_only_the_listed_rules(
    reports: dict[str, ValidatorReport], provider: str, version: str
) -> None:
    report = reports[f"toolkit-{provider}-{version}-csv"]
    assert plain_failures(report) == expected(provider, "csv", toolkit=True), report.summary()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_the_provider_bill_fails_nothing_the_toolkits_month_does_not(
    reports: dict[str, ValidatorReport], provider: str, version: str, fmt: str
) -> None:
    report = reports[f"bill-{provider}-{version}-{fmt}"]
    toolkit = reports[f"toolkit-{provider}-{version}-csv"]
    allowed = {**TOOLKIT_FAILURES, **(AWS_CSV_FAILURES if provider == "aws" else {})}
    assert not report.unexpected_failures(allowed), report.summary()
    assert plain_failures(report) <= plain_failures(toolkit), report.summary()
    assert report.total == toolkit.total
    if version == "1.3":
        assert not [rule for rule in report.statuses if rule.startswith(ONLY_1_3)]


@pytest.mark.parametrize(
    "key",
    [f"cluster-{p}-{v}-csv" for p in PROVIDERS for v in VERSIONS]
    + [f"{kind}-{p}-1.2-parquet" for p in PROVIDERS for kind in ("cluster", "restated")],
)
def test_bill_rows_alone_fails_only_the_models_defects(
    reports: dict[str, ValidatorReport], key: str
) -> None:
    _, provider, _, fmt = key.split("-")
    report = reports[key]
    allowed = {**MODEL_DEFECTS, **(AWS_CSV_FAILURES if provider == "aws" and fmt == "csv" else {})}
    assert not report.unexpected_failures(allowed), report.summary()
    assert plain_failures(report) == expected(provider, fmt, toolkit=False), report.summary()
    for rule in (
        "BilledCost-C-000-M",
        "EffectiveCost-C-000-M",
        "ListCost-C-000-M",
        "ContractedCost-C-000-M",
        "CommitmentDiscountId-C-000-C",
        "CommitmentDiscountCategory-C-000-C",
        "ChargeCategory-C-000-M",
        "ResourceId-C-000-C",
        "SkuPriceId-C-000-C",
    ):
        assert report.status(rule) == "PASS", (rule, report.summary())

"""The FOCUS validator harness (tests/focus_validator.py) can fail, not only pass.

A hand-written one-row FOCUS 1.2 charge passes (up to the model's known artifacts) as CSV and
as Parquet; the same charge with a BilledCost that is text and without the mandatory
ProviderName column fails exactly the rules for those two faults. The first run on a fresh
machine installs the validator (.ci/fetch-focus-validator, about a minute).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest
from focus_validator import (
    GPULEDGER_CRITERIA,
    FocusValidatorError,
    ValidatorReport,
    parse_output,
    run_validator,
)

# One hourly GPU charge from an internal price book, in the columns FOCUS 1.2 requires for
# GPULEDGER_CRITERIA. CSV null is the empty field.
VALID_CHARGE: Mapping[str, str] = {
    "BilledCost": "2.5",
    "BillingAccountId": "gpuledger",
    "BillingAccountName": "Shared GPU inference platform",
    "BillingCurrency": "USD",
    "BillingPeriodEnd": "2026-12-01T00:00:00Z",
    "BillingPeriodStart": "2026-11-01T00:00:00Z",
    "ChargeCategory": "Usage",
    "ChargeClass": "",
    "ChargeDescription": "GPU time of team search, product ranker",
    "ChargeFrequency": "Usage-Based",
    "ChargePeriodEnd": "2026-11-01T01:00:00Z",
    "ChargePeriodStart": "2026-11-01T00:00:00Z",
    "ConsumedQuantity": "1.0",
    "ConsumedUnit": "Hours",
    "ContractedCost": "2.5",
    "ContractedUnitPrice": "2.5",
    "EffectiveCost": "2.5",
    "InvoiceId": "",
    "InvoiceIssuerName": "Internal GPU platform",
    "ListCost": "2.5",
    "ListUnitPrice": "2.5",
    "PricingCategory": "Standard",
    "PricingQuantity": "1.0",
    "PricingUnit": "Hours",
    "ProviderName": "Internal GPU platform",
    "PublisherName": "Internal GPU platform",
    "ResourceId": "gpuledger/prod/gpu-pool/on_demand",
    "ResourceName": "prod GPU pool (on_demand)",
    "ResourceType": "GPU pool",
    "ServiceCategory": "AI and Machine Learning",
    "ServiceName": "GPU inference platform",
    "ServiceSubcategory": "Generative AI",
    "SkuId": "h100-hour",
    "SkuMeter": "GPU Hours",
    "SkuPriceDetails": '{"x_GpuModel": "H100"}',
    "SkuPriceId": "h100-hour-on-demand-2026",
    "Tags": '{"team": "search", "product": "ranker"}',
    "x_CostKind": "allocated",
}

# What the valid charge fails all the same: InvoiceId-C-005-C (the model has no condition for
# "associated with an invoice", so a null InvoiceId fails it) and the ConsumedQuantity rules
# whose conditions name the absent CommitmentDiscountStatus column, with their composites.
ARTIFACT_FAILURES = frozenset(
    {
        "InvoiceId-C-005-C",
        "ConsumedQuantity-C-000-C",
        "ConsumedQuantity-C-003-C",
        "ConsumedQuantity-C-004-C",
        "ConsumedQuantity-C-005-C",
        "ConsumedQuantity-C-006-C",
    }
)

# A BilledCost that is text and no ProviderName column: what must fail for those two faults.
BROKEN_RULES = frozenset(
    {
        "BilledCost-C-000-M",
        "CostAndUsage-D-038-M",  # ProviderName MUST be present
        "ProviderName-C-000-M",
    }
)

_DECIMAL_COLUMNS = frozenset(
    {
        "BilledCost",
        "ConsumedQuantity",
        "ContractedCost",
        "ContractedUnitPrice",
        "EffectiveCost",
        "ListCost",
        "ListUnitPrice",
        "PricingQuantity",
    }
)
_TIME_COLUMNS = frozenset(
    {"BillingPeriodEnd", "BillingPeriodStart", "ChargePeriodEnd", "ChargePeriodStart"}
)


def _broken(charge: Mapping[str, str]) -> dict[str, str]:
    broken = {name: value for name, value in charge.items() if name != "ProviderName"}
    broken["BilledCost"] = "two fifty"
    return broken


def _write_csv(path: Path, charge: Mapping[str, str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=list(charge))
        writer.writeheader()
        writer.writerow(charge)
    return path


def _write_parquet(path: Path, charge: Mapping[str, str]) -> Path:
    """Decimals as decimal128, times as UTC timestamps, null as a Parquet null; a decimal
    column whose value is not a number stays a string column, as a faulty writer would."""
    arrays: dict[str, Any] = {}
    for name, text in charge.items():
        if not text:
            arrays[name] = pa.array([None], pa.string())
        elif name in _TIME_COLUMNS:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
            arrays[name] = pa.array([moment], pa.timestamp("ms", tz="UTC"))
        elif name in _DECIMAL_COLUMNS and text.replace(".", "", 1).isdigit():
            arrays[name] = pa.array([text], pa.string()).cast(pa.decimal128(38, 15))
        else:
            arrays[name] = pa.array([text], pa.string())
    pq.write_table(pa.table(arrays), path)
    return path


WRITERS: dict[str, Callable[[Path, Mapping[str, str]], Path]] = {
    "csv": _write_csv,
    "parquet": _write_parquet,
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_valid_charge_passes(tmp_path: Path, fmt: str) -> None:
    path = WRITERS[fmt](tmp_path / f"valid.{fmt}", VALID_CHARGE)
    report = run_validator(path, criteria=GPULEDGER_CRITERIA)
    assert report.unexpected_failures() == (), report.summary()
    assert report.failed_rule_ids == ARTIFACT_FAILURES, report.summary()
    # The criteria switch on the rules of the columns they govern.
    for rule_id in ("BilledCost-C-000-M", "SkuPriceId-C-001-M", "Tags-C-001-M"):
        assert report.status(rule_id) == "PASS", report.summary()
    assert report.status("CommitmentDiscountId-C-000-C") == "SKIPPED"


# How each reader meets the text BilledCost: the CSV reader keeps it a string column, so the
# type and numeric format rules fail; the Parquet reader casts the string column to a float,
# which turns the text into a null, so the not-null rule fails.
BILLED_COST_RULES = {
    "csv": frozenset({"BilledCost-C-001-M", "BilledCost-C-002-M"}),
    "parquet": frozenset({"BilledCost-C-003-M"}),
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_broken_charge_fails_the_rules_for_its_faults(tmp_path: Path, fmt: str) -> None:
    path = WRITERS[fmt](tmp_path / f"broken.{fmt}", _broken(VALID_CHARGE))
    report = run_validator(path, criteria=GPULEDGER_CRITERIA)
    unexpected = {failure.rule_id for failure in report.unexpected_failures()}
    assert unexpected >= BROKEN_RULES | BILLED_COST_RULES[fmt], report.summary()
    missing = report.failure("CostAndUsage-D-038-M")
    assert "ProviderName" in missing.message
    assert "ProviderName MUST be present" in missing.must_satisfy
    # Nothing else broke: every unexpected failure is about BilledCost or ProviderName.
    others = {r for r in unexpected if not r.startswith(("BilledCost-", "ProviderName-"))}
    assert others == {"CostAndUsage-D-038-M"}, report.summary()


def test_unit_price_products_go_unchecked(tmp_path: Path) -> None:
    """A limit of the 1.2.0.1 model, pinned so that a validator that lifts it is noticed: the
    product rules (ListCost-C-009-C, ListUnitPrice-C-010-C, ContractedUnitPrice-C-011-C) apply
    only where ChargeClass is not null and not "Correction", and ChargeClass has no other
    value, so they never see a regular charge. The export must check the products itself."""
    charge = dict(VALID_CHARGE, ListUnitPrice="3.0", ContractedUnitPrice="3.0")  # 3.0 x 1.0
    report = run_validator(
        _write_csv(tmp_path / "products.csv", charge), criteria=GPULEDGER_CRITERIA
    )
    assert report.failed_rule_ids == ARTIFACT_FAILURES, report.summary()
    assert report.status("ContractedUnitPrice-C-011-C") == "PASS"


def test_unknown_criterion_is_refused(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "valid.csv", VALID_CHARGE)
    # The validator itself ignores an unknown criterion and skips the rules it was meant for.
    with pytest.raises(ValueError, match="TAGS_SUPPORTED"):
        run_validator(path, criteria=("TAGS_SUPPORTED",))


def _report(text: str) -> ValidatorReport:
    return parse_output(text, "")


_PASSING = (
    "\n=== Validation Results ===\n"
    "Total: 2 | Pass: 1 | Fail: 1 | Skipped: 0\n"
    "✅ A-C-000-M: PASS  (1.0ms)\n"
    "❌ B-C-001-M: FAIL  (violations=2, msg=B MUST NOT be NULL., 1.0ms)\n"
    "\n--- Failures ---\n"
    "- B-C-001-M: violations=2; B MUST NOT be NULL.\n"
    "  MustSatisfy: B MUST NOT be null.\n"
    "  Sample violations:\n"
    "    B='None'\n"
)


def test_parse_output_reads_a_report() -> None:
    report = _report(_PASSING)
    assert (report.total, report.passed, report.failed, report.skipped) == (2, 1, 1, 0)
    failure = report.failure("B-C-001-M")
    assert failure.violations == 2
    assert failure.message == "B MUST NOT be NULL."
    assert failure.must_satisfy == "B MUST NOT be null."
    assert failure.violation_lines == ("B='None'",)
    assert report.status("A-C-000-M") == "PASS"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Traceback (most recent call last):\n  ...\nValueError: boom\n",
        _PASSING.replace("Total: 2 |", "Total: 3 |"),  # totals that do not add up
        _PASSING.replace("✅ A-C-000-M: PASS  (1.0ms)\n", ""),  # a rule line missing
        _PASSING.split("\n--- Failures ---")[0],  # no failures section
        _PASSING.replace("- B-C-001-M", "- C-C-001-M"),  # failures of another rule
    ],
)
def test_parse_output_refuses_what_is_not_a_report(text: str) -> None:
    with pytest.raises(FocusValidatorError, match="cannot parse"):
        _report(text)

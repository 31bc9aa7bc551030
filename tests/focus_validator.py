"""The FinOps Foundation's FOCUS validator (PyPI focus-validator) as a test harness.

`.ci/fetch-focus-validator` installs it into its own Python 3.12 venv under .cache/ (the package
needs Python >= 3.12; gpuledger runs on 3.11), and `run_validator()` runs its command line on a
CSV or Parquet file and parses the console report into a `ValidatorReport`:

    report = run_validator(path, criteria=GPULEDGER_CRITERIA)
    assert not report.unexpected_failures(), report.summary()

The validator ships only the FOCUS 1.2 rule model; newer models it would download from GitHub,
so every run passes --block-download. Output that cannot be parsed raises
`FocusValidatorError`, never an empty report.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

REPO_ROOT = Path(__file__).resolve().parent.parent
FETCH_SCRIPT = REPO_ROOT / ".ci" / "fetch-focus-validator"
LOGGING_CONFIG = REPO_ROOT / ".ci" / "focus-validator-logging.yaml"
TOOL_VERSION = os.environ.get("GPULEDGER_FOCUS_VALIDATOR_VERSION") or (
    (REPO_ROOT / ".ci" / "focus-validator-version").read_text().strip()
)
CACHE_DIR = REPO_ROOT / ".cache" / "focus-validator" / TOOL_VERSION
VALIDATOR_BIN = CACHE_DIR / "venv" / "bin" / "focus-validator"
# The validator opens focus_validator/rules/currency_codes.csv relative to its working
# directory; the fetch script links that path here.
RUN_DIR = CACHE_DIR / "run"
RULES_DIR = RUN_DIR / "focus_validator" / "rules"

DEFAULT_TIMEOUT_S = 300.0
_FETCH_TIMEOUT_S = 900.0
_TAIL_CHARS = 4000

# The applicability criteria that describe a gpuledger chargeback: an internal re-allocation of
# GPU device-hours (measured usage, provisioned GPU pools with a resource type, tags) priced per
# unit from price-book entries (the contracted rate; on-demand, spot, reserved and custom map to
# more than one PricingCategory) of one named billing account. Not selected: commitments,
# capacity reservations, regions, zones, sub accounts, account types, currencies other than
# the billing currency, and PUBLIC_PRICE_LIST_SUPPORTED: the price book is not published, and
# since a rule runs when any of its criteria is selected, that criterion alone also demands
# the virtual-currency PricingCurrency* columns (CostAndUsage-D-047-C, -D-051-C, -D-055-C).
GPULEDGER_CRITERIA: tuple[str, ...] = (
    "ACCOUNT_NAMING_SUPPORTED",
    "BILLING_BASED_ON_PROVISIONED_RESOURCES_SUPPORTED",
    "MULTIPLE_PRICING_CATEGORIES_SUPPORTED",
    "NEGOTIATED_PRICING_SUPPORTED",
    "RESOURCE_TYPE_ASSIGNMENT_SUPPORTED",
    "TAGGING_SUPPORTED",
    "UNIT_PRICING_SUPPORTED",
    "USAGE_MEASUREMENT_SUPPORTED",
)

# Rules of the 1.2.0.1 model that fail on data that meets the FOCUS specification: the model
# leaves out the condition the specification states in words.
KNOWN_MODEL_ARTIFACTS: Mapping[str, str] = {
    "InvoiceId-C-004-C": (
        "'InvoiceId MUST be null when the charge is not associated with an invoice' carries no "
        "condition in the model, so every non-null InvoiceId fails it"
    ),
    "InvoiceId-C-005-C": (
        "'InvoiceId MUST NOT be null when the charge is associated with an invoice' carries no "
        "condition in the model, so every null InvoiceId fails it"
    ),
    # An all-null CommitmentDiscountStatus column makes both pass.
    "ConsumedQuantity-C-004-C": (
        "its condition names CommitmentDiscountStatus, so it fails when that column is absent "
        "(a dataset without commitment discounts)"
    ),
    "ConsumedQuantity-C-006-C": (
        "its condition names CommitmentDiscountStatus, so it fails when that column is absent "
        "(a dataset without commitment discounts)"
    ),
}

_SUMMARY = re.compile(
    r"^Total: (?P<total>\d+) \| Pass: (?P<passed>\d+) \| Fail: (?P<failed>\d+) "
    r"\| Skipped: (?P<skipped>\d+)$"
)
# One line per rule; the icons fall back to [PASS]/[SKIP]/[FAIL] on a non-UTF-8 console.
_RULE_LINE = re.compile(
    r"^(?:✅|⏭️|⏭|❌|\[PASS\]|\[SKIP\]|\[FAIL\]) (?P<rule_id>\S+): (?P<status>PASS|FAIL|SKIPPED)\b"
)
_FAILURE_HEADER = re.compile(r"^- (?P<rule_id>\S+): violations=(?P<violations>[^;]*); (?P<msg>.*)$")
_FAILED_CHILDREN = re.compile(r": AND failed - failed child rules: \[(?P<children>[^\]]*)\]")


class FocusValidatorError(RuntimeError):
    """The validator could not be installed or run, or its output could not be parsed."""


@dataclass(frozen=True)
class RuleFailure:
    """One failed rule of the validator's report."""

    rule_id: str
    violations: int | None  # rows in violation; None where the validator prints "?"
    message: str
    must_satisfy: str  # the requirement as the model words it
    violation_lines: tuple[str, ...]  # sample rows or the sample error (--show-violations)

    def __str__(self) -> str:
        lines = [f"{self.rule_id}: violations={self.violations}; {self.message}"]
        if self.must_satisfy:
            lines.append(f"  MustSatisfy: {self.must_satisfy}")
        lines.extend(f"    {line}" for line in self.violation_lines)
        return "\n".join(lines)


@dataclass(frozen=True)
class ValidatorReport:
    """The parsed console report of one validator run."""

    total: int
    passed: int
    failed: int
    skipped: int
    failures: tuple[RuleFailure, ...]  # in the order of the report's failures section
    statuses: Mapping[str, str]  # every rule id of the report: "PASS", "FAIL" or "SKIPPED"
    output: str  # the validator's stdout
    log: str  # its warnings and errors (stderr), e.g. columns it dropped while loading

    @property
    def failed_rule_ids(self) -> frozenset[str]:
        return frozenset(failure.rule_id for failure in self.failures)

    def status(self, rule_id: str) -> str:
        """The rule's status: PASS, FAIL or SKIPPED (criteria not selected, a dynamic rule, or a
        check the validator does not implement)."""
        try:
            return self.statuses[rule_id]
        except KeyError:
            raise KeyError(f"{rule_id} is not a rule of this report") from None

    def failure(self, rule_id: str) -> RuleFailure:
        for failure in self.failures:
            if failure.rule_id == rule_id:
                return failure
        raise KeyError(f"{rule_id} did not fail; failed: {sorted(self.failed_rule_ids)}")

    def unexpected_failures(
        self, known: Mapping[str, str] = KNOWN_MODEL_ARTIFACTS
    ) -> tuple[RuleFailure, ...]:
        """The failures not explained by `known`.

        A failure is explained when its rule id is in `known`, or when it is a composite AND
        rule whose failed children are all explained.
        """
        by_id = {failure.rule_id: failure for failure in self.failures}
        explained: dict[str, bool] = {}

        def is_explained(rule_id: str, seen: frozenset[str]) -> bool:
            if rule_id in known:
                return True
            if rule_id in explained:
                return explained[rule_id]
            failure = by_id.get(rule_id)
            match = _FAILED_CHILDREN.search(failure.message) if failure else None
            children = [c.strip() for c in match["children"].split(",")] if match else []
            result = bool(children) and all(
                child not in seen and is_explained(child, seen | {child}) for child in children
            )
            explained[rule_id] = result
            return result

        return tuple(f for f in self.failures if not is_explained(f.rule_id, frozenset()))

    def summary(self) -> str:
        """The totals and every failure, for an assertion message."""
        lines = [
            f"Total: {self.total} | Pass: {self.passed} | Fail: {self.failed} "
            f"| Skipped: {self.skipped}"
        ]
        lines.extend(str(failure) for failure in self.failures)
        if self.log.strip():
            lines.append("--- validator log ---")
            lines.append(self.log.strip()[-_TAIL_CHARS:])
        return "\n".join(lines)


def fetch_focus_validator() -> Path:
    """Install the validator with `.ci/fetch-focus-validator` unless it is already installed.

    The script is idempotent and returns at once when the install is complete; a lock keeps
    two test processes from installing into the same venv together.
    """
    CACHE_DIR.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GPULEDGER_FOCUS_VALIDATOR_VERSION=TOOL_VERSION)
    with (CACHE_DIR.parent / f".{TOOL_VERSION}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            subprocess.run([str(FETCH_SCRIPT)], check=True, env=env, timeout=_FETCH_TIMEOUT_S)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            raise FocusValidatorError(f"{FETCH_SCRIPT} failed: {error}") from error
    if not VALIDATOR_BIN.exists():
        raise FocusValidatorError(f"{FETCH_SCRIPT} left no {VALIDATOR_BIN}")
    return VALIDATOR_BIN


def model_criteria(version: str = "1.2") -> dict[str, str]:
    """The applicability criteria the installed rule model of `version` defines, with their
    descriptions."""
    model = _model_file(version)
    data = json.loads(model.read_text())
    return {
        criterion: str(entry.get("Description", ""))
        for criterion, entry in data["ApplicabilityCriteria"].items()
    }


def _model_file(version: str) -> Path:
    candidates = sorted(RULES_DIR.glob(f"model-{version}*.json"))
    if not candidates:
        raise FocusValidatorError(
            f"no rule model for FOCUS {version} in {RULES_DIR} (newer models are downloaded "
            f"from GitHub, which these runs block)"
        )
    return candidates[-1]


def run_validator(
    data_file: Path,
    *,
    criteria: Sequence[str],
    version: str = "1.2",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ValidatorReport:
    """Validate a FOCUS CSV or Parquet file against the FOCUS `version` rule model.

    `criteria` are the model's applicability criteria that hold for the data (see
    `model_criteria()`); a rule with criteria runs when any of them is selected, and is
    skipped otherwise; "ALL" selects every criterion. An unknown criterion raises ValueError
    (the validator itself ignores it, and skips the rules it was meant for).
    """
    data_file = Path(data_file).resolve()
    if data_file.suffix not in (".csv", ".parquet"):
        raise ValueError(f"the validator reads .csv and .parquet files, not {data_file.name}")
    if not data_file.is_file():
        raise FileNotFoundError(data_file)
    fetch_focus_validator()
    known = model_criteria(version)
    unknown = [c for c in criteria if c != "ALL" and c not in known]
    if unknown:
        raise ValueError(f"unknown applicability criteria {unknown}; the model has {sorted(known)}")

    command = [
        str(VALIDATOR_BIN),
        "--data-file",
        str(data_file),
        "--validate-version",
        version,
        "--block-download",
        "--show-violations",
    ]
    if criteria:
        command += ["--applicability-criteria", ",".join(criteria)]
    env = {
        key: value
        for key, value in os.environ.items()
        # The 3.12 venv must not see gpuledger's 3.11 environment.
        if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }
    env.update(LOGGING_CONFIG=str(LOGGING_CONFIG), PYTHONIOENCODING="utf-8", NO_COLOR="1")
    try:
        result = subprocess.run(
            command,
            cwd=RUN_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise FocusValidatorError(
            f"focus-validator on {data_file} ran past {timeout_s:.0f} s\n"
            f"{_text_tail(error.stdout)}\n{_text_tail(error.stderr)}"
        ) from error
    if result.returncode != 0:
        raise FocusValidatorError(
            f"focus-validator on {data_file} exited with {result.returncode}\n"
            f"--- stdout ---\n{_text_tail(result.stdout)}\n"
            f"--- stderr ---\n{_text_tail(result.stderr)}"
        )
    return parse_output(result.stdout, result.stderr)


def parse_output(stdout: str, stderr: str = "") -> ValidatorReport:
    """Parse the validator's console report; raise FocusValidatorError where it is not one."""
    lines = stdout.splitlines()
    summary_at = next((i for i, line in enumerate(lines) if _SUMMARY.match(line)), None)
    if summary_at is None or "=== Validation Results ===" not in lines[:summary_at]:
        raise _unparsable("no 'Total: N | Pass: P | Fail: F | Skipped: S' line", stdout, stderr)
    totals = _SUMMARY.match(lines[summary_at])
    assert totals is not None
    total, passed, failed, skipped = (
        int(totals[name]) for name in ("total", "passed", "failed", "skipped")
    )
    if total != passed + failed + skipped:
        raise _unparsable(f"totals do not add up: {lines[summary_at]}", stdout, stderr)

    statuses: dict[str, str] = {}
    position = summary_at + 1
    while position < len(lines) and (rule_line := _RULE_LINE.match(lines[position])):
        statuses[rule_line["rule_id"]] = rule_line["status"]
        position += 1
    counted = {status: list(statuses.values()).count(status) for status in ("PASS", "FAIL")}
    if len(statuses) != total or counted["PASS"] != passed or counted["FAIL"] != failed:
        raise _unparsable(
            f"{len(statuses)} rule lines ({counted['PASS']} pass, {counted['FAIL']} fail) "
            f"for {lines[summary_at]}",
            stdout,
            stderr,
        )
    failed_ids = {rule_id for rule_id, status in statuses.items() if status == "FAIL"}

    failures = tuple(_parse_failures(lines[position:], failed_ids, stdout, stderr))
    if {failure.rule_id for failure in failures} != failed_ids or len(failures) != failed:
        raise _unparsable(
            f"the failures section lists {sorted(f.rule_id for f in failures)}, "
            f"the rule lines {sorted(failed_ids)}",
            stdout,
            stderr,
        )
    return ValidatorReport(
        total=total,
        passed=passed,
        failed=failed,
        skipped=skipped,
        failures=failures,
        statuses=MappingProxyType(statuses),
        output=stdout,
        log=stderr,
    )


def _parse_failures(
    lines: Sequence[str], failed_ids: set[str], stdout: str, stderr: str
) -> Iterator[RuleFailure]:
    rest = list(lines)
    while rest and not rest[0].strip():
        rest.pop(0)
    if not failed_ids:
        if any(line.strip() for line in rest):
            raise _unparsable(
                f"unexpected output after the rule lines: {rest[0]!r}", stdout, stderr
            )
        return
    if not rest or rest[0] != "--- Failures ---":
        raise _unparsable("no '--- Failures ---' section", stdout, stderr)

    block: list[str] = []
    for line in [*rest[1:], None]:
        header = _FAILURE_HEADER.match(line) if line is not None else None
        if line is None or (header and header["rule_id"] in failed_ids):
            if block:
                yield _parse_failure_block(block, stdout, stderr)
            block = []
        if line is not None:
            if not block and not header:
                raise _unparsable(
                    f"unexpected line in the failures section: {line!r}", stdout, stderr
                )
            block.append(line)


def _parse_failure_block(block: list[str], stdout: str, stderr: str) -> RuleFailure:
    header = _FAILURE_HEADER.match(block[0])
    assert header is not None
    raw_violations = header["violations"].strip()
    if raw_violations.isdigit():
        violations: int | None = int(raw_violations)
    elif raw_violations == "?":
        violations = None
    else:
        raise _unparsable(f"violations={raw_violations!r} in {block[0]!r}", stdout, stderr)
    message = [header["msg"]]
    must_satisfy: list[str] = []
    samples: list[str] = []
    part = message
    for line in block[1:]:
        if line.startswith("  MustSatisfy: "):
            part = must_satisfy
            part.append(line.removeprefix("  MustSatisfy: "))
        elif line == "  Sample violations:":
            part = samples
        elif line.startswith("  Sample violation error: "):
            part = samples
            part.append(line.removeprefix("  Sample violation error: "))
        elif part is samples:
            samples.append(line.strip())
        else:
            part.append(line)
    return RuleFailure(
        rule_id=header["rule_id"],
        violations=violations,
        message="\n".join(message).strip(),
        must_satisfy="\n".join(must_satisfy).strip(),
        violation_lines=tuple(sample for sample in samples if sample),
    )


def _unparsable(reason: str, stdout: str, stderr: str) -> FocusValidatorError:
    return FocusValidatorError(
        f"cannot parse the focus-validator report ({reason})\n"
        f"--- stdout ---\n{_text_tail(stdout)}\n--- stderr ---\n{_text_tail(stderr)}"
    )


def _text_tail(text: str | bytes | None) -> str:
    if text is None:
        return "(none)"
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-_TAIL_CHARS:] or "(empty)"

"""`gpuledger bill import`: provider FOCUS files into the bill tables, and the true-up of the
hours they change.

All files given to one import are one export (AWS writes a month in several Parquet parts):
their rows are grouped into slices (provider, billing account, billing period start), and each
slice in them is the slice's whole new content. For each slice:
- the same lines as its newest version (fingerprint: SHA-256 of the sorted lines, whatever the
  files, their order or format) change nothing;
- otherwise the lines go in under the next version; the true-up is computed again for the hours
  whose GPU charges changed (every charge touching them, keeping its rows in them), and the
  newest version's rows for every other hour are copied; then the version is finished
  (bill_versions), and readers see it.
Bad rows are listed with `file:line` and the reason; with any of them nothing is imported
unless `skip_bad_rows`, and then they are listed still, counted, and left out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from runtime.errors import ConfigError
from streams.billing import ledger
from streams.billing.files import file_rows
from streams.billing.lines import BillLine, BillRowError, decode_line
from streams.billing.resources import GpuInstanceTypes, node_keys
from streams.billing.slices import KIND_NON_GPU, KIND_UNMETERED, slice_id
from streams.billing.trueup import (
    Charge,
    NodeIdentity,
    NonGpuRule,
    TrueupRow,
    affected_hours,
    charge_hours,
    charges,
    in_hours,
    true_up,
)
from streams.store import ClickHouseStore

_ZERO = Decimal(0)
MAX_BAD_ROWS_KEPT = 1000  # listed in full up to here; beyond, counted


@dataclass(frozen=True, slots=True)
class BadRow:
    source: str  # file:line
    column: str
    reason: str

    def __str__(self) -> str:
        what = f"{self.column}: {self.reason}" if self.column else self.reason
        return f"{self.source}: {what}"


@dataclass(frozen=True, slots=True)
class SliceResult:
    slice: str
    version: int
    status: str  # new | restated | recomputed | unchanged
    lines: int
    changed_hours: int
    gpu_effective_cost: Decimal  # the true-up's total: every bill dollar of GPU instances
    unmetered_cost: Decimal
    non_gpu_cost: Decimal
    currency: str


@dataclass(frozen=True, slots=True)
class ImportResult:
    rows_read: int
    bad_rows: tuple[BadRow, ...]
    bad_rows_total: int
    rounded_amounts: int  # lines with an amount past 1e-15, rounded half-even
    slices: tuple[SliceResult, ...] = ()
    imported: bool = True


@dataclass(frozen=True, slots=True)
class ImportOptions:
    rule: NonGpuRule = field(default_factory=NonGpuRule)
    gpu_types: GpuInstanceTypes = field(default_factory=GpuInstanceTypes)
    skip_bad_rows: bool = False


@dataclass
class _Read:
    slices: dict[str, list[tuple[str, BillLine]]] = field(default_factory=dict)
    bad: list[BadRow] = field(default_factory=list)
    bad_total: int = 0
    rows: int = 0
    rounded: int = 0


def read_bills(
    paths: Sequence[Path],
    gpu_types: GpuInstanceTypes,
    progress: Callable[[int], None] | None = None,
) -> _Read:
    read = _Read()
    for path in paths:
        for line_no, row in file_rows(path):
            read.rows += 1
            source = f"{path}:{line_no}"
            try:
                if "__bad_row__" in row:
                    raise BillRowError("", str(row["__bad_row__"]))
                line = decode_line(row, gpu_types)
            except BillRowError as exc:
                read.bad_total += 1
                if len(read.bad) < MAX_BAD_ROWS_KEPT:
                    read.bad.append(BadRow(source, exc.column, exc.reason))
                continue
            read.rounded += line.rounded
            key = slice_id(
                line.provider, line.billing_account_id, _iso(line.billing_period_start_ms)
            )
            read.slices.setdefault(key, []).append((source, line))
            if progress is not None and read.rows % 10_000 == 0:
                progress(read.rows)
    if progress is not None:
        progress(read.rows)
    return read


def import_bills(
    store: ClickHouseStore,
    paths: Sequence[Path],
    options: ImportOptions,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    read = read_bills(paths, options.gpu_types, progress)
    result = ImportResult(
        rows_read=read.rows,
        bad_rows=tuple(read.bad),
        bad_rows_total=read.bad_total,
        rounded_amounts=read.rounded,
        imported=False,
    )
    if read.bad_total and not options.skip_bad_rows:
        return result
    for key, lines in read.slices.items():
        _check_slice(key, lines)
    latest = ledger.latest_versions(store)
    done = tuple(
        _import_slice(store, key, lines, latest.get(key), options, paths)
        for key, lines in sorted(read.slices.items())
    )
    return ImportResult(
        rows_read=read.rows,
        bad_rows=tuple(read.bad),
        bad_rows_total=read.bad_total,
        rounded_amounts=read.rounded,
        slices=done,
    )


def _check_slice(key: str, lines: list[tuple[str, BillLine]]) -> None:
    first = lines[0][1]
    for source, line in lines:
        if line.billing_currency != first.billing_currency:
            raise ConfigError(
                f"{source}: billing currency {line.billing_currency} differs from "
                f"{first.billing_currency} ({lines[0][0]}) in one billing period of one account "
                f"({key})"
            )
        if line.billing_period_end_ms != first.billing_period_end_ms:
            raise ConfigError(
                f"{source}: BillingPeriodEnd differs from {lines[0][0]} in one billing period "
                f"({key})"
            )


def fingerprint(lines: Iterable[BillLine]) -> str:
    digest = hashlib.sha256()
    for text in sorted(line.canonical() for line in lines):
        digest.update(text.encode("utf-8"))
        digest.update(b"\x1e")
    return digest.hexdigest()


def _import_slice(
    store: ClickHouseStore,
    key: str,
    lines: list[tuple[str, BillLine]],
    latest: ledger.SliceVersion | None,
    options: ImportOptions,
    paths: Sequence[Path],
) -> SliceResult:
    bill = [line for _, line in lines]
    print_ = fingerprint(bill)
    new_charges = charges(bill)
    if latest is not None and latest.fingerprint == print_:
        return _summary(store, latest, "unchanged", 0)
    version = ledger.highest_version(store, key) + 1
    lines = sorted(lines, key=lambda sl: sl[1].canonical())
    ledger.write_lines(store, key, version, lines)
    identities = ledger.read_identities(store)
    new_charges = gpu_charges(new_charges, identities)
    if latest is None or latest.non_gpu_rule != options.rule.text():
        # New, or trued up under another non-GPU rule: every hour, with this import's rule.
        hours = {h for c in new_charges for h in charge_hours(c)}
        scope = new_charges
    else:
        old_lines = ledger.read_charge_lines(store, key, latest.version)
        old_charges = gpu_charges(charges(old_lines), identities)
        hours = affected_hours(old_charges, new_charges)
        scope = [c for c in new_charges if in_hours(c, hours)]
        ledger.copy_trueup(store, key, latest.version, version, hours)
    rows = [r for r in compute(store, scope, options.rule, identities) if r.hour_ms in hours]
    ledger.write_trueup(store, key, version, rows)
    first = bill[0]
    finished = ledger.SliceVersion(
        slice=key,
        provider=first.provider,
        billing_account_id=first.billing_account_id,
        billing_period_start_ms=first.billing_period_start_ms,
        billing_period_end_ms=first.billing_period_end_ms,
        billing_currency=first.billing_currency,
        version=version,
        fingerprint=print_,
        lines=len(bill),
        changed_periods=len(hours),
        source_files=tuple(str(p) for p in paths),
        imported_at_ms=ledger.now_ms(),
        non_gpu_rule=options.rule.text(),
    )
    ledger.finish_version(store, finished)
    return _summary(store, finished, "new" if latest is None else "restated", len(hours))


def gpu_charges(all_charges: Sequence[Charge], identities: Sequence[NodeIdentity]) -> list[Charge]:
    """The charges the true-up allocates: those of a known node or a GPU instance. A change
    in any other (storage, network, a commitment's fee) recomputes no hour."""
    known = {k for i in identities for k in node_keys(i.provider_id)}
    return [c for c in all_charges if c.gpu_instance or c.resource_key in known]


def compute(
    store: ClickHouseStore,
    scope: Sequence[Charge],
    rule: NonGpuRule,
    identities: Sequence[NodeIdentity] | None = None,
) -> list[TrueupRow]:
    """The true-up of `scope` from the node identities and metered rows in the store now."""
    if not scope:
        return []
    if identities is None:
        identities = ledger.read_identities(store)
    start = min(c.start_ms for c in scope)
    end = max(c.end_ms for c in scope)
    nodes = {(i.cluster, i.node) for i in identities}
    metered = ledger.read_metered(store, start, end, nodes)
    return true_up(scope, metered, identities, rule)


def _summary(
    store: ClickHouseStore, version: ledger.SliceVersion, status: str, changed: int
) -> SliceResult:
    db = store.database
    found = store.query_rows(
        f"SELECT sum(effective_cost), sumIf(effective_cost, kind = '{KIND_UNMETERED}'), "
        f"sumIf(effective_cost, kind = '{KIND_NON_GPU}') FROM {db}.billed_cost_hourly FINAL "
        "WHERE slice = %(s)s AND version = %(v)s",
        {"s": version.slice, "v": version.version},
    )
    total, unmetered, non_gpu = found[0] if found else (_ZERO, _ZERO, _ZERO)
    return SliceResult(
        slice=version.slice,
        version=version.version,
        status=status,
        lines=version.lines,
        changed_hours=changed,
        gpu_effective_cost=total or _ZERO,
        unmetered_cost=unmetered or _ZERO,
        non_gpu_cost=non_gpu or _ZERO,
        currency=version.billing_currency,
    )


def _iso(time_ms: int) -> str:
    return datetime.fromtimestamp(time_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def retrue_up(
    store: ClickHouseStore, options: ImportOptions, *, only: Iterable[str] = ()
) -> tuple[SliceResult, ...]:
    """The true-up of every slice's newest version (or of the slices `only`) computed again
    from the metered rows and node identities in the store now (late usage, a corrected hour,
    a new non-GPU rule); a slice whose rows come out different gets a new version with the
    same lines, the others are unchanged."""
    wanted = set(only)
    out = []
    for key, latest in sorted(ledger.latest_versions(store).items()):
        if wanted and key not in wanted:
            continue
        bill_charges = charges(ledger.read_charge_lines(store, key, latest.version))
        rows = compute(store, bill_charges, options.rule)
        old = ledger.read_trueup(store, key, latest.version)
        if ledger.trueup_tuples(rows) == old:
            out.append(_summary(store, latest, "unchanged", 0))
            continue
        new_rows = ledger.trueup_tuples(rows)
        version = ledger.highest_version(store, key) + 1
        ledger.copy_lines(store, key, latest.version, version)
        ledger.write_trueup(store, key, version, rows)
        finished = replace(
            latest,
            version=version,
            imported_at_ms=ledger.now_ms(),
            non_gpu_rule=options.rule.text(),
        )
        ledger.finish_version(store, finished)
        out.append(_summary(store, finished, "recomputed", _changed_hours(old, new_rows)))
    return tuple(out)


def _changed_hours(old: Sequence[tuple[object, ...]], new: Sequence[tuple[object, ...]]) -> int:
    """How many hours differ between two sorted lists of true-up tuples (hour first)."""
    by_hour: dict[object, list[list[tuple[object, ...]]]] = {}
    for side, rows in enumerate((old, new)):
        for row in rows:
            by_hour.setdefault(row[0], [[], []])[side].append(row)
    return sum(1 for pair in by_hour.values() if pair[0] != pair[1])

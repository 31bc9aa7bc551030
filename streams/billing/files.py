"""Reading provider FOCUS files: CSV (optionally gzip-compressed, with or without a byte-order
mark, as Azure writes it) and Parquet (as AWS Data Exports writes it), row by row with the
row's line number, so a bad row is named by `file:line`."""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError

_PARQUET_MAGIC = b"PAR1"
_GZIP_MAGIC = b"\x1f\x8b"
_BATCH_ROWS = 10_000
# A CSV field of a bill (tags, SKU details) can be long; the csv module's default is 128 KiB.
_FIELD_LIMIT = 16 * 1024 * 1024


def file_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for every data row of a FOCUS file; CSV line numbers count the header
    as line 1 (a quoted field over several lines: the line where the row starts), Parquet rows
    are numbered from 1. ConfigError when the file cannot be read as either."""
    try:
        with path.open("rb") as probe:
            head = probe.read(4)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the bill file: {exc.strerror}") from exc
    if head == _PARQUET_MAGIC:
        yield from _parquet_rows(path)
    else:
        yield from _csv_rows(path, compressed=head[:2] == _GZIP_MAGIC)


def _csv_rows(path: Path, *, compressed: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    csv.field_size_limit(_FIELD_LIMIT)
    opener = gzip.open if compressed else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as text:
        reader = csv.reader(text)
        try:
            header = next(reader, None)
        except (csv.Error, UnicodeDecodeError, OSError, EOFError) as exc:
            raise ConfigError(f"{path}:1: not a CSV bill: {exc}") from exc
        if not header:
            raise ConfigError(f"{path}: empty file: a FOCUS export has a header row")
        columns = [c.strip() for c in header]
        if "BilledCost" not in columns:
            raise ConfigError(
                f"{path}:1: not a FOCUS Cost and Usage file (no BilledCost column in the header)"
            )
        start = reader.line_num + 1
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError, OSError, EOFError) as exc:
                raise ConfigError(f"{path}:{start}: unreadable CSV: {exc}") from exc
            line, start = start, reader.line_num + 1
            if not values:
                continue  # a blank line holds no row
            if len(values) != len(columns):
                yield line, {"__bad_row__": f"{len(values)} fields, the header has {len(columns)}"}
                continue
            yield line, dict(zip(columns, values, strict=True))


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"{path}: not a readable Parquet file: {exc}") from exc
    if "BilledCost" not in parquet.schema_arrow.names:
        raise ConfigError(f"{path}: not a FOCUS Cost and Usage file (no BilledCost column)")
    line = 0
    try:
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS):
            for record in batch.to_pylist():
                line += 1
                yield line, record
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"{path}: row {line + 1}: unreadable Parquet: {exc}") from exc

"""Bill rows as the provider's export files: CSV (ISO 8601 UTC timestamps with Z, amounts as
decimal text, null as an empty field) and Parquet (UTC timestamps; amounts typed as the provider
types them: AWS Data Exports doubles, Azure and Google Cloud decimals)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from gpuledger.demo.bill_columns import AMOUNT_COLUMNS, TIME_COLUMNS

CostType = Literal["double", "decimal"]
_COST_TYPES: dict[str, CostType] = {
    "AWS": "double",
    "Microsoft": "decimal",
    "Google Cloud": "decimal",
}
# AWS documents its FOCUS timestamps as timestamp_milliseconds; BigQuery's are microseconds.
_TIME_UNITS = {"AWS": "ms", "Microsoft": "us", "Google Cloud": "us"}
DECIMAL_PRECISION, DECIMAL_SCALE = 38, 18  # room for 20 integer digits


def columns_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The rows' columns in first-seen order."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return list(names)


def csv_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    names = columns_of(rows)
    with Path(path).open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(names)
        for row in rows:
            writer.writerow([csv_text(row.get(name)) for name in names])


def _provider(rows: Sequence[dict[str, Any]]) -> str:
    for row in rows:
        name = row.get("ServiceProviderName") or row.get("ProviderName")
        if name:
            return str(name)
    return "AWS"


def write_parquet(
    path: str | Path, rows: Sequence[dict[str, Any]], cost_type: CostType | None = None
) -> None:
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    provider = _provider(rows)
    kind = cost_type or _COST_TYPES.get(provider, "double")
    unit = _TIME_UNITS.get(provider, "us")
    arrays = []
    fields = []
    for name in columns_of(rows):
        values = [row.get(name) for row in rows]
        if name in AMOUNT_COLUMNS:
            if kind == "double":
                typ = pa.float64()
                values = [None if v is None else float(v) for v in values]
            else:
                typ = pa.decimal128(DECIMAL_PRECISION, DECIMAL_SCALE)
                values = [None if v is None else Decimal(v) for v in values]
        elif name in TIME_COLUMNS or any(isinstance(v, datetime) for v in values):
            typ = pa.timestamp(unit, tz="UTC")
        else:
            typ = pa.string()
            values = [None if v is None else str(v) for v in values]
        fields.append(pa.field(name, typ))
        arrays.append(pa.array(values, type=typ))
    pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(fields)), str(path))

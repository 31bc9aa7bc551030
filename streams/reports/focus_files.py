"""FOCUS files: CSV (null = empty field) and Parquet (decimals as decimal128, times as UTC
timestamps, JSON columns as strings)."""

from __future__ import annotations

import io
from datetime import datetime
from decimal import Decimal
from typing import Any

from runtime.errors import ConfigError
from streams.reports.chargeback import ChargebackExport
from streams.reports.render import to_csv, to_json

_TIME_COLUMNS = ("BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd")
_MONEY_COLUMNS = ("BilledCost", "EffectiveCost", "ListCost", "ContractedCost")
_INT_COLUMNS = ("x_PromptTokens", "x_CompletionTokens", "x_Requests")


def export_bytes(export: ChargebackExport, fmt: str) -> bytes:
    if fmt == "focus-csv":
        return to_csv(export).encode("utf-8")
    if fmt == "focus-parquet":
        return to_parquet(export)
    if fmt == "json":
        return to_json(export).encode("utf-8")
    raise ConfigError(f"--format {fmt!r} is not one of focus-csv, focus-parquet, json")


def to_parquet(export: ChargebackExport) -> bytes:
    try:
        import pyarrow as pa  # type: ignore[import-untyped]
        import pyarrow.parquet as pq  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise ConfigError("focus-parquet needs pyarrow (pip install pyarrow)") from None
    records = export.records()
    columns = list(records[0]) if records else []
    arrays: dict[str, Any] = {}
    for name in columns:
        values = [r[name] for r in records]
        if name in _TIME_COLUMNS:
            arrays[name] = pa.array(
                [datetime.fromisoformat(v.replace("Z", "+00:00")) for v in values],
                pa.timestamp("ms", tz="UTC"),
            )
        elif name in _MONEY_COLUMNS:
            arrays[name] = pa.array(values, pa.decimal128(18, 2))
        elif name in _INT_COLUMNS:
            arrays[name] = pa.array(values, pa.int64())
        elif any(isinstance(v, Decimal) for v in values):
            arrays[name] = pa.array(values, pa.decimal128(38, 15))
        else:
            arrays[name] = pa.array(values, pa.string())
    table = pa.table(arrays) if arrays else pa.table({})
    table = table.replace_schema_metadata({"focus_version": "1.3", "dataset": "CostAndUsage"})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()

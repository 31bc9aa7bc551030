"""FOCUS files written as the rows come: CSV (null = empty field), Parquet (exact decimals,
UTC timestamps, JSON columns as strings) and JSON Lines (one object per row, decimals as exact
JSON numbers). Every format has the same columns (focus_columns.COLUMNS) in the same order,
whether the period has rows or not: an empty month is a header, a schema, or no lines."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from decimal import Decimal
from typing import IO, Any

from runtime.errors import ConfigError
from streams.reports.focus_columns import COLUMNS, FOCUS_VERSION, json_text
from streams.reports.render import csv_line, quoted_cell

FORMATS = ("focus-csv", "focus-parquet", "focus-jsonl")
CONTENT_TYPES = {
    "focus-csv": "text/csv; charset=utf-8",
    "focus-parquet": "application/vnd.apache.parquet",
    "focus-jsonl": "application/jsonl",
}
_PARQUET_BATCH_ROWS = 20_000
# Decimal scales: a unit price has at most 15 places, a quantity 12, so a cost at most 27.
_SCALES = {"cost": 27, "price": 15, "quantity": 12}


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        shown = fmt if len(fmt) <= 40 else fmt[:40] + "…"
        raise ConfigError(f"--format {shown!r} is not one of {', '.join(FORMATS)}")
    return fmt


def write_rows(
    rows: Iterable[dict[str, Any]], fmt: str, out: IO[bytes], *, max_rows: int | None = None
) -> int:
    """Write every row to `out` in `fmt`; the number written. Past `max_rows` it stops with
    a ConfigError (what was written so far is then incomplete)."""
    check_format(fmt)
    counted = _counted(rows, max_rows)
    if fmt == "focus-csv":
        return _write_csv(counted, out)
    if fmt == "focus-jsonl":
        return _write_jsonl(counted, out)
    return _write_parquet(counted, out)


def export_bytes(rows: Iterable[dict[str, Any]], fmt: str, *, max_rows: int | None = None) -> bytes:
    sink = io.BytesIO()
    write_rows(rows, fmt, sink, max_rows=max_rows)
    return sink.getvalue()


def _counted(rows: Iterable[dict[str, Any]], max_rows: int | None) -> Iterator[dict[str, Any]]:
    for n, row in enumerate(rows, start=1):
        if max_rows is not None and n > max_rows:
            raise ConfigError(
                f"the export has more than {max_rows:,} charges, the most one answer holds; "
                f"write it to a file with `gpuledger export chargeback -o FILE`"
            )
        yield row


def _decimal_cell(value: Any) -> str:
    """A decimal always with a decimal point, so a reader that guesses types from the text (the
    FOCUS validator does) never takes a column of whole numbers for integers."""
    if value is None:
        return ""
    text = format(value, "f")
    return text if "." in text else text + ".0"


class _TextCells:
    """CSV cells of one text column, remembered: names, ids and JSON repeat row after row."""

    __slots__ = ("cells",)
    MAX = 10_000

    def __init__(self) -> None:
        self.cells: dict[Any, str] = {}

    def __call__(self, value: Any) -> str:
        cell = self.cells.get(value)
        if cell is None:
            if len(self.cells) >= self.MAX:
                self.cells.clear()
            cell = self.cells[value] = quoted_cell(value)
        return cell


def _encoder(kind: str) -> Callable[[Any], str]:
    if kind in _SCALES:
        return _decimal_cell
    if kind == "int":
        return lambda v: "" if v is None else str(int(v))
    if kind == "bool":
        return lambda v: "" if v is None else ("true" if v else "false")
    return _TextCells()


def _write_csv(rows: Iterator[dict[str, Any]], out: IO[bytes]) -> int:
    out.write(csv_line(COLUMNS).encode("utf-8"))
    encoders = [(c, _encoder(k)) for c, k in COLUMNS.items()]
    count = 0
    lines: list[str] = []
    for row in rows:
        lines.append(",".join([encode(row[c]) for c, encode in encoders]) + "\n")
        count += 1
        if len(lines) >= 1000:
            out.write("".join(lines).encode("utf-8"))
            lines.clear()
    out.write("".join(lines).encode("utf-8"))
    return count


def _write_jsonl(rows: Iterator[dict[str, Any]], out: IO[bytes]) -> int:
    count = 0
    for row in rows:
        out.write((json_text({c: row[c] for c in COLUMNS}) + "\n").encode("utf-8"))
        count += 1
    return count


def parquet_schema() -> Any:
    import pyarrow as pa  # type: ignore[import-untyped]

    types = {
        "text": pa.string(),
        "json": pa.string(),
        "time": pa.timestamp("s", tz="UTC"),
        "int": pa.int64(),
        "bool": pa.bool_(),
    }
    fields = [
        pa.field(c, types[k] if k in types else pa.decimal128(38, _SCALES[k]))
        for c, k in COLUMNS.items()
    ]
    return pa.schema(fields, metadata={"focus_version": FOCUS_VERSION, "dataset": "CostAndUsage"})


def _write_parquet(rows: Iterator[dict[str, Any]], out: IO[bytes]) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise ConfigError("focus-parquet needs pyarrow (pip install pyarrow)") from None
    schema = parquet_schema()
    count = 0
    with pq.ParquetWriter(out, schema) as writer:
        batch: list[dict[str, Any]] = []

        def flush() -> None:
            columns = {c: [_parquet_value(k, row[c]) for row in batch] for c, k in COLUMNS.items()}
            writer.write_table(pa.Table.from_pydict(columns, schema=schema))
            batch.clear()

        for row in rows:
            batch.append(row)
            count += 1
            if len(batch) >= _PARQUET_BATCH_ROWS:
                flush()
        if batch or count == 0:
            flush()
    return count


def _parquet_value(kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind == "time":
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if kind in _SCALES and isinstance(value, Decimal):
        return value.quantize(Decimal(1).scaleb(-_SCALES[kind]))
    return value


def read_rows(data: bytes, fmt: str) -> list[dict[str, Any]]:
    """The rows of an export as written: for checks and tests. Numbers come back as Decimal,
    times as `YYYY-MM-DDTHH:MM:SSZ`, nulls as None, in every format."""
    check_format(fmt)
    if fmt == "focus-jsonl":
        return [
            json.loads(line, parse_float=Decimal, parse_int=Decimal)
            for line in data.decode("utf-8").splitlines()
            if line
        ]
    if fmt == "focus-csv":
        import csv

        reader = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))
        return [
            {c: _from_text(COLUMNS.get(c, "text"), v) for c, v in row.items()} for row in reader
        ]
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    out = []
    for record in table.to_pylist():
        row: dict[str, Any] = {}
        for c, v in record.items():
            if isinstance(v, datetime):
                row[c] = v.strftime("%Y-%m-%dT%H:%M:%SZ")
            elif isinstance(v, int) and not isinstance(v, bool):
                row[c] = Decimal(v)
            else:
                row[c] = v
        out.append(row)
    return out


def _from_text(kind: str, text: str) -> Any:
    if text == "":
        return None
    if kind in _SCALES or kind == "int":
        return Decimal(text)
    if kind == "bool":
        return text == "true"
    return text

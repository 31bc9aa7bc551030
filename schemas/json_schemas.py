"""JSON Schema files for the event types, generated from `schemas.fields`.

Billing and platform teams validate the topics with these files without Python. Regenerate with
``python -m schemas.json_schemas``; a test fails when the shipped files are stale.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson

from schemas import events, fields

SCHEMA_DIR = Path(__file__).parent / "json"

_PAYLOADS: dict[str, tuple[str, tuple[fields.Rule, ...]]] = {
    events.GPU_SAMPLE_TYPE: ("gpu-sample.v1.schema.json", fields.GPU_SAMPLE),
    events.POD_TYPE: ("pod.v1.schema.json", fields.POD),
    events.TOKENS_TYPE: ("tokens.v1.schema.json", fields.TOKENS),
    events.NODE_TYPE: ("node.v1.schema.json", fields.NODE),
}

_CROSS_FIELD_NOTE = {
    events.GPU_SAMPLE_TYPE: (
        "Also enforced by gpuledger but not expressible here: mem_used_bytes (device and each "
        "process) <= mem_total_bytes; mig_slices <= gpu_slices."
    ),
    events.POD_TYPE: "",
    events.TOKENS_TYPE: "",
    events.NODE_TYPE: "",
}


def schema_for(event_type: str) -> dict[str, Any]:
    filename, rules = _PAYLOADS[event_type]
    envelope = fields.json_schema_for(fields.ENVELOPE)
    envelope["properties"]["specversion"] = {"const": "1.0"}
    envelope["properties"]["type"] = {"const": event_type}
    envelope["properties"]["time"] = {
        "type": "string",
        "format": "date-time",
        "maxLength": fields.MAX_TIME,
    }
    data = fields.json_schema_for(rules)
    if event_type == events.GPU_SAMPLE_TYPE:
        data["properties"]["processes"]["items"] = fields.json_schema_for(fields.PROCESS)
    envelope["properties"]["data"] = data
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://gpuledger.io/schemas/{filename}",
        "title": f"gpuledger CloudEvent {event_type}",
        "description": _CROSS_FIELD_NOTE[event_type] or f"CloudEvents 1.0 envelope of {event_type}",
        **envelope,
    }


def rendered() -> dict[str, bytes]:
    """File name -> the exact bytes that belong in `SCHEMA_DIR`."""
    return {
        name: orjson.dumps(schema_for(kind), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        + b"\n"
        for kind, (name, _) in _PAYLOADS.items()
    }


def main() -> int:
    SCHEMA_DIR.mkdir(exist_ok=True)
    for name, body in rendered().items():
        (SCHEMA_DIR / name).write_bytes(body)
        print(SCHEMA_DIR / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())

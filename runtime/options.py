"""Command-line options that fall back to `GPULEDGER_*` environment variables."""

from __future__ import annotations

from collections.abc import Mapping


def gpuledger_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The `GPULEDGER_*` variables of `environ`: what an entry point hands to its parser."""
    return {k: v for k, v in environ.items() if k.startswith("GPULEDGER_")}

"""The external tools the deploy tests run (promtool, docker-compose, kustomize): found on PATH,
or a failure that says how to install them. Nothing is skipped silently."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZE_VERSION = "v5.5.0"


def require(tool: str, how: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: {how} (.ci/test installs it)", pytrace=False)
    return path


def kustomize_command() -> list[str]:
    """`kustomize build`, `kubectl kustomize`, or kustomize built from the Go module proxy into
    .cache/ (about a minute, once)."""
    if path := shutil.which("kustomize"):
        return [path, "build"]
    if path := shutil.which("kubectl"):
        return [path, "kustomize"]
    bin_dir = REPO / ".cache" / "kustomize" / KUSTOMIZE_VERSION
    built = bin_dir / "kustomize"
    if not built.exists():
        go = require("go", "install Go, kubectl or kustomize")
        env = {**os.environ, "GOBIN": str(bin_dir), "GOFLAGS": "-mod=mod"}
        result = subprocess.run(
            [go, "install", f"sigs.k8s.io/kustomize/kustomize/v5@{KUSTOMIZE_VERSION}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if result.returncode != 0 or not built.exists():
            pytest.fail(f"could not build kustomize with go:\n{result.stderr[-2000:]}")
    return [str(built), "build"]


@functools.cache
def _declared_variables() -> frozenset[str]:
    from gpuledger.cli import build_parser
    from runtime.options import declared_variables

    return frozenset(declared_variables(build_parser({})))


def read_by_code(key: str) -> bool:
    """Whether gpuledger's code reads the variable `key`: a subcommand of `gpuledger` declares
    it (runtime/options.py), so its --help shows `[env: key]`."""
    return key in _declared_variables()


# The ClickHouse password variables are part of the contract (design §6: credentials from
# env or files); until the store reads them, the tests that need it say so as expected failures.
CLICKHOUSE_PASSWORD_KEYS = ("GPULEDGER_CLICKHOUSE_PASSWORD", "GPULEDGER_CLICKHOUSE_PASSWORD_FILE")
PASSWORD_NOT_READ = pytest.mark.xfail(
    not all(read_by_code(k) for k in CLICKHOUSE_PASSWORD_KEYS),
    reason="streams/store.py does not read GPULEDGER_CLICKHOUSE_PASSWORD[_FILE] yet",
    strict=True,
)

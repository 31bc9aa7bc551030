"""The one chDB data folder of a test session. chDB runs one engine per process, on one folder:
once it is open on a folder, opening another fails ("EmbeddedServer already initialized with
path ..."). Every in-process test store therefore lives in this folder, each in a database of
its own, whichever module or fixture opens it."""

from __future__ import annotations

import atexit
import shutil
import tempfile

_FOLDER: str | None = None


def chdb_folder() -> str:
    """This process's chDB folder, made on first use and removed at exit."""
    global _FOLDER
    if _FOLDER is None:
        _FOLDER = tempfile.mkdtemp(prefix="gpuledger-chdb-")
        atexit.register(shutil.rmtree, _FOLDER, ignore_errors=True)
    return _FOLDER

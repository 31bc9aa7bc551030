"""Map a host PID to its Kubernetes pod uid and container id from `/proc/<pid>/cgroup`.

Handles cgroup v1 (one line per controller) and v2 (`0::/path`), the systemd driver
(`kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope`) and the cgroupfs
driver (`/kubepods/burstable/pod<uid>/<id>`), and the containerd, CRI-O and docker id forms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_POD_UID = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?![0-9a-f])"
)
# The last path component names the container: `cri-containerd-<id>.scope`, `crio-<id>.scope`,
# `docker-<id>.scope` (systemd driver) or a bare `<id>` (cgroupfs driver).
_CONTAINER = re.compile(
    r"^(?:cri-containerd-|crio-|docker-|containerd-)?([0-9a-f]{64})(?:\.scope)?$"
)


@dataclass(frozen=True, slots=True)
class PodRef:
    """Where a process runs: pod uid in its API form (dashes), container id (64 hex, no runtime
    prefix) or None when the path names the pod but not the container (e.g. the pause sandbox)."""

    pod_uid: str
    container_id: str | None


def parse_cgroup(text: str) -> PodRef | None:
    """The pod of a process from the text of its `/proc/<pid>/cgroup`; None for non-pod processes
    (host daemons, processes seen through a cgroup namespace as `0::/`)."""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        ref = _parse_path(parts[2].strip())
        if ref is not None:
            return ref
    return None


def _parse_path(path: str) -> PodRef | None:
    matches = list(_POD_UID.finditer(path))
    if not matches:
        return None
    match = matches[-1]  # the innermost pod component wins (kubepods nested under a node cgroup)
    pod_uid = match.group(1).replace("_", "-")
    container_id = None
    tail = path[match.end() :].strip("/")
    if tail.startswith(".slice"):
        tail = tail[len(".slice") :].strip("/")
    for component in tail.split("/"):
        found = _CONTAINER.match(component)
        if found is not None:
            container_id = found.group(1)
            break
    return PodRef(pod_uid=pod_uid, container_id=container_id)


class ProcCgroupReader:
    """Reads `<proc_root>/<pid>/cgroup`. The agent needs the host's PID namespace (`hostPID: true`)
    or the host's /proc mounted as `proc_root`, because NVML reports host PIDs."""

    def __init__(self, proc_root: str | Path = "/proc") -> None:
        self.proc_root = Path(proc_root)

    def __call__(self, pid: int) -> str | None:
        """The file's text, or None when the process is gone (or invisible to us)."""
        try:
            return (self.proc_root / str(pid) / "cgroup").read_text(
                encoding="utf-8", errors="replace"
            )
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            return None
        except PermissionError:
            return None

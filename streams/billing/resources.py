"""Cloud instance identity: one match key for a Kubernetes node's `spec.providerID` and for the
ResourceId a provider's FOCUS bill gives the same instance, and which instance types have GPUs.

The forms (design §11):
- AWS: providerID `aws:///<zone>/<instance id>`; the bill's ResourceId the instance id
  (`i-...`) or the instance's ARN `arn:<partition>:ec2:<region>:<account>:instance/<id>`.
  Key `aws:<instance id>`.
- Azure: providerID `azure://` + the VM's ARM id, `/subscriptions/<s>/resourceGroups/<rg>/
  providers/Microsoft.Compute/virtualMachines/<vm>`, or for a scale-set instance
  `.../virtualMachineScaleSets/<ss>/virtualMachines/<n>`; the bill's ResourceId the ARM id,
  and for a uniform scale set the scale set's id, which covers all its instances. ARM ids are
  case-insensitive: key `azure:` + the id in lower case; a scale-set instance also answers to
  its scale set's key.
- Google Cloud: providerID `gce://<project>/<zone>/<name>`; the bill's ResourceId the full
  resource name `//compute.googleapis.com/projects/<p>/zones/<z>/instances/<name or numeric
  id>` (with a numeric id, the name is the bill's ResourceName). Key `gcp:<zone>/<name>`: the
  project is left out, as a bill may name it by number where Kubernetes names it by id.
Any other id is its own key, unchanged.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

_AWS_ID = re.compile(r"i-[0-9a-f]{8,17}")
_AWS_ARN = re.compile(r"arn:aws[a-z-]*:ec2:[a-z0-9-]*:[0-9]*:instance/(i-[0-9a-f]{8,17})")
_AZURE_SCALE_SET_VM = re.compile(
    r"(/subscriptions/[^/]+/resourcegroups/[^/]+/providers/microsoft\.compute/"
    r"virtualmachinescalesets/[^/]+)/virtualmachines/[^/]+"
)
_GCP_RESOURCE = re.compile(
    r"//compute\.googleapis\.com/projects/[^/]+(?:/zones/([^/]+))?/instances/([^/]+)"
)
_GCP_PROVIDER_ID = re.compile(r"gce://[^/]+/([^/]+)/([^/]+)")

# Instance types with GPUs, as each provider names them (case-insensitive, whole token):
# AWS P and G families (p4d.24xlarge, p5.48xlarge, g5.xlarge, g6e.12xlarge, gr6.4xlarge),
# Azure N-series sizes (Standard_ND96isr_H100_v5, Standard_NC24ads_A100_v4, Standard_NV36ads_A10),
# Google Cloud accelerator-optimised machine types (a2-, a3-, a4-, g2-, g4-).
DEFAULT_GPU_INSTANCE_PATTERNS = (
    r"(p[2-9][a-z0-9-]*|g[3-9][a-z]*|gr6)\.[0-9]*[a-z]+[0-9]*",
    r"standard_n[cdvg][a-z0-9_-]*",
    r"(a2|a3|a4|g2|g4)-[a-z0-9-]+",
)
_TOKEN = re.compile(r"[A-Za-z0-9._-]+")


@functools.lru_cache(maxsize=65_536)
def node_keys(provider_id: str) -> tuple[str, ...]:
    """A node's match keys, the most specific first; () when it has no providerID."""
    pid = provider_id.strip()
    if not pid:
        return ()
    if pid.startswith("aws://"):
        last = pid.rstrip("/").rsplit("/", 1)[-1]
        return (f"aws:{last}",) if _AWS_ID.fullmatch(last) else (pid,)
    if pid.startswith("azure://"):
        path = "/" + pid[len("azure://") :].lstrip("/").rstrip("/").lower()
        scale_set = _AZURE_SCALE_SET_VM.fullmatch(path)
        if scale_set:
            return (f"azure:{path}", f"azure:{scale_set.group(1)}")
        return (f"azure:{path}",)
    if pid.startswith("gce://"):
        found = _GCP_PROVIDER_ID.fullmatch(pid)
        if found:
            return (f"gcp:{found.group(1)}/{found.group(2)}",)
    return (pid,)


def bill_key(resource_id: str, resource_name: str = "", availability_zone: str = "") -> str:
    """The match key of a bill line's resource; "" for a line without ResourceId."""
    rid = resource_id.strip()
    if not rid:
        return ""
    if _AWS_ID.fullmatch(rid):
        return f"aws:{rid}"
    arn = _AWS_ARN.fullmatch(rid)
    if arn:
        return f"aws:{arn.group(1)}"
    if rid.lower().startswith("/subscriptions/"):
        return "azure:" + rid.rstrip("/").lower()
    gcp = _GCP_RESOURCE.fullmatch(rid)
    if gcp:
        zone = gcp.group(1) or availability_zone.strip()
        name = gcp.group(2)
        if name.isascii() and name.isdigit() and resource_name.strip():
            name = resource_name.strip()
        return f"gcp:{zone}/{name}"
    return rid


class GpuInstanceTypes:
    """Which instance types have GPUs, by whole-token patterns (case-insensitive)."""

    __slots__ = ("_patterns",)

    def __init__(self, patterns: Iterable[str] = DEFAULT_GPU_INSTANCE_PATTERNS) -> None:
        self._patterns = tuple(re.compile(p, re.IGNORECASE) for p in patterns)

    def is_gpu(self, instance_type: str) -> bool:
        return any(p.fullmatch(instance_type) for p in self._patterns)

    def find(self, *texts: str) -> str:
        """The first GPU instance type named in any of `texts` (a usage type such as
        `USE1-BoxUsage:p5.48xlarge`, a SKU description), else ""."""
        for text in texts:
            for token in _TOKEN.findall(text):  # str tokens: the pattern has no groups
                if self.is_gpu(token):
                    return str(token)
        return ""

"""A GPU instance as its provider's bill names it (pure): ids, region, service, SKU and the
commitments that cover it, from the Kubernetes node's `spec.providerID`; and `BillNode`, an
instance with its prices, for `gpuledger.demo.bills`."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

Provider = Literal["aws", "azure", "gcp"]
Pricing = Literal["on_demand", "savings_plan", "reserved", "spot"]
# How a bill writes an instance's ResourceId: "name" the provider's default (AWS the instance
# id, Azure the ARM id, GCP the full name ending in the instance name); "arn" AWS's EC2 ARN;
# "numeric_id" GCP's full name ending in the numeric instance id (the name is ResourceName).
ResourceIdForm = Literal["name", "arn", "numeric_id"]
Row = dict[str, Any]
_PLACES = Decimal("1e-10")

_REGION_NAMES = {
    "us-east-1": "US East (N. Virginia)",
    "us-east-2": "US East (Ohio)",
    "us-west-2": "US West (Oregon)",
    "eu-west-1": "EU (Ireland)",
    "eastus": "East US",
    "eastus2": "East US 2",
    "westus3": "West US 3",
    "southcentralus": "South Central US",
    "westeurope": "West Europe",
    "us-central1": "Iowa",
    "us-east4": "Northern Virginia",
    "us-east5": "Columbus",
    "europe-west4": "Netherlands",
}
_AWS_USAGE_PREFIX = {
    "us-east-1": "USE1",
    "us-east-2": "USE2",
    "us-west-2": "USW2",
    "eu-west-1": "EU",
}
AWS_ACCOUNT_ID = "210987654321"  # the linked account of the demo's instances
_AWS_PROVIDER_ID = re.compile(r"aws:///([a-z0-9-]+)/(i-[0-9a-f]{8,17})")
_AZURE_PROVIDER_ID = re.compile(
    r"azure:///subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/Microsoft\.Compute/"
    r"(?:virtualMachines/([^/]+)|virtualMachineScaleSets/([^/]+)/virtualMachines/([^/]+))",
    re.IGNORECASE,
)
_GCE_PROVIDER_ID = re.compile(r"gce://([^/]+)/([a-z0-9-]+)/([^/]+)")


def _digest(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()


def _uuid(*parts: object) -> str:
    h = _digest(*parts)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:32]}"


@dataclass(frozen=True)
class Instance:
    """A GPU instance's identity as its provider's bill gives it, from the providerID."""

    provider: Literal["aws", "azure", "gcp"]
    name: str  # the instance id (AWS), VM or scale-set instance name, GCE instance name
    region: str
    zone: str  # "" where the providerID has none (Azure)
    sub_account_id: str  # AWS linked account, Azure subscription, GCP project
    resource_group: str = ""  # Azure
    scale_set: str = ""  # Azure: the VM scale set the instance belongs to

    @property
    def sub_account_name(self) -> str:
        return self.sub_account_id if self.provider == "gcp" else "gpu-inference"

    @property
    def account_name(self) -> str:
        return "ExampleCorp"

    @property
    def billing_account_type(self) -> str:
        return {"aws": "Payer Account", "azure": "Billing Profile", "gcp": "Billing Account"}[
            self.provider
        ]

    @property
    def sub_account_type(self) -> str:
        return {"aws": "Linked Account", "azure": "Subscription", "gcp": "Project"}[self.provider]

    @property
    def region_name(self) -> str:
        return _REGION_NAMES.get(self.region, self.region)

    def billed_resource_id(self, form: ResourceIdForm = "name") -> str:
        """The ResourceId of the instance's usage lines: AWS the instance id or its EC2 ARN;
        Azure the ARM id in lower case, a scale set's for its instances; GCP the full name
        with the instance's name or numeric id."""
        if (
            form
            not in {"aws": ("name", "arn"), "azure": ("name",), "gcp": ("name", "numeric_id")}[
                self.provider
            ]
        ):
            raise ValueError(f"no ResourceId form {form!r} for {self.provider}")
        if self.provider == "aws":
            if form == "arn":
                return f"arn:aws:ec2:{self.region}:{self.sub_account_id}:instance/{self.name}"
            return self.name
        if self.provider == "azure":
            base = self._azure_group()
            if self.scale_set:
                return (
                    f"{base}/providers/microsoft.compute/virtualmachinescalesets/{self.scale_set}"
                )
            return f"{base}/providers/microsoft.compute/virtualmachines/{self.name}"
        if form == "numeric_id":
            number = int(_digest("gce-id", self.sub_account_id, self.zone, self.name)[:15], 16)
            return f"{self.gce_zone_path}/instances/{number % 10**19:019d}"
        return f"{self.gce_zone_path}/instances/{self.name}"

    @property
    def gce_zone_path(self) -> str:
        return f"//compute.googleapis.com/projects/{self.sub_account_id}/zones/{self.zone}"

    @property
    def usage_prefix(self) -> str:
        """AWS's region code in usage types (USE1-BoxUsage:...)."""
        return _AWS_USAGE_PREFIX.get(self.region, self.region)

    def _azure_group(self) -> str:
        return f"/subscriptions/{self.sub_account_id}/resourcegroups/{self.resource_group}".lower()

    @property
    def billed_resource_name(self) -> str | None:
        """None for AWS: FOCUS's ResourceName must not repeat a system-generated ResourceId."""
        if self.provider == "aws":
            return None
        return self.scale_set.lower() if self.scale_set else self.name.lower()

    @property
    def resource_type(self) -> str:
        if self.provider == "azure":
            return "Virtual machine scale set" if self.scale_set else "Virtual machine"
        return {"aws": "EC2 Instance", "gcp": "Compute Instance"}[self.provider]

    def usage_description(self, instance_type: str, pricing: str) -> str:
        kind = {
            "on_demand": "On Demand",
            "spot": "Spot",
            "savings_plan": "Savings Plan covered",
            "reserved": "Reserved",
        }[pricing]
        return f"{kind} Linux {instance_type} instance hour"

    def compute_service(self) -> Row:
        name = {
            "aws": "Amazon Elastic Compute Cloud",
            "azure": "Virtual Machines",
            "gcp": "Compute Engine",
        }[self.provider]
        return {
            "ServiceName": name,
            "ServiceCategory": "Compute",
            "ServiceSubcategory": "Virtual Machines",
        }

    def tax_service(self) -> Row:
        return {"ServiceSubcategory": "Other (Other)", "ResourceId": None, "ResourceName": None}

    def sku(self, instance_type: str, pricing: str, seed: int) -> Row:
        sku = self._sku_id("compute", instance_type)
        details = {"InstanceType": instance_type, "OperatingSystem": "Linux"}
        if self.provider == "gcp":
            details["x_Preemptible"] = "true" if pricing == "spot" else "false"
        return {
            "SkuId": sku,
            "SkuPriceId": self._sku_price_id(sku, pricing),
            "SkuPriceDetails": json.dumps(details, separators=(",", ":")),
        }

    def _sku_id(self, *parts: str) -> str:
        h = _digest(self.provider, self.region, *parts).upper()
        if self.provider == "gcp":
            return f"{h[:4]}-{h[4:8]}-{h[8:12]}"
        if self.provider == "azure":
            return f"DZH318Z0{h[:4]}"  # Azure product ids: 12 characters
        return "".join(c for c in h if c.isalnum())[:16]

    def _sku_price_id(self, sku: str, pricing: str) -> str:
        h = _digest(sku, pricing).upper()
        if self.provider == "aws":
            return f"{sku}.{h[:10]}.{h[10:20]}"  # <sku>.<offer term>.<rate code>
        if self.provider == "azure":
            return f"{sku}_{h[:4]}_{pricing}"
        return f"{sku}-{h[:4]}"

    def x_usage(self, instance_type: str, pricing: str) -> Row:
        if self.provider == "aws":
            prefix = self.usage_prefix
            box = "SpotUsage" if pricing == "spot" else "BoxUsage"
            return {
                "x_CostCategories": "{}",
                "x_Operation": "RunInstances",
                "x_ServiceCode": "AmazonEC2",
                "x_UsageType": f"{prefix}-{box}:{instance_type}",
            }
        if self.provider == "azure":
            meter = instance_type.removeprefix("Standard_").replace("_", " ")
            return {
                "x_ResourceGroupName": self.resource_group.lower(),
                "x_SkuMeterCategory": "Virtual Machines",
                "x_SkuMeterSubcategory": f"{meter.split()[0]} Series",
                "x_SkuMeterName": meter + (" Spot" if pricing == "spot" else ""),
                "x_SkuDescription": f"Virtual Machines {meter} - {self.region_name}",
                "x_PricingBlockSize": "1",
            }
        return {
            "x_ServiceId": "6F81-5844-456A",
            "x_SkuDescription": f"{instance_type} instance running in {self.region_name}",
        }

    def disk(self, seed: int) -> Row:
        """The instance's attached block volume: its own ResourceId."""
        tag = _digest(seed, "disk", self.name)
        # AWS bills EBS, and Google Cloud persistent disks, under the compute service, and a
        # FOCUS service has one category: theirs; Azure's disks are the Storage service's.
        storage = {"ServiceCategory": "Storage", "ServiceSubcategory": "Block Storage"}
        compute = self.compute_service()
        if self.provider == "aws":
            vol = f"vol-{tag[:17]}"
            return {
                "ResourceId": vol,
                "ResourceName": None,
                "ResourceType": "EBS Volume",
                **compute,
                "ChargeDescription": "EBS gp3 provisioned storage",
                "SkuId": self._sku_id("ebs"),
                "SkuPriceId": self._sku_price_id(self._sku_id("ebs"), "od"),
                "x_CostCategories": "{}",
                "x_Operation": "CreateVolume-Gp3",
                "x_ServiceCode": "AmazonEC2",
                "x_UsageType": f"{self.usage_prefix}-EBS:VolumeUsage.gp3",
            }
        if self.provider == "azure":
            name = f"{self.name}_osdisk_{tag[:8]}".lower()
            return {
                "ResourceId": f"{self._azure_group()}/providers/microsoft.compute/disks/{name}",
                "ResourceName": name,
                "ResourceType": "Disk",
                "ServiceName": "Storage",
                **storage,
                "ChargeDescription": "Premium SSD managed disk",
                "SkuId": self._sku_id("disk"),
                "SkuPriceId": self._sku_price_id(self._sku_id("disk"), "od"),
                "x_ResourceGroupName": self.resource_group.lower(),
                "x_SkuMeterCategory": "Storage",
                "x_SkuMeterSubcategory": "Premium SSD Managed Disks",
                "x_SkuMeterName": "P40 LRS Disk",
                "x_SkuDescription": "Premium SSD Managed Disks P40 LRS",
                "x_PricingBlockSize": "1",
            }
        name = f"{self.name}-boot"
        return {
            "ResourceId": f"{self.gce_zone_path}/disks/{name}",
            "ResourceName": name,
            "ResourceType": "Persistent Disk",
            **compute,
            "ChargeDescription": "Balanced PD capacity",
            "SkuId": self._sku_id("pd"),
            "SkuPriceId": self._sku_price_id(self._sku_id("pd"), "od"),
            "x_ServiceId": "6F81-5844-456A",
            "x_SkuDescription": f"Balanced PD Capacity in {self.region_name}",
        }

    def transfer(self, seed: int, form: ResourceIdForm = "name") -> Row:
        """Data transfer out of the instance: charged to the instance's own ResourceId, as the
        providers do, but not an instance-hour."""
        net = {
            "ServiceCategory": "Networking",
            "ServiceSubcategory": "Network Connectivity",
            "ResourceId": self.billed_resource_id(form),
            "ResourceName": self.billed_resource_name,
            "ResourceType": self.resource_type,
            "ChargeDescription": "Data transfer out to the internet",
            "SkuId": self._sku_id("egress"),
            "SkuPriceId": self._sku_price_id(self._sku_id("egress"), "od"),
        }
        if self.provider == "aws":
            return {
                **net,
                "ServiceName": "AWS Data Transfer",
                "x_CostCategories": "{}",
                "x_Operation": "RunInstances",
                "x_ServiceCode": "AWSDataTransfer",
                "x_UsageType": f"{self.usage_prefix}-DataTransfer-Out-Bytes",
            }
        if self.provider == "azure":
            return {
                **net,
                "ServiceName": "Bandwidth",
                "x_ResourceGroupName": self.resource_group.lower(),
                "x_SkuMeterCategory": "Bandwidth",
                "x_SkuMeterSubcategory": "Rtn Preference: MGN",
                "x_SkuMeterName": "Standard Data Transfer Out",
                "x_SkuDescription": "Bandwidth Data Transfer Out",
                "x_PricingBlockSize": "1",
            }
        return {
            **net,
            **self.compute_service(),
            "x_ServiceId": "6F81-5844-456A",
            "x_SkuDescription": "Network Internet Data Transfer Out",
        }


def parse_provider_id(provider_id: str, region: str = "") -> Instance:
    """The instance behind a Kubernetes node's `spec.providerID`; ValueError for another form."""
    aws = _AWS_PROVIDER_ID.fullmatch(provider_id)
    if aws:
        zone = aws.group(1)
        return Instance(
            "aws",
            aws.group(2),
            region or zone.rstrip("abcdefghijklmnopqrstuvwxyz"),
            zone,
            AWS_ACCOUNT_ID,
        )
    azure = _AZURE_PROVIDER_ID.fullmatch(provider_id)
    if azure:
        sub, group, vm, scale_set, index = azure.groups()
        name = vm or f"{scale_set}_{index}"
        return Instance("azure", name, region or "eastus", "", sub, group, scale_set or "")
    gce = _GCE_PROVIDER_ID.fullmatch(provider_id)
    if gce:
        project, zone, name = gce.groups()
        return Instance("gcp", name, region or zone.rsplit("-", 1)[0], zone, project)
    raise ValueError(f"not an AWS, Azure or GCE providerID: {provider_id!r}")


def commitment_identity(
    instance: Instance, pricing: str, instance_type: str, seed: int
) -> dict[str, str]:
    """The commitment covering the instance: one savings plan (spend) per sub account, one
    reservation (usage) per instance type and region."""
    spend = pricing == "savings_plan"
    scope = instance.sub_account_id if spend else f"{instance.region}/{instance_type}"
    uid = _uuid(seed, instance.provider, pricing, scope)
    category = "Spend" if spend else "Usage"
    if instance.provider == "aws":
        cid = (
            f"arn:aws:savingsplans::{instance.sub_account_id}:savingsplan/{uid}"
            if spend
            else f"arn:aws:ec2:{instance.region}:{instance.sub_account_id}:reserved-instances/{uid}"
        )
        kind, name = (
            ("Savings Plan", "ComputeSavingsPlans")
            if spend
            else ("Reserved Instance", f"{instance_type} 1yr No Upfront")
        )
    elif instance.provider == "azure":
        order = _uuid(seed, "order", uid)
        cid = (
            f"/providers/microsoft.billingbenefits/savingsplanorders/{order}/savingsplans/{uid}"
            if spend
            else f"/providers/microsoft.capacity/reservationorders/{order}/reservations/{uid}"
        )
        kind, name = (
            ("Savings Plan", "Compute savings plan 1yr")
            if spend
            else ("Reservation", f"{instance_type} 1yr")
        )
    else:
        cname = f"{'flex' if spend else 'cud'}-{uid[:8]}"
        project = f"//compute.googleapis.com/projects/{instance.sub_account_id}"
        cid = f"{project}/regions/{instance.region}/commitments/{cname}"
        kind, name = (
            "Committed Use Discount",
            ("Compute flexible CUD 1yr" if spend else f"{instance_type} resource CUD 1yr"),
        )
    return {
        "id": cid,
        "name": name,
        "type": kind,
        "category": category,
        "resource_name": cid.rsplit("/", 1)[-1],
        "sku": instance._sku_id("commitment", pricing),
    }


@dataclass(frozen=True)
class BillNode:
    """A GPU instance as its provider bills it. `effective_price_per_hour` is what one hour costs
    after commitment discounts (for spot, the mean of the hourly spot price); for on-demand it
    must equal `list_price_per_hour`. `region` is needed for Azure (its providerID has none)."""

    provider_id: str
    instance_type: str
    list_price_per_hour: Decimal
    effective_price_per_hour: Decimal
    pricing: Pricing = "on_demand"
    region: str = ""
    instance: Instance = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.pricing not in ("on_demand", "savings_plan", "reserved", "spot"):
            raise ValueError(f"unknown pricing {self.pricing!r}")
        if (
            self.pricing == "on_demand"
            and self.list_price_per_hour != self.effective_price_per_hour
        ):
            raise ValueError("an on-demand node's effective price is its list price")
        for price in (self.list_price_per_hour, self.effective_price_per_hour):
            if price < 0 or price != price.quantize(_PLACES):
                raise ValueError(f"a price must be >= 0 with at most 10 decimal places: {price}")
        object.__setattr__(self, "instance", parse_provider_id(self.provider_id, self.region))

    @property
    def provider(self) -> Provider:
        return self.instance.provider

"""Match keys: a node's providerID and the bill's ResourceId of the same instance agree, in
each provider's forms; different instances never share a key."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streams.billing.resources import GpuInstanceTypes, bill_key, node_keys


def test_aws_instance_id_and_arn_match_the_provider_id() -> None:
    (key,) = node_keys("aws:///us-east-1a/i-0123456789abcdef0")
    assert key == "aws:i-0123456789abcdef0"
    assert bill_key("i-0123456789abcdef0") == key
    assert bill_key("arn:aws:ec2:us-east-1:123456789012:instance/i-0123456789abcdef0") == key
    assert bill_key("arn:aws-us-gov:ec2:us-gov-west-1:1:instance/i-0123456789abcdef0") == key
    assert bill_key("i-0123456789abcdef1") != key


def test_azure_ids_are_case_insensitive_and_scale_sets_cover_their_instances() -> None:
    vm = "azure:///subscriptions/S-1/resourceGroups/RG-Gpu/providers/Microsoft.Compute/virtualMachines/gpu-0"
    (key,) = node_keys(vm)
    assert (
        bill_key(
            "/subscriptions/s-1/resourcegroups/rg-gpu/providers/microsoft.compute/virtualmachines/GPU-0"
        )
        == key
    )
    instance = (
        "azure:///subscriptions/s/resourceGroups/MC_rg/providers/Microsoft.Compute/"
        "virtualMachineScaleSets/aks-gpu-123/virtualMachines/3"
    )
    keys = node_keys(instance)
    assert len(keys) == 2
    assert (
        bill_key(
            "/subscriptions/s/resourceGroups/MC_rg/providers/Microsoft.Compute/"
            "virtualMachineScaleSets/aks-gpu-123"
        )
        == keys[1]
    )
    assert (
        bill_key(
            "/subscriptions/s/resourceGroups/MC_rg/providers/Microsoft.Compute/"
            "virtualMachineScaleSets/aks-gpu-123/virtualMachines/3"
        )
        == keys[0]
    )


def test_gcp_full_resource_name_by_name_or_by_numeric_id_with_resource_name() -> None:
    (key,) = node_keys("gce://my-project/us-central1-a/gke-gpu-pool-1-abcd")
    assert key == "gcp:us-central1-a/gke-gpu-pool-1-abcd"
    assert (
        bill_key(
            "//compute.googleapis.com/projects/my-project/zones/us-central1-a/instances/gke-gpu-pool-1-abcd"
        )
        == key
    )
    assert (
        bill_key(
            "//compute.googleapis.com/projects/123456/zones/us-central1-a/instances/8812345678901234",
            "gke-gpu-pool-1-abcd",
        )
        == key
    )
    assert (
        bill_key(
            "//compute.googleapis.com/projects/p/instances/gke-gpu-pool-1-abcd", "", "us-central1-a"
        )
        == key
    )
    assert (
        bill_key(
            "//compute.googleapis.com/projects/p/zones/us-central1-b/instances/gke-gpu-pool-1-abcd"
        )
        != key
    )


def test_no_resource_id_has_no_key_and_unknown_forms_are_their_own_key() -> None:
    assert bill_key("") == ""
    assert node_keys("") == ()
    assert bill_key("vol-0abc") == "vol-0abc"
    assert node_keys("kind://docker/kind/kind-worker") == ("kind://docker/kind/kind-worker",)


@given(
    st.from_regex(r"i-[0-9a-f]{17}", fullmatch=True),
    st.from_regex(r"i-[0-9a-f]{17}", fullmatch=True),
)
def test_distinct_aws_instances_have_distinct_keys(a: str, b: str) -> None:
    assert (node_keys(f"aws:///z/{a}") == node_keys(f"aws:///z/{b}")) == (a == b)


@given(st.text(max_size=200), st.text(max_size=50), st.text(max_size=20))
def test_bill_key_takes_any_text(resource_id: str, name: str, zone: str) -> None:
    assert isinstance(bill_key(resource_id, name, zone), str)
    assert isinstance(node_keys(resource_id), tuple)


def test_gpu_instance_types_of_each_provider() -> None:
    types = GpuInstanceTypes()
    for gpu in (
        "p5.48xlarge",
        "p4d.24xlarge",
        "g5.xlarge",
        "g6e.12xlarge",
        "g4dn.metal",
        "p6-b200.48xlarge",
        "Standard_ND96isr_H100_v5",
        "Standard_NC24ads_A100_v4",
        "a3-highgpu-8g",
        "a2-ultragpu-1g",
        "g2-standard-24",
    ):
        assert types.is_gpu(gpu), gpu
    for other in (
        "m6i.large",
        "c7g.16xlarge",
        "Standard_D4s_v5",
        "n2-standard-8",
        "gp3",
        "trn1.32xlarge",
        "inf2.xlarge",
    ):
        assert not types.is_gpu(other), other
    assert types.find("USE1-BoxUsage:p5.48xlarge") == "p5.48xlarge"
    assert types.find("EBS:VolumeUsage.gp3", "") == ""

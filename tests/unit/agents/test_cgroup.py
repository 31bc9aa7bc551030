"""PID to pod mapping from real /proc/<pid>/cgroup lines (sources in the NVML fact sheet)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.cgroup import PodRef, ProcCgroupReader, parse_cgroup

CID = "40c03570b6f4c30bc8d69923d37ee698f5cfcced92c7b7df1c47f6f7887378a9"

REAL_LINES = [
    # v2, systemd driver, containerd (EKS) — grafana/beyla container_test.go
    (
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-"
        "poddde1244b_5bb5_4297_b544_85f3bc0d80bf.slice/cri-containerd-" + CID + ".scope",
        PodRef("dde1244b-5bb5-4297-b544-85f3bc0d80bf", CID),
    ),
    # v2, systemd, besteffort
    (
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-"
        "pod4c9f1974_5c46_44c2_b42f_3bbf0e98eef9.slice/cri-containerd-" + CID + ".scope",
        PodRef("4c9f1974-5c46-44c2-b42f-3bbf0e98eef9", CID),
    ),
    # v2, CRI-O
    (
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-"
        "pod042efd86_1f3b_4f2f_8736_f31c58e95bbc.slice/crio-" + CID + ".scope",
        PodRef("042efd86-1f3b-4f2f-8736-f31c58e95bbc", CID),
    ),
    # v2, cgroupfs driver (GKE)
    (
        "0::/kubepods/burstable/pod4a163a05-439d-484b-8e53-2968bc15824f/" + CID,
        PodRef("4a163a05-439d-484b-8e53-2968bc15824f", CID),
    ),
    # Guaranteed QoS: no QoS level in the path
    (
        "0::/kubepods.slice/kubepods-pod4a163a05_439d_484b_8e53_2968bc15824f.slice/crio-"
        + CID
        + ".scope",
        PodRef("4a163a05-439d-484b-8e53-2968bc15824f", CID),
    ),
    # v1, cgroupfs, one line per controller
    (
        "12:pids:/\n"
        "5:memory:/kubepods/burstable/podb60126d8-9064-11eb-836e-7a2eb63c648a/"
        "bde707e9e3043b4492f3a7d9be42b70d85c583c4792a3c3968194369163874e7\n",
        PodRef(
            "b60126d8-9064-11eb-836e-7a2eb63c648a",
            "bde707e9e3043b4492f3a7d9be42b70d85c583c4792a3c3968194369163874e7",
        ),
    ),
    # docker with the systemd driver
    (
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-"
        "poddde1244b_5bb5_4297_b544_85f3bc0d80bf.slice/docker-" + CID + ".scope",
        PodRef("dde1244b-5bb5-4297-b544-85f3bc0d80bf", CID),
    ),
    # the pod's own slice (no container component): pod known, container not
    (
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-"
        "poda9c80282_3f6b_4d5b_84d5_a137a6668011.slice",
        PodRef("a9c80282-3f6b-4d5b-84d5-a137a6668011", None),
    ),
]


@pytest.mark.parametrize(("text", "expected"), REAL_LINES)
def test_real_cgroup_lines_map_to_pod_and_container(text: str, expected: PodRef) -> None:
    assert parse_cgroup(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "0::/",  # seen from inside a cgroup namespace
        "0::/../..",
        "0::/system.slice/containerd.service",
        "0::/user.slice/user-1000.slice/session-3.scope",
        "12:pids:/\n11:memory:/\n",
        "",
        "garbage without colons",
        "0::/kubepods/burstable/podnot-a-uid/" + CID,
    ],
)
def test_non_pod_processes_map_to_nothing(text: str) -> None:
    assert parse_cgroup(text) is None


def test_conmon_scope_is_not_taken_for_the_container() -> None:
    text = (
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-"
        "pod042efd86_1f3b_4f2f_8736_f31c58e95bbc.slice/crio-conmon-" + CID + ".scope"
    )
    assert parse_cgroup(text) == PodRef("042efd86-1f3b-4f2f-8736-f31c58e95bbc", None)


_layouts = st.sampled_from(
    [
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u_}.slice/"
        "cri-containerd-{c}.scope",
        "0::/kubepods.slice/kubepods-pod{u_}.slice/crio-{c}.scope",
        "0::/kubepods/besteffort/pod{u}/{c}",
        "3:cpu,cpuacct:/kubepods/pod{u}/{c}\n1:name=systemd:/kubepods/pod{u}/{c}",
    ]
)


@given(pod_uid=st.uuids(), container=st.binary(min_size=32, max_size=32), layout=_layouts)
def test_any_uid_and_container_round_trip(
    pod_uid: uuid.UUID, container: bytes, layout: str
) -> None:
    u = str(pod_uid)
    text = layout.format(u=u, u_=u.replace("-", "_"), c=container.hex())
    assert parse_cgroup(text) == PodRef(u, container.hex())


def test_reader_returns_none_for_a_gone_process(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text(REAL_LINES[0][0])
    reader = ProcCgroupReader(tmp_path)
    assert reader(42) == REAL_LINES[0][0]
    assert reader(43) is None

"""Kubernetes manifests: rendered by kustomize, validated against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict), then checked for what the manifests promise: selectors that
match, every ConfigMap and ServiceAccount referenced exists, Secrets only by reference, least
privilege for the agent and in RBAC, commands the CLI accepts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_tools import (
    CLICKHOUSE_PASSWORD_KEYS,
    PASSWORD_NOT_READ,
    REPO,
    read_by_code,
)
from kube_manifests import render

from gpuledger.cli import build_parser
from streams.pricing import load_price_book, parse_price_book
from streams.reports.budgets import load_budgets, parse_budgets

K8S = REPO / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.31"  # ValidatingAdmissionPolicy v1 is GA from 1.30
IMAGE = "ghcr.io/gpuledger/gpuledger:0.1.0"
EXTERNAL_SECRETS = {"gpuledger-clickhouse", "gpuledger-kafka"}  # created by the operator
NAMESPACED_NOT = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}
WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet"}
AGENT_NAMESPACE = "gpuledger-agent"  # the privileged Pod Security level, for the agent alone
KUSTOMIZATIONS = [
    "deploy/kubernetes",
    "deploy/kubernetes/base",
    "deploy/kubernetes/tag-enforcement/enforce",
    "deploy/kubernetes/tag-enforcement/audit",
]


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render("deploy/kubernetes")


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (d for d in docs if d["kind"] in WORKLOADS)


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_kustomization_builds_and_validates_against_the_schemas(path: str) -> None:
    docs = render(path)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            raise AssertionError(
                f"{path}: {doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}"
            ) from exc


def test_the_schema_check_rejects_a_broken_manifest(rendered: list[dict[str, Any]]) -> None:
    broken = yaml.safe_load(yaml.safe_dump(by_kind(rendered, "DaemonSet")["gpuledger-agent"]))
    broken["spec"]["template"]["spec"]["hostPid"] = True  # misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_parts_are_all_there(rendered: list[dict[str, Any]]) -> None:
    assert set(by_kind(rendered, "DaemonSet")) == {"gpuledger-agent"}
    assert set(by_kind(rendered, "Deployment")) == {
        "gpuledger-worker",
        "gpuledger-pods",
        "gpuledger-tokens",
    }
    assert {"gpuledger-config", "gpuledger-price-book", "gpuledger-budgets"} <= set(
        by_kind(rendered, "ConfigMap")
    )
    assert set(by_kind(rendered, "Namespace")) == {"gpuledger", AGENT_NAMESPACE}
    for doc in rendered:
        name = doc["metadata"]["name"]
        if doc["kind"] in NAMESPACED_NOT:
            assert "namespace" not in doc["metadata"], name
        elif name == "gpuledger-agent" or (
            doc["kind"] in ("ConfigMap", "NetworkPolicy")
            and doc["metadata"]["namespace"] != "gpuledger"
        ):
            # The agent's DaemonSet, ServiceAccount and Service; its copy of the settings and
            # its NetworkPolicy.
            assert doc["metadata"]["namespace"] == AGENT_NAMESPACE, (doc["kind"], name)
        else:
            assert doc["metadata"]["namespace"] == "gpuledger", (doc["kind"], name)
    args = {w["metadata"]["name"]: containers(w)[0]["args"][0] for w in workloads(rendered)}
    assert sorted(args.values()) == ["agent", "pods", "tokens", "worker"]


def test_selectors_match_their_pods(rendered: list[dict[str, Any]]) -> None:
    templates = {}
    for w in workloads(rendered):
        labels = w["spec"]["template"]["metadata"]["labels"]
        selector = w["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), w["metadata"]["name"]
        templates[w["metadata"]["name"]] = (labels, containers(w))
    for name, service in by_kind(rendered, "Service").items():
        selector = service["spec"]["selector"]
        matched = [
            (n, cs) for n, (labels, cs) in templates.items() if selector.items() <= labels.items()
        ]
        assert len(matched) == 1, f"Service {name} selects {[n for n, _ in matched]}"
        port_names = {p["name"] for c in matched[0][1] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{name} targets missing port"


def test_referenced_configmaps_accounts_and_secrets(rendered: list[dict[str, Any]]) -> None:
    configmaps = set(by_kind(rendered, "ConfigMap"))
    accounts = set(by_kind(rendered, "ServiceAccount"))
    assert not by_kind(rendered, "Secret"), "no Secret in the manifests: by reference only"
    secrets_used: set[str] = set()
    for w in workloads(rendered):
        spec = w["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] in accounts
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps
            if "secret" in volume:
                secrets_used.add(volume["secret"]["secretName"])
        mounted = {v["name"] for v in spec.get("volumes", [])}
        for c in containers(w):
            for source in c.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps
            for env in c.get("env", []):
                ref = env.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["name"] in configmaps
                if "secretKeyRef" in ref:
                    secrets_used.add(ref["secretKeyRef"]["name"])
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in mounted, f"{c['name']} mounts unknown {mount['name']}"
    assert secrets_used == EXTERNAL_SECRETS
    docs = (REPO / "README.md").read_text()
    for secret in EXTERNAL_SECRETS:
        assert f"create secret generic {secret}" in docs, (
            f"the README must say how to create {secret}"
        )
    # The only required Secret is the ClickHouse password; Kafka credentials are optional.
    for w in workloads(rendered):
        for volume in w["spec"]["template"]["spec"].get("volumes", []):
            if volume.get("secret", {}).get("secretName") == "gpuledger-kafka":
                assert volume["secret"]["optional"] is True


def test_images_probes_limits_and_container_hardening(rendered: list[dict[str, Any]]) -> None:
    for w in workloads(rendered):
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in containers(w):
            name = f"{w['metadata']['name']}/{c['name']}"
            assert c["image"] == IMAGE, name
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), name
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), name
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged") is not True
            assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
            assert c["readinessProbe"]["httpGet"]["path"] == "/healthz", name
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", name


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


# The worker's steady RSS at the documented scale (1,000 nodes x 8 GPUs, 1 h retention):
# the ceiling docs/benchmarks.md measures against ("Worker state at 1,000 nodes").
WORKER_STEADY_BYTES = 1_500_000_000


def test_the_worker_is_sized_for_the_documented_scale(rendered: list[dict[str, Any]]) -> None:
    worker = by_kind(rendered, "Deployment")["gpuledger-worker"]
    [c] = containers(worker)
    requests, limits = c["resources"]["requests"], c["resources"]["limits"]
    assert _bytes(requests["memory"]) >= WORKER_STEADY_BYTES  # scheduled where it fits
    assert _bytes(limits["memory"]) >= 2 * WORKER_STEADY_BYTES  # margin for bursts
    assert "1,000 nodes x 8 GPUs" in Path(REPO, "docs/benchmarks.md").read_text()


def test_agent_runs_on_gpu_nodes_with_host_pids_and_read_only_proc(
    rendered: list[dict[str, Any]],
) -> None:
    agent = by_kind(rendered, "DaemonSet")["gpuledger-agent"]
    pod = agent["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["automountServiceAccountToken"] is False
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert not pod.get("hostNetwork") and not pod.get("hostIPC")
    (c,) = pod["containers"]
    assert "nvidia.com/gpu" not in c["resources"]["limits"], "the agent uses no GPU of its own"
    proc = next(v for v in pod["volumes"] if "hostPath" in v)
    assert proc["hostPath"]["path"] == "/proc"
    assert [v for v in pod["volumes"] if "hostPath" in v] == [proc], "no other host path"
    mount = next(m for m in c["volumeMounts"] if m["name"] == proc["name"])
    assert mount["readOnly"] is True
    env = {e["name"]: e for e in c["env"]}
    assert env["GPULEDGER_PROC_ROOT"]["value"] == mount["mountPath"]
    assert env["GPULEDGER_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"


def test_rbac_is_read_only_and_bound_to_the_parts_that_call_the_api(
    rendered: list[dict[str, Any]],
) -> None:
    roles = {**by_kind(rendered, "ClusterRole"), **by_kind(rendered, "Role")}
    bindings = [*by_kind(rendered, "ClusterRoleBinding").values()]
    bindings += by_kind(rendered, "RoleBinding").values()
    accounts = set(by_kind(rendered, "ServiceAccount"))
    granted: dict[str, set[tuple[str, str]]] = {}
    for binding in bindings:
        role = roles[binding["roleRef"]["name"]]
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["name"] in accounts
            assert subject["namespace"] == "gpuledger"
            for rule in role["rules"]:
                assert set(rule["verbs"]) <= {"get", "list", "watch"}, role["metadata"]["name"]
                assert "*" not in rule["resources"] and "*" not in rule["apiGroups"]
                granted.setdefault(subject["name"], set()).update(
                    (r, v) for r in rule["resources"] for v in rule["verbs"]
                )
    assert granted["gpuledger-tokens"] == {("pods", "get"), ("pods", "list"), ("pods", "watch")}
    assert "gpuledger-agent" not in granted and "gpuledger-worker" not in granted


@pytest.mark.xfail(
    not (K8S / "base" / "pods-rbac.yaml").exists(),
    reason="deploy/kubernetes/base/pods-rbac.yaml (the pod watcher's RBAC) is not written yet",
    strict=True,
)
def test_pod_watcher_rbac_is_part_of_the_base() -> None:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    rbac = K8S / "base" / "pods-rbac.yaml"
    assert rbac.exists(), (
        "deploy/kubernetes/base/pods-rbac.yaml (the pod watcher's RBAC) is missing"
    )
    assert "pods-rbac.yaml" in kustomization["resources"]
    docs = render("deploy/kubernetes/base")
    bound = [
        b
        for b in by_kind(docs, "ClusterRoleBinding").values()
        if any(s["name"] == "gpuledger-pods" for s in b["subjects"])
    ]
    assert bound, "no ClusterRoleBinding for the gpuledger-pods ServiceAccount"
    rules = [r for b in bound for r in by_kind(docs, "ClusterRole")[b["roleRef"]["name"]]["rules"]]
    for resource in ("pods", "namespaces", "nodes"):  # nodes: their providerID and capacity
        verbs = {v for r in rules if resource in r["resources"] for v in r["verbs"]}
        assert {"list", "watch"} <= verbs <= {"get", "list", "watch"}, resource


def test_commands_parse_with_the_real_cli_and_settings_are_read(
    rendered: list[dict[str, Any]],
) -> None:
    config = by_kind(rendered, "ConfigMap")["gpuledger-config"]["data"]
    for key in config:
        assert read_by_code(key), f"{key} in gpuledger-config is read by no code"
    for w in workloads(rendered):
        for c in containers(w):
            env = dict(config)
            env.update({e["name"]: e.get("value", "node-1") for e in c.get("env", [])})
            for key in env:
                if key.startswith("GPULEDGER_") and key not in CLICKHOUSE_PASSWORD_KEYS:
                    assert read_by_code(key), f"{key} is read by no code"
            args = build_parser(env).parse_args(c["args"])
            assert getattr(args, "handler", None) is not None, c["args"]
            port = next(p["containerPort"] for p in c["ports"] if p["name"] == "metrics")
            assert (
                port == {"agent": 9109, "worker": 9108, "pods": 9110, "tokens": 9111}[c["args"][0]]
            )


@PASSWORD_NOT_READ
def test_the_worker_reads_its_clickhouse_password_from_the_secret_file(
    rendered: list[dict[str, Any]],
) -> None:
    worker = by_kind(rendered, "Deployment")["gpuledger-worker"]["spec"]["template"]["spec"]
    (c,) = worker["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    path = Path(env["GPULEDGER_CLICKHOUSE_PASSWORD_FILE"])
    mount = next(m for m in c["volumeMounts"] if m["name"] == "clickhouse-credentials")
    assert path.parent == Path(mount["mountPath"]) and path.name == "password"
    assert read_by_code("GPULEDGER_CLICKHOUSE_PASSWORD_FILE")


def test_price_book_configmap_is_the_shipped_example(rendered: list[dict[str, Any]]) -> None:
    data = by_kind(rendered, "ConfigMap")["gpuledger-price-book"]["data"]
    example = REPO / "schemas" / "price_book.example.yaml"
    assert data["price_book.yaml"] == example.read_text()
    assert parse_price_book(data["price_book.yaml"]) == load_price_book(example)
    config = by_kind(rendered, "ConfigMap")["gpuledger-config"]["data"]
    worker = by_kind(rendered, "Deployment")["gpuledger-worker"]["spec"]["template"]["spec"]
    mount = next(m for m in worker["containers"][0]["volumeMounts"] if m["name"] == "price-book")
    assert Path(config["GPULEDGER_PRICE_BOOK"]) == Path(mount["mountPath"]) / "price_book.yaml"


def test_budgets_configmap_is_the_shipped_example_and_the_worker_reads_it(
    rendered: list[dict[str, Any]],
) -> None:
    data = by_kind(rendered, "ConfigMap")["gpuledger-budgets"]["data"]
    example = REPO / "schemas" / "budgets.example.yaml"
    assert data["budgets.yaml"] == example.read_text()
    assert parse_budgets(data["budgets.yaml"]).budgets == load_budgets(example).budgets
    worker = by_kind(rendered, "Deployment")["gpuledger-worker"]["spec"]["template"]["spec"]
    (c,) = worker["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    mount = next(m for m in c["volumeMounts"] if m["name"] == "budgets")
    assert Path(env["GPULEDGER_BUDGETS"]) == Path(mount["mountPath"]) / "budgets.yaml"
    assert build_parser(env).parse_args(["worker"]).budgets == env["GPULEDGER_BUDGETS"]


def test_the_worker_exposes_metrics_and_health_but_never_costs(
    rendered: list[dict[str, Any]],
) -> None:
    """Prometheus and the probes reach /metrics and /healthz on the pod's address; the worker
    writes to a ClickHouse server, so it serves no reports, and would keep them on loopback (or
    off, as here) even with an embedded store."""
    from urllib.parse import urlsplit

    from streams.worker.http import reads_listener
    from streams.worker_cli import read_settings_from

    config = by_kind(rendered, "ConfigMap")["gpuledger-config"]["data"]
    deployment = by_kind(rendered, "Deployment")["gpuledger-worker"]
    (c,) = containers(deployment)
    env = {**config, **{e["name"]: e.get("value", "") for e in c.get("env", [])}}
    args = build_parser(env).parse_args(c["args"])
    assert args.http_host == "0.0.0.0" and args.metrics_port == 9108
    assert urlsplit(args.clickhouse).scheme in ("http", "https")
    reads = read_settings_from(args)
    assert reads_listener(False, args.http_host, reads) is None  # what runs: a server's worker
    assert reads_listener(True, args.http_host, reads) is None  # reads are off besides
    assert [p["containerPort"] for p in c["ports"]] == [9108]
    probes = [c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]]
    assert probes == ["/healthz", "/healthz"]
    service = by_kind(rendered, "Service")["gpuledger-worker"]
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(9108, "metrics")]


def test_the_config_shows_tls_to_kafka_and_clickhouse(
    rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The commented TLS lines of base/config.yaml, switched on, are settings every part
    reads: SASL_SSL to Kafka with the CA from the mounted gpuledger-kafka Secret, and HTTPS to
    ClickHouse (a port clickhouse-connect speaks TLS on) with the CA from gpuledger-clickhouse."""
    import re
    from urllib.parse import parse_qs, urlsplit

    import clickhouse_connect

    from runtime.kafka import kafka_settings_from

    text = (K8S / "base" / "config.yaml").read_text()
    tls = dict(re.findall(r"^  # (GPULEDGER_[A-Z_]+): (\S+)$", text, re.M))
    assert tls["GPULEDGER_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    config = {**by_kind(rendered, "ConfigMap")["gpuledger-config"]["data"], **tls}
    password = tmp_path / "sasl-password"
    password.write_text("secret")
    for w in workloads(rendered):
        (c,) = containers(w)
        env = {**config, **{e["name"]: e.get("value", "node-1") for e in c.get("env", [])}}
        env["GPULEDGER_KAFKA_SASL_PASSWORD_FILE"] = str(password)
        kafka = kafka_settings_from(build_parser(env).parse_args(c["args"]))
        assert kafka.security_protocol == "SASL_SSL" and kafka.sasl_mechanism == "SCRAM-SHA-512"
        assert kafka.bootstrap.endswith(":9093") and kafka.sasl_password == "secret"
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert kafka.ssl_cafile == f"{mounts['kafka-credentials']}/ca.crt", w["metadata"]["name"]

    worker = by_kind(rendered, "Deployment")["gpuledger-worker"]
    (c,) = containers(worker)
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    dsn = urlsplit(tls["GPULEDGER_CLICKHOUSE_DSN"])
    assert dsn.scheme == "https" and dsn.port == 8443
    assert parse_qs(dsn.query)["ca_cert"] == [f"{mounts['clickhouse-credentials']}/ca.crt"]
    # the store speaks TLS for an https:// DSN (tests/integration/test_store.py checks it on a
    # port of its own); aimed at a closed local port it fails as an HTTPS connection.
    local = dsn._replace(netloc="gpuledger@127.0.0.1:8443", query="").geturl()
    with pytest.raises(Exception, match="HTTPSConnectionPool"):
        clickhouse_connect.get_client(dsn=local, connect_timeout=1, query_retries=0)


def test_the_agents_namespace_gets_the_same_settings(rendered: list[dict[str, Any]]) -> None:
    configs = {
        d["metadata"]["namespace"]: d["data"]
        for d in rendered
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "gpuledger-config"
    }
    assert set(configs) == {"gpuledger", AGENT_NAMESPACE}
    assert configs[AGENT_NAMESPACE] == configs["gpuledger"]
    agent = by_kind(rendered, "DaemonSet")["gpuledger-agent"]
    assert agent["metadata"]["namespace"] == AGENT_NAMESPACE

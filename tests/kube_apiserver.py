"""A real Kubernetes API server (kube-apiserver + etcd, no kubelet, no controllers) for tests.

The binaries come from `.ci/build-kubernetes` (built from the Go module proxy into .cache/).
Each `KubeApiServer` runs etcd and kube-apiserver on free 127.0.0.1 ports with their own
temporary directory: a static admin token (group system:masters), a service account signing
key (so the TokenRequest API issues real ServiceAccount tokens), RBAC authorization, an audit
log of pod creations, and the default admission plugins (PodSecurity, ServiceAccount,
ValidatingAdmissionPolicy ...). `stop()` removes everything again.

`KubeApi` is a small synchronous client for the tests: requests as any token, server-side
apply of manifests (resources found by discovery), TokenRequest, the audit log.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from processes import stop_process

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / ".ci" / "build-kubernetes"
ADMIN_USER = "gpuledger-test-admin"
FIELD_MANAGER = "gpuledger-tests"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"

_LOG_TAIL_LINES = 60
_START_ATTEMPTS = 3

# Audit only what the tests read: pod creations, with the admission annotations (Metadata).
_AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {
            "level": "Metadata",
            "verbs": ["create"],
            "resources": [{"group": "", "resources": ["pods"]}],
        },
        {"level": "None"},
    ],
}


class KubeApiServerError(RuntimeError):
    """etcd or kube-apiserver could not be started or reached; the message holds the log tails."""


def build_binaries() -> Path:
    """Build kube-apiserver and etcd with `.ci/build-kubernetes` unless already built."""
    subprocess.run([str(BUILD_SCRIPT)], check=True)
    return default_bin_dir()


def default_bin_dir() -> Path:
    result = subprocess.run(
        [str(BUILD_SCRIPT), "--print-bin"], check=True, capture_output=True, text=True
    )
    return Path(result.stdout.strip())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:]) or f"({path} is empty)"


@dataclass
class Response:
    status: int
    body: Any
    warnings: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        return str(self.body.get("message", "")) if isinstance(self.body, dict) else ""


class KubeRequestError(AssertionError):
    def __init__(self, what: str, response: Response) -> None:
        super().__init__(f"{what}: HTTP {response.status}: {response.body}")
        self.response = response


class KubeApi:
    """Synchronous HTTPS requests to the API server, as `token` (the admin's by default)."""

    def __init__(self, server: str, ca_file: Path, token: str) -> None:
        self.server = server
        self.token = token
        self._ssl = ssl.create_default_context(cafile=str(ca_file))
        self._resources: dict[tuple[str, str], tuple[str, bool]] = {}

    def as_token(self, token: str) -> KubeApi:
        other = KubeApi.__new__(KubeApi)
        other.server, other.token, other._ssl = self.server, token, self._ssl
        other._resources = self._resources
        return other

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        timeout_s: float = 30.0,
    ) -> Response:
        url = self.server + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, context=self._ssl, timeout=timeout_s) as answer:
                status, raw, headers = answer.status, answer.read(), answer.headers
        except urllib.error.HTTPError as error:
            status, raw, headers = error.code, error.read(), error.headers
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return Response(status, parsed, headers.get_all("Warning") or [])

    def ok(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        response = self.request(method, path, body, **kwargs)
        if not 200 <= response.status < 300:
            raise KubeRequestError(f"{method} {path}", response)
        return response.body

    def get(self, path: str, **params: str) -> Any:
        return self.ok("GET", path, params=params)

    # --- resources -----------------------------------------------------------------------------

    def _resource(self, api_version: str, kind: str) -> tuple[str, bool]:
        """(plural, namespaced) of a kind, from the API server's discovery."""
        key = (api_version, kind)
        if key not in self._resources:
            base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
            for resource in self.get(base)["resources"]:
                if "/" not in resource["name"]:
                    self._resources[(api_version, resource["kind"])] = (
                        resource["name"],
                        bool(resource["namespaced"]),
                    )
        if key not in self._resources:
            raise KeyError(f"the API server serves no {kind} in {api_version}")
        return self._resources[key]

    def path_of(self, doc: Mapping[str, Any], namespace: str | None = None) -> str:
        """The URL path of the object `doc` describes (its collection if it has no name)."""
        api_version, kind = str(doc["apiVersion"]), str(doc["kind"])
        plural, namespaced = self._resource(api_version, kind)
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        metadata = doc.get("metadata") or {}
        if namespaced:
            ns = namespace or metadata.get("namespace") or "default"
            base += f"/namespaces/{ns}"
        path = f"{base}/{plural}"
        return f"{path}/{metadata['name']}" if metadata.get("name") else path

    def apply(self, docs: Iterable[Mapping[str, Any]], *, dry_run: bool = False) -> list[Any]:
        """Server-side apply, namespaces first (as `kubectl apply --server-side`)."""
        ordered = sorted(docs, key=lambda d: d["kind"] != "Namespace")
        params = {"fieldManager": FIELD_MANAGER, "force": "true"}
        if dry_run:
            params["dryRun"] = "All"
        return [
            self.ok(
                "PATCH",
                self.path_of(doc),
                doc,
                params=params,
                content_type="application/apply-patch+yaml",
            )
            for doc in ordered
        ]

    def create(self, doc: Mapping[str, Any], *, dry_run: bool = False) -> Response:
        """POST `doc` to its collection; the Response, whatever its status."""
        collection = self.path_of({**doc, "metadata": {**doc["metadata"], "name": None}})
        params = {"dryRun": "All"} if dry_run else None
        return self.request("POST", collection, doc, params=params)

    def delete(self, doc: Mapping[str, Any]) -> Response:
        return self.request("DELETE", self.path_of(doc), {"gracePeriodSeconds": 0})

    def create_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        """A namespace and its `default` ServiceAccount (there is no controller manager here)."""
        self.apply(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": name, "labels": dict(labels or {})},
                },
                {
                    "apiVersion": "v1",
                    "kind": "ServiceAccount",
                    "metadata": {"name": "default", "namespace": name},
                },
            ]
        )

    def service_account_token(self, namespace: str, name: str, expiration_s: int = 3600) -> str:
        """A bound token of the ServiceAccount, from the TokenRequest API (what a kubelet
        mounts into the pod)."""
        answer = self.ok(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": expiration_s},
            },
        )
        return str(answer["status"]["token"])

    def can_i(self, verb: str, resource: str, namespace: str = "", group: str = "") -> bool:
        """SelfSubjectAccessReview as this client's token."""
        review = self.ok(
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectAccessReview",
                "spec": {
                    "resourceAttributes": {
                        "verb": verb,
                        "resource": resource,
                        "group": group,
                        "namespace": namespace,
                    }
                },
            },
        )
        return bool(review["status"].get("allowed"))


class KubeApiServer:
    """etcd + kube-apiserver on 127.0.0.1, owned by this object.

    Use `start()`/`stop()` or `with KubeApiServer(bin_dir) as server:`; `server.kubeconfig` is
    an admin kubeconfig file, `server.api` a `KubeApi` as the admin.
    """

    def __init__(
        self,
        bin_dir: Path,
        *,
        start_timeout_s: float = 90.0,
        stop_timeout_s: float = 20.0,
        extra_args: Iterable[str] = (),
    ) -> None:
        self.bin_dir = bin_dir
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.extra_args = list(extra_args)
        self.admin_token = secrets.token_hex(24)
        self.work_dir: Path | None = None
        self.etcd_port = self.etcd_peer_port = self.port = 0
        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._api: KubeApi | None = None

    # --- where things are ----------------------------------------------------------------------

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _work_dir(self) -> Path:
        if self.work_dir is None:
            raise KubeApiServerError("no working directory; call start() first")
        return self.work_dir

    @property
    def ca_file(self) -> Path:
        """The self-signed serving certificate and its CA (kube-apiserver writes both)."""
        return self._work_dir() / "certs" / "apiserver.crt"

    @property
    def kubeconfig(self) -> Path:
        return self._work_dir() / "admin.kubeconfig"

    @property
    def audit_log(self) -> Path:
        return self._work_dir() / "audit.log"

    @property
    def apiserver_log(self) -> Path:
        return self._work_dir() / "kube-apiserver.log"

    @property
    def etcd_log(self) -> Path:
        return self._work_dir() / "etcd.log"

    @property
    def api(self) -> KubeApi:
        if self._api is None:
            raise KubeApiServerError("the API server is not running")
        return self._api

    def write_kubeconfig(self, path: Path, token: str, user: str = "user") -> Path:
        """A kubeconfig for this server that authenticates with `token`."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
            "current-context": "test",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def audit_events(self) -> Iterator[dict[str, Any]]:
        """The audit log so far (pod creations, ResponseComplete and Panic stages)."""
        if not self.audit_log.exists():
            return
        for line in self.audit_log.read_text().splitlines():
            if line.strip():
                yield json.loads(line)

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._apiserver is not None:
            raise KubeApiServerError("already started")
        for name in ("etcd", "kube-apiserver"):
            if not os.access(self.bin_dir / name, os.X_OK):
                raise KubeApiServerError(f"no {name} in {self.bin_dir}; run .ci/build-kubernetes")
        # A free port can be taken by another process between our probe and the server's bind.
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                self._start_once()
                return
            except KubeApiServerError as error:
                if attempt == _START_ATTEMPTS or "address already in use" not in str(error):
                    raise

    def _start_once(self) -> None:
        self.work_dir = Path(tempfile.mkdtemp(prefix="gpuledger-kube-"))
        try:
            ports: set[int] = set()
            while len(ports) < 3:
                ports.add(_free_port())
            self.etcd_port, self.etcd_peer_port, self.port = sorted(ports)
            self._write_files()
            self._start_etcd()
            self._start_apiserver()
        except BaseException:
            self.stop()
            raise

    def restart_apiserver(self) -> None:
        """Stop kube-apiserver and start it again on the same port and etcd (an upgrade, say):
        watches break, and their resourceVersions are older than the new watch cache."""
        stop_process(self._apiserver, self.stop_timeout_s)
        self._apiserver = None
        self._start_apiserver()

    def compact_etcd(self) -> int:
        """Compact etcd up to its current revision (kube-apiserver does this every 5 minutes):
        older resourceVersions are gone for good. Returns the revision."""

        def post(path: str, body: dict[str, Any]) -> Any:
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.etcd_port}{path}",
                data=json.dumps(body).encode(),
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10) as answer:
                return json.loads(answer.read())

        revision = int(post("/v3/kv/range", {"key": "AA==", "limit": 1})["header"]["revision"])
        post("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    def stop(self) -> None:
        apiserver, self._apiserver = self._apiserver, None
        etcd, self._etcd = self._etcd, None
        self._api = None
        try:
            stop_process(apiserver, self.stop_timeout_s)
            stop_process(etcd, self.stop_timeout_s)
        finally:
            if self.work_dir is not None:
                shutil.rmtree(self.work_dir, ignore_errors=True)
                self.work_dir = None

    def __enter__(self) -> KubeApiServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _write_files(self) -> None:
        work = self._work_dir()
        (work / "certs").mkdir()
        subprocess.run(
            ["openssl", "genrsa", "-out", str(work / "sa.key"), "2048"],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                "openssl",
                "rsa",
                "-in",
                str(work / "sa.key"),
                "-pubout",
                "-out",
                str(work / "sa.pub"),
            ],
            check=True,
            capture_output=True,
        )
        # token,user,uid,"group1,group2"
        (work / "tokens.csv").write_text(f'{self.admin_token},{ADMIN_USER},1,"system:masters"\n')
        (work / "audit-policy.yaml").write_text(yaml.safe_dump(_AUDIT_POLICY))

    def _start_etcd(self) -> None:
        work = self._work_dir()
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        with self.etcd_log.open("ab") as log:
            self._etcd = subprocess.Popen(
                [
                    str(self.bin_dir / "etcd"),
                    "--name=test",
                    f"--data-dir={work / 'etcd'}",
                    f"--listen-client-urls={client}",
                    f"--advertise-client-urls={client}",
                    f"--listen-peer-urls={peer}",
                    f"--initial-advertise-peer-urls={peer}",
                    f"--initial-cluster=test={peer}",
                    "--unsafe-no-fsync",  # a throwaway store: no need to wait for the disk
                    "--log-level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=work,
                start_new_session=True,
            )
        self._wait("etcd", f"{client}/health", lambda: self._etcd, ssl_context=None)

    def _start_apiserver(self) -> None:
        work = self._work_dir()
        args = [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--cert-dir={work / 'certs'}",
            f"--token-auth-file={work / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={work / 'sa.pub'}",
            f"--service-account-signing-key-file={work / 'sa.key'}",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=true",
            f"--audit-policy-file={work / 'audit-policy.yaml'}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--profiling=false",
            "--enable-priority-and-fairness=false",
            *self.extra_args,
        ]
        with self.apiserver_log.open("ab") as log:
            self._apiserver = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=work,
                start_new_session=True,
            )
        # The serving certificate is written at start; wait for it before trusting it.
        deadline = time.monotonic() + self.start_timeout_s
        while not self.ca_file.exists():
            self._check_alive("kube-apiserver", self._apiserver)
            if time.monotonic() > deadline:
                self._fail(f"kube-apiserver wrote no {self.ca_file}")
            time.sleep(0.1)
        context = ssl.create_default_context(cafile=str(self.ca_file))
        self._wait("kube-apiserver", f"{self.server}/readyz", lambda: self._apiserver, context)
        self._api = KubeApi(self.server, self.ca_file, self.admin_token)
        self.write_kubeconfig(self.kubeconfig, self.admin_token, ADMIN_USER)

    def _check_alive(self, name: str, process: subprocess.Popen[bytes] | None) -> None:
        if process is None:
            self._fail(f"{name} is not running")
        code = process.poll()
        if code is not None:
            self._fail(f"{name} exited with code {code} during startup")

    def _wait(
        self,
        name: str,
        url: str,
        process: Any,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            self._check_alive(name, process())
            request = urllib.request.Request(url)
            request.add_header("Authorization", f"Bearer {self.admin_token}")
            try:
                with urllib.request.urlopen(request, context=ssl_context, timeout=5) as answer:
                    if answer.status == 200:
                        return
                    last_error = f"HTTP {answer.status}"
            except urllib.error.HTTPError as error:
                last_error = f"HTTP {error.code}: {error.read()[:300]!r}"
            except (OSError, ssl.SSLError) as error:
                last_error = repr(error)
            time.sleep(0.25)
        self._fail(f"{name} not ready after {self.start_timeout_s:.0f} s ({last_error})")

    def _fail(self, reason: str) -> None:
        raise KubeApiServerError(
            f"{reason}\n--- {self.etcd_log} ---\n{_tail(self.etcd_log)}"
            f"\n--- {self.apiserver_log} ---\n{_tail(self.apiserver_log)}"
        )


def render(*docs_or_yaml: str | Mapping[str, Any]) -> list[dict[str, Any]]:
    """YAML text (multi-document) or mappings, as a flat list of objects."""
    out: list[dict[str, Any]] = []
    for item in docs_or_yaml:
        if isinstance(item, str):
            out.extend(d for d in yaml.safe_load_all(item) if d)
        else:
            out.append(dict(item))
    return out

"""A small Kubernetes API client over aiohttp: list (with pagination) and watch, authenticated
in-cluster by the pod's service account or by a kubeconfig file (token or client certificate;
exec credential plugins are not supported).
"""

from __future__ import annotations

import argparse
import base64
import json
import ssl
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from runtime.errors import ConfigError, KubeApiError
from runtime.options import add_env_option

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
IN_CLUSTER_SERVER = "https://kubernetes.default.svc"


@dataclass(frozen=True, slots=True)
class KubeSettings:
    server: str
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None  # re-read on every request: bound tokens rotate
    ca_file: str | None = None
    ca_data: str | None = field(default=None, repr=False)
    client_cert_file: str | None = None
    client_key_file: str | None = None
    insecure_skip_tls_verify: bool = False


def in_cluster_settings(sa_dir: str = SERVICE_ACCOUNT_DIR) -> KubeSettings:
    token = Path(sa_dir) / "token"
    if not token.exists():
        raise ConfigError(
            f"no service account token at {token}: not in a cluster? pass --kubeconfig"
        )
    ca = Path(sa_dir) / "ca.crt"
    return KubeSettings(
        server=IN_CLUSTER_SERVER,
        token_file=str(token),
        ca_file=str(ca) if ca.exists() else None,
    )


def kubeconfig_settings(path: str, context: str | None = None) -> KubeSettings:
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read kubeconfig {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"kubeconfig {path} is not a mapping")

    def named(section: str, name: str) -> dict[str, Any]:
        for item in doc.get(section) or []:
            if item.get("name") == name:
                return dict(item.get(section[:-1]) or {})
        raise ConfigError(f"kubeconfig {path}: no {section[:-1]} named {name!r}")

    context_name = context or doc.get("current-context")
    if not context_name:
        raise ConfigError(f"kubeconfig {path} has no current-context")
    ctx = named("contexts", context_name)
    cluster = named("clusters", ctx.get("cluster", ""))
    user = named("users", ctx["user"]) if ctx.get("user") else {}
    if "exec" in user or "auth-provider" in user:
        raise ConfigError("kubeconfig users with exec or auth-provider plugins are not supported")
    base = Path(path).parent

    def file_or_data(file_key: str, data_key: str, source: Mapping[str, Any]) -> str | None:
        if source.get(data_key):
            # ssl wants key material in files: write it to a private (0600) temporary file.
            with tempfile.NamedTemporaryFile("wb", delete=False, prefix="gpuledger-kube-") as tmp:
                tmp.write(base64.b64decode(source[data_key]))
            return tmp.name
        if source.get(file_key):
            return str(base / str(source[file_key]))
        return None

    return KubeSettings(
        server=str(cluster.get("server", "")).rstrip("/"),
        token=user.get("token"),
        token_file=str(base / user["tokenFile"]) if user.get("tokenFile") else None,
        ca_file=str(base / cluster["certificate-authority"])
        if cluster.get("certificate-authority")
        else None,
        ca_data=base64.b64decode(cluster["certificate-authority-data"]).decode()
        if cluster.get("certificate-authority-data")
        else None,
        client_cert_file=file_or_data("client-certificate", "client-certificate-data", user),
        client_key_file=file_or_data("client-key", "client-key-data", user),
        insecure_skip_tls_verify=bool(cluster.get("insecure-skip-tls-verify", False)),
    )


class KubeClient:
    """Owns one aiohttp session; `start()` before use, `close()` after."""

    def __init__(self, settings: KubeSettings, *, request_timeout_s: float = 30.0) -> None:
        self.settings = settings
        self.request_timeout_s = request_timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        ssl_context: ssl.SSLContext | bool = False
        if self.settings.server.startswith("https"):
            if self.settings.insecure_skip_tls_verify:
                ssl_context = ssl.create_default_context()
                ssl_context.check_hostname = False
                ssl_context.verify_mode = ssl.CERT_NONE
            else:
                ssl_context = ssl.create_default_context(
                    cafile=self.settings.ca_file, cadata=self.settings.ca_data
                )
            if self.settings.client_cert_file:
                ssl_context.load_cert_chain(
                    self.settings.client_cert_file, self.settings.client_key_file
                )
        connector = aiohttp.TCPConnector(ssl=ssl_context if ssl_context else False)
        self._session = aiohttp.ClientSession(connector=connector)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self.settings.token
        if self.settings.token_file:
            try:
                token = Path(self.settings.token_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise KubeApiError(f"cannot read the API token: {exc}") from exc
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _session_or_fail(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("KubeClient.start() was not called")
        return self._session

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        session = self._session_or_fail()
        url = self.settings.server + path
        try:
            async with session.get(
                url,
                params=dict(params or {}),
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=self.request_timeout_s),
            ) as response:
                body = await response.read()
                if response.status != 200:
                    raise KubeApiError(
                        f"GET {path}: HTTP {response.status}: {body[:300]!r}",
                        status=response.status,
                    )
                doc = json.loads(body)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise KubeApiError(f"GET {path}: {exc!r}") from exc
        if not isinstance(doc, dict):
            raise KubeApiError(f"GET {path}: not a JSON object")
        return doc

    async def list_all(
        self, path: str, params: Mapping[str, str] | None = None, page_size: int = 500
    ) -> tuple[list[dict[str, Any]], str]:
        """Every item of a collection (following `continue`) and the list's resourceVersion."""
        items: list[dict[str, Any]] = []
        query = {**(params or {}), "limit": str(page_size)}
        while True:
            doc = await self.get(path, query)
            items.extend(doc.get("items") or [])
            meta = doc.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return items, str(meta.get("resourceVersion", ""))
            query = {**query, "continue": token}

    async def watch(
        self,
        path: str,
        resource_version: str,
        params: Mapping[str, str] | None = None,
        timeout_s: int = 300,
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch events (`{"type": ..., "object": ...}`) from `resource_version` until the server
        ends the watch. HTTP 410 raises KubeApiError(status=410); an ERROR event is yielded."""
        session = self._session_or_fail()
        query = {
            **(params or {}),
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_s),
        }
        try:
            async with session.get(
                self.settings.server + path,
                params=query,
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=timeout_s + 30, sock_read=timeout_s + 30),
            ) as response:
                if response.status != 200:
                    body = await response.read()
                    raise KubeApiError(
                        f"WATCH {path}: HTTP {response.status}: {body[:300]!r}",
                        status=response.status,
                    )
                pending = b""
                # Split by hand: a pod object can exceed aiohttp's line-length limit.
                async for chunk in response.content.iter_any():
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        if line.strip():
                            event = json.loads(line)
                            if isinstance(event, dict):
                                yield event
                if pending.strip():
                    event = json.loads(pending)
                    if isinstance(event, dict):
                        yield event
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise KubeApiError(f"WATCH {path}: {exc!r}") from exc


def add_kube_options(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    add_env_option(
        parser,
        env,
        "--kubeconfig",
        env="GPULEDGER_KUBECONFIG",
        metavar="FILE",
        help="kubeconfig file (default: the in-cluster service account)",
    )
    add_env_option(
        parser,
        env,
        "--kube-context",
        env="GPULEDGER_KUBE_CONTEXT",
        metavar="CONTEXT",
        help="kubeconfig context (default: its current-context)",
    )


def kube_settings_from(args: Any) -> KubeSettings:
    if args.kubeconfig:
        return kubeconfig_settings(args.kubeconfig, args.kube_context)
    return in_cluster_settings()

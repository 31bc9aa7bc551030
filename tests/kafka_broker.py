"""A real single-node Apache Kafka broker (KRaft, broker+controller) for integration tests.

The jars come from `.ci/fetch-kafka`; each `KafkaBroker` formats its own temporary log directory,
listens on two free 127.0.0.1 ports and is removed again by `stop()`.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

from processes import stop_process

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_VERSION = (REPO_ROOT / ".ci" / "kafka-version").read_text().strip()
DEFAULT_LIBS_DIR = REPO_ROOT / ".cache" / "kafka" / KAFKA_VERSION / "libs"
LOG4J2_CONFIG = REPO_ROOT / ".ci" / "kafka-log4j2.properties"
FETCH_SCRIPT = REPO_ROOT / ".ci" / "fetch-kafka"

_NODE_ID = 1
_LOG_TAIL_LINES = 60
_START_ATTEMPTS = 3

# Test settings on top of the KRaft combined-mode essentials. Retention is unlimited because
# tests produce records with old event timestamps, which time-based retention would delete.
_TEST_SETTINGS: dict[str, str] = {
    "num.partitions": "1",
    "default.replication.factor": "1",
    "auto.create.topics.enable": "true",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "min.insync.replicas": "1",
    "group.initial.rebalance.delay.ms": "0",
    "log.retention.ms": "-1",
    "log.retention.bytes": "-1",
    # Compaction tests should not wait the default 15 s between cleaner passes, and the
    # default 128 MiB dedupe buffer is a quarter of the heap we give the broker.
    "log.cleaner.backoff.ms": "500",
    "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
}

_JVM_OPTIONS = (
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-Djava.awt.headless=true",
)


class KafkaBrokerError(RuntimeError):
    """The broker could not be formatted, started or reached; the message holds its log tail."""


def fetch_kafka_libs() -> Path:
    """Download the broker jars with `.ci/fetch-kafka` unless they are already cached."""
    subprocess.run([str(FETCH_SCRIPT)], check=True)
    return DEFAULT_LIBS_DIR


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _random_cluster_id() -> str:
    # Same shape as `kafka-storage random-uuid`: URL-safe base64 of 16 bytes, unpadded, and
    # never starting with "-" so that it cannot be mistaken for a command-line flag.
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:]) or f"({path} is empty)"


def _metadata_broker_count(host: str, port: int, timeout_s: float) -> int:
    """Send a Metadata v4 request for no topics and return how many brokers the answer lists.

    A KRaft broker lists itself only once it has caught up with the controller and been
    unfenced, so a count of at least one means clients can produce and consume.
    """
    client_id = b"gpuledger-test-harness"
    correlation_id = 1
    request = struct.pack(">hhih", 3, 4, correlation_id, len(client_id)) + client_id
    request += struct.pack(">i?", 0, False)  # topics: empty array, allow_auto_topic_creation
    with socket.create_connection((host, port), timeout=timeout_s) as conn:
        conn.sendall(struct.pack(">i", len(request)) + request)
        size = struct.unpack(">i", _recv_exact(conn, 4))[0]
        response = _recv_exact(conn, size)
    answered_id, _throttle_ms, broker_count = struct.unpack(">iii", response[:12])
    if answered_id != correlation_id:
        raise KafkaBrokerError(f"metadata answer for correlation id {answered_id}")
    return int(broker_count)


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = conn.recv(remaining)
        if not chunk:
            raise ConnectionError("broker closed the connection")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class KafkaBroker:
    """One KRaft broker+controller process on 127.0.0.1, owned by this object.

    Use `start()`/`stop()` or `with KafkaBroker() as broker:`; `broker.bootstrap` is the
    "127.0.0.1:PORT" address for clients.
    """

    def __init__(
        self,
        libs_dir: Path = DEFAULT_LIBS_DIR,
        *,
        start_timeout_s: float = 60.0,
        stop_timeout_s: float = 30.0,
        extra_settings: dict[str, str] | None = None,
        java: str | None = None,
    ) -> None:
        self.libs_dir = libs_dir
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.extra_settings = dict(extra_settings or {})
        java_home = os.environ.get("JAVA_HOME")
        self.java = java or (str(Path(java_home) / "bin" / "java") if java_home else "java")
        self.broker_port = 0
        self.controller_port = 0
        self.work_dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        if self._process is None:
            raise KafkaBrokerError("broker is not running")
        return f"127.0.0.1:{self.broker_port}"

    @property
    def process_log(self) -> Path:
        """The broker's stdout and stderr."""
        return self._work_dir() / "process.log"

    @property
    def server_log(self) -> Path:
        """The log4j2 WARN-level log (see .ci/kafka-log4j2.properties)."""
        return self._work_dir() / "logs" / "server.log"

    def start(self) -> None:
        if self._process is not None:
            raise KafkaBrokerError("broker already started")
        if not (self.libs_dir / f"kafka_2.13-{KAFKA_VERSION}.jar").exists():
            raise KafkaBrokerError(f"no Kafka jars in {self.libs_dir}; run .ci/fetch-kafka")
        # A free port can be taken by another process between our probe and the broker's bind.
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                self._start_once()
                return
            except KafkaBrokerError as error:
                if attempt == _START_ATTEMPTS or "Address already in use" not in str(error):
                    raise

    def _start_once(self) -> None:
        self.work_dir = Path(tempfile.mkdtemp(prefix="gpuledger-kafka-"))
        try:
            self.broker_port = _free_port()
            self.controller_port = _free_port()
            while self.controller_port == self.broker_port:
                self.controller_port = _free_port()
            config = self._write_config()
            self._format(config)
            self._launch(config)
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        process, self._process = self._process, None
        try:
            stop_process(process, self.stop_timeout_s)
        finally:
            if self.work_dir is not None:
                shutil.rmtree(self.work_dir, ignore_errors=True)
                self.work_dir = None

    def __enter__(self) -> KafkaBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _work_dir(self) -> Path:
        if self.work_dir is None:
            raise KafkaBrokerError("broker has no working directory; call start() first")
        return self.work_dir

    def _write_config(self) -> Path:
        work_dir = self._work_dir()
        settings = {
            "process.roles": "broker,controller",
            "node.id": str(_NODE_ID),
            "controller.quorum.voters": f"{_NODE_ID}@127.0.0.1:{self.controller_port}",
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.broker_port},"
                f"CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.broker_port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(work_dir / "data"),
            **_TEST_SETTINGS,
            **self.extra_settings,
        }
        config = work_dir / "server.properties"
        config.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
        (work_dir / "logs").mkdir()
        return config

    def _java_command(self, main_class: str, *args: str) -> list[str]:
        return [
            self.java,
            *_JVM_OPTIONS,
            f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
            f"-Dkafka.logs.dir={self._work_dir() / 'logs'}",
            "-cp",
            f"{self.libs_dir}/*",
            main_class,
            *args,
        ]

    def _format(self, config: Path) -> None:
        # Static voters (controller.quorum.voters) need no --standalone flag.
        command = self._java_command(
            "kafka.tools.StorageTool", "format", "-t", _random_cluster_id(), "-c", str(config)
        )
        result = subprocess.run(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120, check=False
        )
        if result.returncode != 0:
            output = result.stdout.decode(errors="replace")
            raise KafkaBrokerError(f"kafka-storage format failed ({result.returncode}):\n{output}")

    def _launch(self, config: Path) -> None:
        with self.process_log.open("wb") as log:
            self._process = subprocess.Popen(
                self._java_command("kafka.Kafka", str(config)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._work_dir(),
            )

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout_s
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            exit_code = self._process.poll()
            if exit_code is not None:
                self._fail(f"broker exited with code {exit_code} during startup")
            try:
                if _metadata_broker_count("127.0.0.1", self.broker_port, timeout_s=2.0) >= 1:
                    return
                last_error = "metadata lists no brokers yet"
            except (OSError, struct.error) as error:
                last_error = repr(error)
            time.sleep(0.25)
        self._fail(f"broker not ready after {self.start_timeout_s:.0f} s ({last_error})")

    def _fail(self, reason: str) -> None:
        raise KafkaBrokerError(
            f"{reason}\n--- {self.process_log} ---\n{_tail(self.process_log)}"
            f"\n--- {self.server_log} ---\n{_tail(self.server_log)}"
        )

"""Every error gpuledger raises, in one tree.

    GpuledgerError
    ├── ConfigError            bad flags, environment or files given at start-up
    │   └── PriceBookError     the price book YAML is unreadable or invalid (names the line)
    ├── StoreError             ClickHouse refused or could not be reached (retriable flag set)
    │   └── StoreLockedError   an embedded chDB folder is held by another process
    ├── BrokerError            Kafka refused or could not be reached (retriable flag set)
    ├── KubeApiError           the Kubernetes API refused or could not be reached (HTTP status)
    └── DeviceError            NVML failed in a way the agent cannot absorb (retriable flag set)

Bad *input records* are not errors: they are data (`schemas.events.Rejected`) and go to the
dead-letter topic. Vendor exceptions (pynvml, aiokafka, clickhouse-connect) are converted into
this tree where they enter gpuledger.
"""

from __future__ import annotations


class GpuledgerError(Exception):
    """Base of every gpuledger error."""

    retriable: bool = False


class ConfigError(GpuledgerError):
    """Configuration given at start-up is unusable."""


class PriceBookError(ConfigError):
    """The price book file is unreadable or invalid."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"{where}{message}")
        self.path = path
        self.line = line


class StoreError(GpuledgerError):
    """ClickHouse refused a statement or could not be reached."""

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


class StoreLockedError(StoreError):
    """An embedded chDB data folder is already opened by another process."""


class BrokerError(GpuledgerError):
    """Kafka refused a request or could not be reached."""

    def __init__(self, message: str, *, retriable: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable


class DeviceError(GpuledgerError):
    """NVML failed in a way the agent cannot absorb on its own."""

    def __init__(self, message: str, *, retriable: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable


class KubeApiError(GpuledgerError):
    """The Kubernetes API refused a request or could not be reached; `status` is the HTTP status
    (410: the resource version is too old, list again), 0 when there was no answer."""

    def __init__(self, message: str, *, status: int = 0, retriable: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.retriable = retriable

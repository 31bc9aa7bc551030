"""The worker's read options: --reports-host, --reports-port, --report-timeout-s and
--report-concurrency, with their GPULEDGER_* variables, into `ReadSettings`."""

from __future__ import annotations

import pytest

from gpuledger.cli import build_parser
from runtime.errors import GpuledgerError
from streams.worker.http import ReadSettings, is_loopback
from streams.worker_cli import read_settings_from


def test_the_defaults_are_the_read_settings_defaults() -> None:
    args = build_parser({}).parse_args(["worker"])
    assert read_settings_from(args) == ReadSettings()
    assert ReadSettings() == ReadSettings("127.0.0.1", 9112, 30.0, 2)


def test_variables_and_flags_set_them() -> None:
    env = {
        "GPULEDGER_REPORTS_HOST": "10.0.0.5",
        "GPULEDGER_REPORTS_PORT": "9300",
        "GPULEDGER_REPORT_TIMEOUT_S": "5",
        "GPULEDGER_REPORT_CONCURRENCY": "4",
    }
    args = build_parser(env).parse_args(["worker", "--report-concurrency", "1"])
    assert read_settings_from(args) == ReadSettings("10.0.0.5", 9300, 5.0, 1)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--report-timeout-s", "0"),
        ("--report-concurrency", "0"),
        ("--reports-port", "70000"),
    ],
)
def test_bad_values_are_refused_naming_the_flag(flag: str, value: str) -> None:
    args = build_parser({}).parse_args(["worker", flag, value])
    with pytest.raises(GpuledgerError, match=flag):
        read_settings_from(args)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("worker.example", False),
    ],
)
def test_only_loopback_addresses_share_the_metrics_listener_with_reads(
    host: str, loopback: bool
) -> None:
    assert is_loopback(host) is loopback

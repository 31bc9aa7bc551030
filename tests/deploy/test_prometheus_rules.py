"""Prometheus alert rules: `promtool check` on the rules and the compose scrape config, and
`promtool test rules` on the unit tests, which must fail when a rule is broken."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_tools import REPO, require

from runtime.horizon import LATE_HORIZON_S

PROM = REPO / "deploy" / "prometheus"
RULES = PROM / "rules" / "gpuledger-alerts.yml"
TESTS = PROM / "tests" / "gpuledger-alerts.test.yml"
# The worker's and agent's metric names (streams/metrics.py, agents): every rule uses only these.
KNOWN_METRICS = {
    "gpuledger_events_total",
    "gpuledger_events_rejected_total",
    "gpuledger_events_duplicate_total",
    "gpuledger_events_late_total",
    "gpuledger_dead_letters_total",
    "gpuledger_window_emit_lag_seconds",
    "gpuledger_consumer_lag_messages",
    "gpuledger_sink_batch_seconds",
    "gpuledger_sink_failures_total",
    "gpuledger_idle_burn_usd_per_hour",
    "gpuledger_untagged_cost_usd_per_hour",
    "gpuledger_cost_usd_per_hour",
    "gpuledger_unknown_gpu_model_samples_total",
    "gpuledger_clock_offset_seconds",
    "gpuledger_clock_skew_events_total",
    "gpuledger_agent_last_sample_timestamp_seconds",
    "gpuledger_agent_samples_total",
    "gpuledger_agent_buffer_oldest_age_seconds",
    "gpuledger_budget_usd",
    "gpuledger_budget_threshold_usd",
    "gpuledger_budget_month_to_date_usd",
    "gpuledger_budget_refresh_failures_total",
    "gpuledger_forecast_usd",
}
REQUIRED_ALERTS = {
    "GpuledgerIdleGpuBurnHigh",
    "GpuledgerUntaggedCostShareHigh",
    "GpuledgerAgentSilent",
    "GpuledgerConsumerLagGrowing",
    "GpuledgerDeadLetters",
    "GpuledgerEventsTooLate",
    "GpuledgerAgentBufferNearLateHorizon",
    "GpuledgerClockSkew",
    "GpuledgerBudgetForecastOverrun",
    "GpuledgerBudgetExceeded",
    "GpuledgerBudgetRefreshFailing",
}


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    tool = require("promtool", "apt-get install prometheus")
    return subprocess.run(
        [tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def _rules() -> list[dict[str, object]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_rules_and_config_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_every_required_alert_exists_and_uses_known_metrics() -> None:
    rules = _rules()
    names = {str(r["alert"]) for r in rules}
    assert names >= REQUIRED_ALERTS
    for rule in rules:
        metrics = set(re.findall(r"\bgpuledger_\w+", str(rule["expr"])))
        assert metrics, rule["alert"]
        assert metrics <= KNOWN_METRICS, f"{rule['alert']}: unknown {metrics - KNOWN_METRICS}"
        assert rule["labels"]["severity"] in ("warning", "critical")  # type: ignore[index]
        assert {"summary", "description"} <= set(rule["annotations"])  # type: ignore[arg-type]
    idle = next(r for r in rules if r["alert"] == "GpuledgerIdleGpuBurnHigh")
    assert idle["for"] == "15m"


def worker_metric_names() -> set[str]:
    """Every metric name the worker declares (streams/metrics.py), as a rule writes it."""
    from prometheus_client import CollectorRegistry

    from streams.metrics import WorkerMetrics

    registry = CollectorRegistry()
    WorkerMetrics(registry)
    return {
        family.name + ("_total" if family.type == "counter" else "")
        for family in registry.collect()
    }


def test_the_worker_declares_every_worker_metric_the_rules_use() -> None:
    declared = worker_metric_names()
    used = {name for rule in _rules() for name in re.findall(r"\bgpuledger_\w+", str(rule["expr"]))}
    worker = {name for name in used if not name.startswith("gpuledger_agent_")}
    assert worker <= declared, worker - declared
    assert {
        n for n in KNOWN_METRICS if n.startswith(("gpuledger_budget", "gpuledger_forecast"))
    } <= (declared)


def test_budget_alerts_name_owner_and_amounts() -> None:
    rules = {str(r["alert"]): r for r in _rules()}
    for name in ("GpuledgerBudgetForecastOverrun", "GpuledgerBudgetExceeded"):
        text = str(rules[name]["annotations"])
        assert "$labels.owner" in text and "$labels.dimension" in text and "$value" in text
        assert "gpuledger_budget_usd" in text  # the budget's amount, by query
        assert rules[name]["for"]
    # Before the money is spent: the overrun is silent once the month to date is past it.
    assert "unless on (dimension, owner)" in str(rules["GpuledgerBudgetForecastOverrun"]["expr"])


def test_too_late_alerts_speak_of_the_workers_late_horizon() -> None:
    rules = {str(r["alert"]): r for r in _rules()}
    near = re.search(r">\s*(\d+)\s*$", str(rules["GpuledgerAgentBufferNearLateHorizon"]["expr"]))
    assert near is not None
    assert 0 < int(near.group(1)) < LATE_HORIZON_S
    horizon = (
        f"late horizon ({LATE_HORIZON_S // 3600} h by default, worker option --late-horizon-s)"
    )
    for name in (
        "GpuledgerAgentBufferNearLateHorizon",
        "GpuledgerEventsTooLate",
        "GpuledgerClockSkew",
    ):
        annotations = rules[name]["annotations"]
        description = " ".join(str(annotations["description"]).split())  # type: ignore[index]
        assert horizon in description, name
        assert "retention" not in description, name


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    doc = yaml.safe_load(TESTS.read_text())
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {str(r["alert"]) for r in _rules()}
    assert fired == names, f"no firing case for {names - fired}"
    assert quiet == names, f"no silent case for {names - quiet}"


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    ("alert", "old", "new"),
    [
        ("GpuledgerIdleGpuBurnHigh", "> 10", "> 12"),
        ("GpuledgerUntaggedCostShareHigh", "> 0.10", "> 0.25"),
        ("GpuledgerAgentSilent", "> 300", "> 900"),
        ("GpuledgerConsumerLagGrowing", "> 0\n", ">= 0\n"),
        ("GpuledgerDeadLetters", "[10m]", "[1m]"),
        ("GpuledgerDeadLetters", '{reason!="too_late"}', ""),
        ("GpuledgerEventsTooLate", '{reason="too_late"}', ""),
        ("GpuledgerEventsTooLate", "[10m]", "[1m]"),
        ("GpuledgerAgentBufferNearLateHorizon", "> 10800", "> 14400"),
        ("GpuledgerAgentBufferNearLateHorizon", "> 10800", "> 3600"),
        ("GpuledgerAgentBufferNearLateHorizon", "for: 5m", "for: 15m"),
        ("GpuledgerSinkFailing", "for: 5m", "for: 30m"),
        ("GpuledgerClockSkew", "> 60", "> 7200"),
        (
            "GpuledgerClockSkew",
            "(abs(gpuledger_clock_offset_seconds))",
            "(gpuledger_clock_offset_seconds)",
        ),
        ("GpuledgerBudgetForecastOverrun", "for: 30m", "for: 10m"),
        ("GpuledgerBudgetForecastOverrun", "<= on (dimension, owner)", "< on (dimension, owner)"),
        (
            "GpuledgerBudgetForecastOverrun",
            "unless on (dimension, owner)",
            "or on (dimension, owner)",
        ),
        (
            "GpuledgerBudgetForecastOverrun",
            "gpuledger_budget_threshold_usd <=",
            "gpuledger_budget_usd <=",
        ),
        ("GpuledgerBudgetExceeded", "for: 10m", "for: 20m"),
        ("GpuledgerBudgetExceeded", "usd > on", "usd >= on"),
        ("GpuledgerBudgetRefreshFailing", "for: 15m", "for: 1m"),
    ],
)
def test_unit_tests_catch_a_broken_rule(tmp_path: Path, alert: str, old: str, new: str) -> None:
    text = RULES.read_text()
    start = text.index(f"- alert: {alert}")
    end = text.find("- alert:", start + 1)
    end = len(text) if end < 0 else end
    block = text[start:end]
    assert old in block, f"{old!r} not in {alert}"
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "rules" / RULES.name).write_text(
        text[:start] + block.replace(old, new, 1) + text[end:]
    )
    shutil.copy(TESTS, tmp_path / "tests" / TESTS.name)
    result = promtool("test", "rules", str(tmp_path / "tests" / TESTS.name), cwd=tmp_path)
    assert result.returncode != 0, f"the unit tests still pass with {alert} changed"
    assert alert in result.stdout + result.stderr

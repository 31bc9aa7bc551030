"""`GPULEDGER_*` variables: each declared once, as the fallback of one flag (runtime/options.py),
shown as `[env: NAME]` in --help, and converted only by the command that uses it."""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from agents import agent_cli
from gpuledger.cli import build_parser, main
from runtime.errors import ConfigError, StoreError
from runtime.kafka import kafka_settings_from
from runtime.options import (
    EnvOption,
    EnvSecret,
    add_env_flag,
    add_env_option,
    add_env_secret,
    declared_variables,
    gpuledger_env,
    parse_bool,
)
from streams.store import clickhouse_password

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("agents", "streams", "runtime", "gpuledger", "schemas")
ENTRY_POINTS = {"gpuledger/cli.py", "agents/agent_cli.py"}  # the only readers of os.environ
NAME = re.compile(r"GPULEDGER_[A-Z0-9_]*[A-Z0-9]")

# What deploy/, docker-compose.yml and the docs set: renaming one breaks a deployment.
EXPECTED = {
    "GPULEDGER_AGENT_INTERVAL": "--interval",
    "GPULEDGER_AGENT_METRICS_PORT": "--metrics-port",
    "GPULEDGER_BILLING_ACCOUNT": "--billing-account",
    "GPULEDGER_BILLING_ACCOUNT_NAME": "--billing-account-name",
    "GPULEDGER_BUDGETS": "--budgets",
    "GPULEDGER_BUDGET_INTERVAL": "--budget-interval",
    "GPULEDGER_BUFFER_MAX_EVENTS": "--buffer-max-events",
    "GPULEDGER_CLICKHOUSE_DSN": "--clickhouse",
    "GPULEDGER_CLICKHOUSE_PASSWORD": "",
    "GPULEDGER_CLICKHOUSE_PASSWORD_FILE": "--clickhouse-password-file",
    "GPULEDGER_CLUSTER": "--cluster",
    "GPULEDGER_COST_CENTER_LABEL": "--cost-center-label",
    "GPULEDGER_CURRENCY": "--currency",
    "GPULEDGER_DEMO_DATA": "--data",
    "GPULEDGER_DEMO_MINUTES": "--minutes",
    "GPULEDGER_DEMO_PORT": "--port",
    "GPULEDGER_DEMO_REPORT": "--report",
    "GPULEDGER_DEMO_SPEED": "--speed",
    "GPULEDGER_GRACE_S": "--grace-s",
    "GPULEDGER_GROUP_ID": "--group-id",
    "GPULEDGER_HOST_PROVIDER": "--host-provider",
    "GPULEDGER_SERVICE_PROVIDER": "--service-provider",
    "GPULEDGER_HTTP_HOST": "--http-host",
    "GPULEDGER_IDLE_FLUSH_S": "--idle-flush-s",
    "GPULEDGER_IDLE_POLICY": "--idle-policy",
    "GPULEDGER_KAFKA_BOOTSTRAP": "--kafka",
    "GPULEDGER_KAFKA_IDEMPOTENT": "--kafka-idempotent",
    "GPULEDGER_KAFKA_SASL_MECHANISM": "--kafka-sasl-mechanism",
    "GPULEDGER_KAFKA_SASL_PASSWORD": "",
    "GPULEDGER_KAFKA_SASL_PASSWORD_FILE": "--kafka-sasl-password-file",
    "GPULEDGER_KAFKA_SASL_USERNAME": "--kafka-sasl-username",
    "GPULEDGER_KAFKA_SECURITY_PROTOCOL": "--kafka-security-protocol",
    "GPULEDGER_KAFKA_SSL_CAFILE": "--kafka-ssl-cafile",
    "GPULEDGER_KUBECONFIG": "--kubeconfig",
    "GPULEDGER_KUBE_CONTEXT": "--kube-context",
    "GPULEDGER_LOG_LEVEL": "--log-level",
    "GPULEDGER_METRICS_HOST": "--metrics-host",
    "GPULEDGER_METRICS_PORT": "--metrics-port",
    "GPULEDGER_NODE_LABELS": "--node-label",
    "GPULEDGER_NODE_NAME": "--node",
    "GPULEDGER_PARTITIONS": "--partitions",
    "GPULEDGER_PLATFORM_TEAM": "--platform-team",
    "GPULEDGER_PODS_INTERVAL": "--interval",
    "GPULEDGER_PODS_METRICS_PORT": "--metrics-port",
    "GPULEDGER_PODS_NODES": "--nodes",
    "GPULEDGER_PRICE_BOOK": "--price-book",
    "GPULEDGER_PROC_ROOT": "--proc-root",
    "GPULEDGER_PRODUCT_LABEL": "--product-label",
    "GPULEDGER_REPORTS_HOST": "--reports-host",
    "GPULEDGER_REPORTS_PORT": "--reports-port",
    "GPULEDGER_REPORT_CONCURRENCY": "--report-concurrency",
    "GPULEDGER_REPORT_TIMEOUT_S": "--report-timeout-s",
    "GPULEDGER_RETENTION_S": "--retention-s",
    "GPULEDGER_LATE_HORIZON_S": "--late-horizon-s",
    "GPULEDGER_MAX_PODS": "--max-pods",
    "GPULEDGER_DEAD_LETTER_MAX_KEYS": "--dead-letter-max-keys",
    "GPULEDGER_MAX_METRIC_SERIES": "--max-metric-series",
    "GPULEDGER_MAX_CLOCK_SKEW_S": "--max-clock-skew-s",
    "GPULEDGER_UNHEALTHY_AFTER_FAILURES": "--unhealthy-after-failures",
    "GPULEDGER_SHARE_POLICY": "--share-policy",
    "GPULEDGER_NON_GPU_RULE": "--non-gpu-rule",
    "GPULEDGER_GPU_WEIGHTS": "--gpu-weights",
    "GPULEDGER_GPU_INSTANCE_TYPES": "--gpu-instance-type",
    "GPULEDGER_SM_WEIGHT": "--sm-weight",
    "GPULEDGER_TEAM_LABEL": "--team-label",
    "GPULEDGER_TOKENS_INTERVAL": "--interval",
    "GPULEDGER_TOKENS_METRICS_PORT": "--metrics-port",
    "GPULEDGER_TOPIC_PARTITIONS": "--topic-partitions",
    "GPULEDGER_WINDOW_S": "--window-s",
}


def leaves(parser: argparse.ArgumentParser) -> Iterator[tuple[list[str], argparse.ArgumentParser]]:
    """(argv to reach it, parser) of every runnable subcommand."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield [], parser
    for sub in subs:
        for name, child in sub.choices.items():
            for argv, leaf in leaves(child):
                yield [name, *argv], leaf


COMMANDS = [argv for argv, _ in leaves(build_parser({}))]


def env_options(parser: argparse.ArgumentParser) -> list[EnvOption]:
    return [a for a in parser._actions if isinstance(a, EnvOption)]


def parse(argv: list[str], env: Mapping[str, str]) -> argparse.Namespace:
    return build_parser(env).parse_args(argv)


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_every_command_is_found() -> None:
    assert ["worker"] in COMMANDS and ["agent"] in COMMANDS and ["report", "html"] in COMMANDS
    assert ["export", "chargeback"] in COMMANDS and ["export", "invoice"] in COMMANDS
    assert ["bill", "import"] in COMMANDS and ["bill", "trueup"] in COMMANDS
    assert ["report", "variance"] in COMMANDS
    assert ["plan"] in COMMANDS
    assert ["report", "forecast"] in COMMANDS
    assert ["report", "budget"] in COMMANDS
    assert ["report", "requests"] in COMMANDS
    assert len(COMMANDS) == 19


def test_the_declared_variables_are_the_contract() -> None:
    declared = declared_variables(build_parser({}))
    assert set(declared) == set(EXPECTED)
    for name, flag in EXPECTED.items():
        assert all(where.endswith(f" {flag}") for where in declared[name] if flag), name


def test_a_bad_worker_variable_leaves_other_commands_alone(
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {"GPULEDGER_WINDOW_S": "abc"}
    args = parse(["agent", "--fake-nvml", "--dry-run"], env)
    config = agent_cli.agent_config_from(args)
    assert config.run.interval_s == 1.0 and config.fake_scenario == "demo"
    for argv in (["pods", "--dry-run"], ["tokens", "--target", "ns/p=http://x:1"]):
        parse(argv, env)
    with pytest.raises(SystemExit) as exit_:
        parse(["worker"], env)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == "gpuledger worker: error: GPULEDGER_WINDOW_S='abc': invalid int value\n"
    with pytest.raises(SystemExit) as exit_:
        parse(["demo"], env)  # the demo allocates as well
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("gpuledger demo: error: GPULEDGER_WINDOW_S=")


def test_main_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GPULEDGER_SM_WEIGHT", "half")
    with pytest.raises(SystemExit) as exit_:
        main(["worker"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == "gpuledger worker: error: GPULEDGER_SM_WEIGHT='half': invalid float value\n"


def _all_bad() -> dict[str, str]:
    return {name: "not-a-value" for name in EXPECTED}


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_help_works_whatever_the_variables_say(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse([*argv, "--help"], _all_bad())
    assert exit_.value.code == 0
    out = one_line(capsys.readouterr().out)
    _, parser = next((a, p) for a, p in leaves(build_parser({})) if a == argv)
    for action in env_options(parser):
        assert f"[env: {action.env}]" in out, (argv, action.env)
        assert f"(env {action.env}" not in out  # the old wording is gone


def test_top_level_help_works_whatever_the_variables_say() -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(["--help"], _all_bad())
    assert exit_.value.code == 0


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["worker"], {"GPULEDGER_WINDOW_S", "GPULEDGER_KAFKA_BOOTSTRAP", "GPULEDGER_LOG_LEVEL"}),
        (["worker"], {"GPULEDGER_BUDGETS", "GPULEDGER_BUDGET_INTERVAL"}),
        (["report", "budget"], {"GPULEDGER_BUDGETS", "GPULEDGER_CLICKHOUSE_DSN"}),
        (["report", "requests"], {"GPULEDGER_CLICKHOUSE_DSN"}),
        (["agent"], {"GPULEDGER_AGENT_INTERVAL", "GPULEDGER_NODE_LABELS", "GPULEDGER_NODE_NAME"}),
        (["pods"], {"GPULEDGER_PODS_METRICS_PORT", "GPULEDGER_KUBECONFIG"}),
        (["tokens"], {"GPULEDGER_TOKENS_INTERVAL", "GPULEDGER_NODE_NAME"}),
        (["demo"], {"GPULEDGER_DEMO_MINUTES", "GPULEDGER_PRICE_BOOK"}),
        (["report", "showback"], {"GPULEDGER_CLICKHOUSE_DSN"}),
        (["export", "chargeback"], {"GPULEDGER_CURRENCY", "GPULEDGER_SHARE_POLICY"}),
        (["export", "invoice"], {"GPULEDGER_PRICE_BOOK", "GPULEDGER_TEAM_LABEL"}),
    ],
)
def test_each_command_shows_its_variables(
    argv: list[str], names: set[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse([*argv, "--help"], {})
    out = one_line(capsys.readouterr().out)
    for name in names:
        assert f"[env: {name}]" in out
    if argv == ["agent"]:
        assert "GPULEDGER_WINDOW_S" not in out  # the agent does not declare what it never uses


def test_variables_are_defaults_and_flags_beat_them() -> None:
    env = {"GPULEDGER_WINDOW_S": "30", "GPULEDGER_SHARE_POLICY": "memory"}
    args = parse(["worker"], env)
    assert (args.window_s, args.share_policy, args.grace_s) == (30, "memory", 10.0)
    args = parse(["worker", "--window-s", "90", "--share-policy", "sm"], env)
    assert (args.window_s, args.share_policy) == (90, "sm")
    args = parse(["worker", "--window-s", "90"], {"GPULEDGER_WINDOW_S": "abc"})
    assert args.window_s == 90  # a flag spares a bad variable


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        (["--budget-interval", "0"], "gpuledger worker: --budget-interval must be positive\n"),
        (["--budgets", "{bad}"], "gpuledger worker: {bad}:2: unknown dimension or key 'model': "),
    ],
)
def test_a_bad_budgets_option_stops_the_worker_with_one_line(
    extra: list[str], line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from streams.worker_cli import run_worker

    bad = tmp_path / "budgets.yaml"
    bad.write_text("budgets:\n  - {model: x, monthly_usd: 1}\n")
    args = parse(["worker", *(a.format(bad=bad) for a in extra)], {})
    assert run_worker(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(line.format(bad=bad)) and err.count("\n") == 1


def test_an_empty_variable_counts_as_unset() -> None:
    args = parse(["worker"], {"GPULEDGER_WINDOW_S": "", "GPULEDGER_KAFKA_IDEMPOTENT": " "})
    assert args.window_s == 60 and args.kafka_idempotent is False


def test_choices_apply_to_variables(capsys: pytest.CaptureFixture[str]) -> None:
    env = {"GPULEDGER_SHARE_POLICY": "biggest", "GPULEDGER_KAFKA_SECURITY_PROTOCOL": "sasl_ssl"}
    assert parse(["agent", "--fake-nvml"], env).kafka_security_protocol == "SASL_SSL"
    with pytest.raises(SystemExit):
        parse(["export", "chargeback", "--period", "2026-01"], env)
    err = capsys.readouterr().err
    assert err.startswith("gpuledger export chargeback: error: GPULEDGER_SHARE_POLICY='biggest':")
    assert "invalid choice" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("true", True), ("Yes", True), ("0", False), ("false", False), ("NO", False)],
)
def test_boolean_variables(text: str, value: bool) -> None:
    assert parse_bool(text) is value
    args = parse(["pods", "--dry-run"], {"GPULEDGER_KAFKA_IDEMPOTENT": text})
    assert args.kafka_idempotent is value
    assert (
        parse(
            ["pods", "--no-kafka-idempotent"], {"GPULEDGER_KAFKA_IDEMPOTENT": text}
        ).kafka_idempotent
        is False
    )
    assert (
        parse(["pods", "--kafka-idempotent"], {"GPULEDGER_KAFKA_IDEMPOTENT": text}).kafka_idempotent
        is True
    )


def test_a_bad_boolean_names_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(["agent"], {"GPULEDGER_KAFKA_IDEMPOTENT": "maybe"})
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(
        "gpuledger agent: error: GPULEDGER_KAFKA_IDEMPOTENT='maybe': invalid boolean value"
    )


def test_node_labels_from_the_variable_or_the_flags() -> None:
    env = {"GPULEDGER_NODE_LABELS": "a=1, b=2,"}
    assert parse(["agent"], env).node_label == ["a=1", "b=2"]
    argv = ["agent", "--node-label", "c=3", "--node-label", "d=4"]
    assert parse(argv, env).node_label == ["c=3", "d=4"]  # flags replace the variable's list
    assert parse(["agent"], {}).node_label is None


def test_without_exit_on_error_the_caller_gets_the_error() -> None:
    parser = argparse.ArgumentParser(prog="p", exit_on_error=False)
    add_env_option(parser, {"GPULEDGER_N": "x"}, "--n", env="GPULEDGER_N", type=int, default=1)
    with pytest.raises(argparse.ArgumentError, match=r"GPULEDGER_N='x': invalid int value"):
        parser.parse_args([])
    assert parser.parse_args(["--n", "4"]).n == 4


def test_declarations_are_checked() -> None:
    parser = argparse.ArgumentParser()
    with pytest.raises(ValueError):
        add_env_option(parser, {}, "--x", env="OTHER_X")
    with pytest.raises(ValueError):
        add_env_option(parser, {}, "--y", env="GPULEDGER_Y", secret=True, help="%(default)s")
    with pytest.raises(ValueError):
        add_env_flag(parser, {}, "-z", env="GPULEDGER_Z")
    with pytest.raises(ValueError):
        add_env_secret(parser, {}, env="SECRET", dest="secret")


def test_gpuledger_env_keeps_only_gpuledger_variables() -> None:
    assert gpuledger_env({"GPULEDGER_A": "1", "HOME": "/root", "XGPULEDGER_B": "2"}) == {
        "GPULEDGER_A": "1"
    }


SECRETS = {
    "GPULEDGER_KAFKA_SASL_PASSWORD": "kafka-pw-1d7f",
    "GPULEDGER_KAFKA_SASL_PASSWORD_FILE": "/run/kafka-pw-file-9c2e",
    "GPULEDGER_CLICKHOUSE_PASSWORD": "ch-pw-4b1a",
    "GPULEDGER_CLICKHOUSE_PASSWORD_FILE": "/run/ch-pw-file-77e0",
}


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_secrets_never_show_in_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse([*argv, "--help"], SECRETS)
    out = capsys.readouterr().out
    for value in SECRETS.values():
        assert value not in out


def test_secrets_are_read_but_not_shown(tmp_path: Path) -> None:
    args = parse(["worker"], {"GPULEDGER_KAFKA_SASL_PASSWORD": "kafka-pw-1d7f"})
    assert isinstance(args.kafka_sasl_password, EnvSecret)
    assert "kafka-pw-1d7f" not in repr(args)
    assert kafka_settings_from(args).sasl_password == "kafka-pw-1d7f"
    secret_file = tmp_path / "password"
    secret_file.write_text("from-the-file\n", encoding="utf-8")
    env = {
        **SECRETS,
        "GPULEDGER_KAFKA_SASL_PASSWORD_FILE": str(secret_file),
        "GPULEDGER_CLICKHOUSE_PASSWORD_FILE": str(secret_file),
    }
    args = parse(["worker"], env)
    assert kafka_settings_from(args).sasl_password == "from-the-file"  # the file wins
    assert clickhouse_password(args) == "from-the-file"
    args = parse(["report", "tags"], {"GPULEDGER_CLICKHOUSE_PASSWORD": "ch-pw-4b1a"})
    assert clickhouse_password(args) == "ch-pw-4b1a"
    assert clickhouse_password(parse(["report", "tags"], {})) is None


def test_an_unreadable_secret_file_is_named_but_not_shown() -> None:
    args = parse(["worker"], SECRETS)
    with pytest.raises(ConfigError) as kafka_error:
        kafka_settings_from(args)
    with pytest.raises(StoreError) as store_error:
        clickhouse_password(args)
    for exc, name in (
        (kafka_error.value, "GPULEDGER_KAFKA_SASL_PASSWORD_FILE"),
        (store_error.value, "GPULEDGER_CLICKHOUSE_PASSWORD_FILE"),
    ):
        assert name in str(exc)
        assert all(value not in str(exc) for value in SECRETS.values())


# --- each name declared once, nowhere read by hand -------------------------------------------


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _is_declaration(node: ast.Constant, parents: dict[int, ast.AST]) -> bool:
    """The whole string is the name, given as `env=` (or `<what>_env=`) to a call, or bound to
    a module-level constant that such a call uses."""
    if not (isinstance(node.value, str) and NAME.fullmatch(node.value)):
        return False
    parent = parents.get(id(node))
    if isinstance(parent, ast.keyword):
        return parent.arg is not None and (parent.arg == "env" or parent.arg.endswith("_env"))
    if isinstance(parent, ast.Assign) and isinstance(parents.get(id(parent)), ast.Module):
        return all(isinstance(t, ast.Name) and t.id.isupper() for t in parent.targets)
    return False


def violations(sources: Mapping[str, str]) -> list[str]:
    """What breaks the rule in `sources` (relative path -> text): a name that appears twice, or
    anywhere but a declaration; a name built at run time; os.environ outside an entry point."""
    seen: dict[str, list[str]] = {}
    problems: list[str] = []
    for path, text in sorted(sources.items()):
        tree = ast.parse(text)
        parents = {
            id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)
        }
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            where = f"{path}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.JoinedStr):
                for part in node.values:
                    if isinstance(part, ast.Constant) and "GPULEDGER_" in str(part.value):
                        problems.append(f"{where}: a GPULEDGER_ name built at run time")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if id(node) in docstrings or isinstance(parents.get(id(node)), ast.JoinedStr):
                    continue
                for name in NAME.findall(node.value):
                    seen.setdefault(name, []).append(where)
                    if not _is_declaration(node, parents):
                        problems.append(f"{where}: {name} outside a declaration")
            elif (
                isinstance(node, ast.Attribute)
                and node.attr in ("environ", "getenv", "environb")
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
                and path not in ENTRY_POINTS
            ):
                problems.append(f"{where}: reads the environment itself")
    problems += [
        f"{name} appears {len(at)} times: {', '.join(at)}"
        for name, at in seen.items()
        if len(at) > 1
    ]
    return problems


def _project_sources() -> dict[str, str]:
    return {
        str(p.relative_to(REPO)): p.read_text(encoding="utf-8")
        for d in SOURCE_DIRS
        for p in sorted((REPO / d).rglob("*.py"))
    }


def test_each_variable_is_declared_once_and_read_nowhere_else() -> None:
    sources = _project_sources()
    assert violations(sources) == []
    named = {name for text in sources.values() for name in NAME.findall(text)}
    declared = declared_variables(build_parser({}))
    # every name in the code is a live declaration (docstrings name only declared ones)
    assert named - set(declared) == set()


def test_the_check_catches_hand_written_reads() -> None:
    """The style this replaced: defaults read by hand, twice, and parsed while building."""
    log_level = 'p.add_argument("--log-level", default=env.get("GPULEDGER_LOG_LEVEL", "INFO"))\n'
    old = {
        "agents/a.py": log_level,
        "streams/b.py": (
            log_level
            + 'p.add_argument("--window-s", default=int(env.get("GPULEDGER_WINDOW_S", "60")))\n'
            + 'x = env.get(f"GPULEDGER_{prefix}_INTERVAL")\n'
            + "import os\ny = os.environ\n"
        ),
    }
    found = "\n".join(violations(old))
    assert "GPULEDGER_LOG_LEVEL appears 2 times" in found
    assert "streams/b.py:2: GPULEDGER_WINDOW_S outside a declaration" in found
    assert "built at run time" in found and "reads the environment itself" in found
    assert violations({"agents/c.py": 'add_env_option(p, env, "--w", env="GPULEDGER_W")\n'}) == []

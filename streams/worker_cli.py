"""`gpuledger worker`: flags (GPULEDGER_* variables as defaults) -> WorkerConfig -> a running
Worker."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from runtime.errors import GpuledgerError
from runtime.horizon import LATE_HORIZON_S, MAX_LATE_HORIZON_S
from runtime.kafka import add_kafka_options, kafka_settings_from
from runtime.options import add_env_option, add_log_level_option
from streams.allocation import IDLE_POLICIES, SHARE_POLICIES, AllocationSettings
from streams.labels import DEFAULT_MAX_PODS, LabelSettings
from streams.metrics import MAX_SERIES
from streams.pricing import EXAMPLE_PRICE_BOOK, load_price_book
from streams.reports.budgets import load_budgets
from streams.store import add_clickhouse_option, store_from_args
from streams.worker.budget_gauges import BUDGET_INTERVAL_S
from streams.worker.device_stage import StreamSettings
from streams.worker.intake import DEAD_LETTER_MAX_KEYS

if TYPE_CHECKING:
    from streams.worker.http import ReadSettings


def add_policy_options(
    parser: argparse.ArgumentParser,
    env: Mapping[str, str],
    *,
    share_help: str = "how a device's cost is split among its pods (default dominant)",
    idle_help: str = "who pays for idle capacity (default platform)",
) -> None:
    """--share-policy and --idle-policy: what the worker allocates with, and what an export
    names its charges after."""
    add_env_option(
        parser,
        env,
        "--share-policy",
        env="GPULEDGER_SHARE_POLICY",
        default="dominant",
        choices=SHARE_POLICIES,
        help=share_help,
    )
    add_env_option(
        parser,
        env,
        "--idle-policy",
        env="GPULEDGER_IDLE_POLICY",
        default="platform",
        choices=IDLE_POLICIES,
        help=idle_help,
    )


def add_price_book_option(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    add_env_option(
        parser,
        env,
        "--price-book",
        env="GPULEDGER_PRICE_BOOK",
        default=str(EXAMPLE_PRICE_BOOK),
        metavar="FILE",
        help="price book YAML (default: the shipped example)",
    )


def add_budgets_option(
    parser: argparse.ArgumentParser, env: Mapping[str, str], *, help: str
) -> None:
    """--budgets FILE: monthly USD per owner and the alert thresholds."""
    add_env_option(
        parser, env, "--budgets", env="GPULEDGER_BUDGETS", default="", metavar="FILE", help=help
    )


def add_label_options(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """--team-label, --product-label, --cost-center-label: the pod labels that name an owner."""
    add_env_option(
        parser,
        env,
        "--team-label",
        env="GPULEDGER_TEAM_LABEL",
        default="team",
        help="pod or namespace label naming the team (default team)",
    )
    add_env_option(
        parser,
        env,
        "--product-label",
        env="GPULEDGER_PRODUCT_LABEL",
        default="product",
        help="pod or namespace label naming the product (default product)",
    )
    add_env_option(
        parser,
        env,
        "--cost-center-label",
        env="GPULEDGER_COST_CENTER_LABEL",
        default="cost-center",
        help="pod or namespace label naming the cost centre (default cost-center)",
    )


def add_allocation_options(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """Options every part that allocates cost shares (worker, demo)."""
    add_price_book_option(parser, env)
    add_policy_options(parser, env)
    add_env_option(
        parser,
        env,
        "--sm-weight",
        env="GPULEDGER_SM_WEIGHT",
        type=float,
        default=0.5,
        help="weight of SM utilisation under --share-policy weighted (default 0.5)",
    )
    add_env_option(
        parser,
        env,
        "--platform-team",
        env="GPULEDGER_PLATFORM_TEAM",
        default="platform",
        help="team that pays for idle capacity under --idle-policy platform (default platform)",
    )
    add_label_options(parser, env)
    add_env_option(
        parser,
        env,
        "--window-s",
        env="GPULEDGER_WINDOW_S",
        type=int,
        default=60,
        help="length of a cost window in seconds (default 60)",
    )
    add_env_option(
        parser,
        env,
        "--grace-s",
        env="GPULEDGER_GRACE_S",
        type=float,
        default=10.0,
        help="seconds a window stays open for late samples after it ends (default 10)",
    )
    add_env_option(
        parser,
        env,
        "--idle-flush-s",
        env="GPULEDGER_IDLE_FLUSH_S",
        type=float,
        default=30.0,
        help="seconds after which a silent input no longer holds windows open (default 30)",
    )
    add_env_option(
        parser,
        env,
        "--retention-s",
        env="GPULEDGER_RETENTION_S",
        type=float,
        default=3600.0,
        help="seconds a closed window stays in memory, for corrections and late pod "
        "metadata (default 3600)",
    )
    add_env_option(
        parser,
        env,
        "--late-horizon-s",
        env="GPULEDGER_LATE_HORIZON_S",
        type=float,
        default=float(LATE_HORIZON_S),
        help="seconds after its end a window still takes samples, restored from its "
        f"checkpoint; older ones are dead-lettered as too_late (default {LATE_HORIZON_S}: "
        "what an agent's default buffer holds; never less than --retention-s)",
    )
    add_env_option(
        parser,
        env,
        "--max-clock-skew-s",
        env="GPULEDGER_MAX_CLOCK_SKEW_S",
        type=float,
        default=300.0,
        help="an event further ahead of the worker's clock than this is dead-lettered as "
        "clock_skew (default 300)",
    )


def stream_settings_from(args: argparse.Namespace) -> StreamSettings:
    try:
        allocation = AllocationSettings(
            share_policy=args.share_policy,
            sm_weight=args.sm_weight,
            idle_policy=args.idle_policy,
            window_s=args.window_s,
            labels=LabelSettings(
                team_key=args.team_label,
                product_key=args.product_label,
                cost_center_key=args.cost_center_label,
                platform_team=args.platform_team,
            ),
        )
    except ValueError as exc:
        raise GpuledgerError(str(exc)) from exc
    if args.max_clock_skew_s <= 0:
        raise GpuledgerError("--max-clock-skew-s must be positive")
    if args.late_horizon_s > MAX_LATE_HORIZON_S:
        raise GpuledgerError(f"--late-horizon-s must be at most {MAX_LATE_HORIZON_S} (7 days)")
    return StreamSettings(
        allocation,
        args.grace_s,
        args.idle_flush_s,
        args.retention_s,
        late_horizon_s=args.late_horizon_s,
        max_clock_skew_s=args.max_clock_skew_s,
    )


class _ReadsDefaults(NamedTuple):
    host: str = "127.0.0.1"
    port: int = 9112
    timeout_s: float = 30.0
    concurrency: int = 2


READS_DEFAULTS = _ReadsDefaults()


def add_reads_options(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """Where an embedded worker serves reports, and their limits (design §6); the defaults
    are `streams.worker.http.ReadSettings`'s (not imported here: it brings aiohttp)."""
    defaults = READS_DEFAULTS
    add_env_option(
        parser,
        env,
        "--reports-host",
        env="GPULEDGER_REPORTS_HOST",
        default=defaults.host,
        help="address of an embedded worker's reports (/report, /export, /) when --http-host "
        f"is not a loopback address (default {defaults.host}); a worker writing to a "
        "ClickHouse server serves none",
    )
    add_env_option(
        parser,
        env,
        "--reports-port",
        env="GPULEDGER_REPORTS_PORT",
        type=int,
        default=defaults.port,
        help=f"port of those reports (default {defaults.port}; 0: none)",
    )
    add_env_option(
        parser,
        env,
        "--report-timeout-s",
        env="GPULEDGER_REPORT_TIMEOUT_S",
        type=float,
        default=defaults.timeout_s,
        help="seconds a report may take; its queries are stopped there and it answers 504 "
        f"(default {defaults.timeout_s:g})",
    )
    add_env_option(
        parser,
        env,
        "--report-concurrency",
        env="GPULEDGER_REPORT_CONCURRENCY",
        type=int,
        default=defaults.concurrency,
        help="reports served at once, each on a read-only connection of its own; more "
        f"answer 429 (default {defaults.concurrency})",
    )


def read_settings_from(args: argparse.Namespace) -> ReadSettings:
    from streams.worker.http import ReadSettings

    if args.report_timeout_s <= 0:
        raise GpuledgerError("--report-timeout-s must be positive")
    if args.report_concurrency < 1:
        raise GpuledgerError("--report-concurrency must be at least 1")
    if not 0 <= args.reports_port <= 65535:
        raise GpuledgerError(f"--reports-port out of range: {args.reports_port}")
    return ReadSettings(
        host=args.reports_host,
        port=args.reports_port,
        timeout_s=args.report_timeout_s,
        concurrency=args.report_concurrency,
    )


def register(sub: Any, env: Mapping[str, str]) -> None:
    parser = sub.add_parser(
        "worker",
        help="consume samples, pods and tokens; write cost windows to ClickHouse and Kafka",
    )
    add_kafka_options(parser, env)
    add_clickhouse_option(parser, env)
    add_allocation_options(parser, env)
    add_env_option(
        parser,
        env,
        "--group-id",
        env="GPULEDGER_GROUP_ID",
        default="gpuledger-worker",
        help="Kafka consumer group (default gpuledger-worker)",
    )
    add_env_option(
        parser,
        env,
        "--partitions",
        env="GPULEDGER_PARTITIONS",
        type=int,
        default=3,
        help="partitions of the topics the worker creates when missing (default 3)",
    )
    add_env_option(
        parser,
        env,
        "--metrics-port",
        env="GPULEDGER_METRICS_PORT",
        type=int,
        default=9108,
        help="port of /metrics and /healthz, and of an embedded worker's reports when "
        "--http-host is a loopback address (default 9108; 0: none)",
    )
    add_env_option(
        parser,
        env,
        "--http-host",
        env="GPULEDGER_HTTP_HOST",
        default="127.0.0.1",
        help="address /metrics and /healthz listen on (default 127.0.0.1); reports are never "
        "served on it unless it is a loopback address",
    )
    add_reads_options(parser, env)
    add_env_option(
        parser,
        env,
        "--unhealthy-after-failures",
        env="GPULEDGER_UNHEALTHY_AFTER_FAILURES",
        type=int,
        default=5,
        help="failed writes of one sink in a row after which /healthz answers 503 (default 5)",
    )
    add_env_option(
        parser,
        env,
        "--max-pods",
        env="GPULEDGER_MAX_PODS",
        type=int,
        default=DEFAULT_MAX_PODS,
        help="pods whose metadata is kept at most, the least recent forgotten first "
        f"(default {DEFAULT_MAX_PODS:,})",
    )
    add_env_option(
        parser,
        env,
        "--dead-letter-max-keys",
        env="GPULEDGER_DEAD_LETTER_MAX_KEYS",
        type=int,
        default=DEAD_LETTER_MAX_KEYS,
        help="dead-lettered inputs remembered at most, so that a replay does not letter them "
        f"twice, the oldest forgotten first (default {DEAD_LETTER_MAX_KEYS:,})",
    )
    add_env_option(
        parser,
        env,
        "--max-metric-series",
        env="GPULEDGER_MAX_METRIC_SERIES",
        type=int,
        default=MAX_SERIES,
        help="series per metric labelled by input values (devices, models, sources) at most, "
        f"the least recently updated removed first (default {MAX_SERIES:,})",
    )
    add_budgets_option(
        parser,
        env,
        help="budgets YAML (schemas/budgets.example.yaml): export each budget, and the "
        "month-end forecast of every owner of its dimensions, as gpuledger_budget_* and "
        "gpuledger_forecast_* gauges (default: none)",
    )
    add_env_option(
        parser,
        env,
        "--budget-interval",
        env="GPULEDGER_BUDGET_INTERVAL",
        type=float,
        default=BUDGET_INTERVAL_S,
        metavar="SECONDS",
        help=f"seconds between refreshes of those gauges (default {BUDGET_INTERVAL_S:g})",
    )
    parser.add_argument("--flush-interval-s", type=float, default=1.0)
    parser.add_argument(
        "--exit-when-idle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="emit everything and exit after this long without input",
    )
    add_log_level_option(parser, env)
    parser.set_defaults(handler=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    from streams.worker.app import Worker, WorkerConfig, tune_garbage_collector

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.unhealthy_after_failures < 1:
            raise GpuledgerError("--unhealthy-after-failures must be at least 1")
        for flag, value, least in (
            ("--max-pods", args.max_pods, 1),
            ("--dead-letter-max-keys", args.dead_letter_max_keys, 1),
            ("--max-metric-series", args.max_metric_series, 2),
        ):
            if value < least:
                raise GpuledgerError(f"{flag} must be at least {least}")
        if args.budget_interval <= 0:
            raise GpuledgerError("--budget-interval must be positive")
        book = load_price_book(args.price_book)
        budgets = load_budgets(args.budgets) if args.budgets else None
        config = WorkerConfig(
            kafka=kafka_settings_from(args),
            clickhouse_dsn=args.clickhouse,
            stream=stream_settings_from(args),
            group_id=args.group_id,
            partitions=args.partitions,
            flush_interval_s=args.flush_interval_s,
            unhealthy_after_failures=args.unhealthy_after_failures,
            http_host=args.http_host,
            http_port=args.metrics_port,
            reads=read_settings_from(args),
            exit_when_idle_s=args.exit_when_idle,
            max_pods=args.max_pods,
            dead_letter_max_keys=args.dead_letter_max_keys,
            max_metric_series=args.max_metric_series,
            budgets=budgets,
            budget_interval_s=args.budget_interval,
        )
        worker = Worker(config, book, store=store_from_args(args))
        tune_garbage_collector()
        return asyncio.run(_serve(worker))
    except GpuledgerError as exc:
        print(f"gpuledger worker: {exc}", file=sys.stderr)
        return 1


async def _serve(worker: Any) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()
    return 0

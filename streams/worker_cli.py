"""`gpuledger worker`: flags and GPULEDGER_* variables -> WorkerConfig -> a running Worker."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Mapping
from typing import Any

from runtime.errors import GpuledgerError
from runtime.kafka import add_kafka_options, kafka_settings_from
from streams.allocation import IDLE_POLICIES, SHARE_POLICIES, AllocationSettings
from streams.labels import LabelSettings
from streams.pricing import EXAMPLE_PRICE_BOOK, load_price_book
from streams.store import add_clickhouse_option, store_from_args
from streams.worker.device_stage import StreamSettings


def add_allocation_options(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """Options every part that allocates cost shares (worker, demo)."""
    parser.add_argument(
        "--price-book",
        default=env.get("GPULEDGER_PRICE_BOOK", str(EXAMPLE_PRICE_BOOK)),
        help="price book YAML (env GPULEDGER_PRICE_BOOK; default: the shipped example)",
    )
    parser.add_argument(
        "--share-policy",
        choices=SHARE_POLICIES,
        default=env.get("GPULEDGER_SHARE_POLICY", "dominant"),
    )
    parser.add_argument(
        "--sm-weight",
        type=float,
        default=float(env.get("GPULEDGER_SM_WEIGHT", "0.5")),
        help="weight of SM utilisation under --share-policy weighted",
    )
    parser.add_argument(
        "--idle-policy", choices=IDLE_POLICIES, default=env.get("GPULEDGER_IDLE_POLICY", "platform")
    )
    parser.add_argument("--platform-team", default=env.get("GPULEDGER_PLATFORM_TEAM", "platform"))
    parser.add_argument("--team-label", default=env.get("GPULEDGER_TEAM_LABEL", "team"))
    parser.add_argument("--product-label", default=env.get("GPULEDGER_PRODUCT_LABEL", "product"))
    parser.add_argument(
        "--cost-center-label", default=env.get("GPULEDGER_COST_CENTER_LABEL", "cost-center")
    )
    parser.add_argument("--window-s", type=int, default=int(env.get("GPULEDGER_WINDOW_S", "60")))
    parser.add_argument("--grace-s", type=float, default=float(env.get("GPULEDGER_GRACE_S", "10")))
    parser.add_argument(
        "--idle-flush-s", type=float, default=float(env.get("GPULEDGER_IDLE_FLUSH_S", "30"))
    )
    parser.add_argument(
        "--retention-s", type=float, default=float(env.get("GPULEDGER_RETENTION_S", "3600"))
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
    return StreamSettings(allocation, args.grace_s, args.idle_flush_s, args.retention_s)


def register(sub: Any, env: Mapping[str, str]) -> None:
    parser = sub.add_parser(
        "worker",
        help="consume samples, pods and tokens; write cost windows to ClickHouse and Kafka",
    )
    add_kafka_options(parser, env)
    add_clickhouse_option(parser, env)
    add_allocation_options(parser, env)
    parser.add_argument("--group-id", default=env.get("GPULEDGER_GROUP_ID", "gpuledger-worker"))
    parser.add_argument(
        "--partitions",
        type=int,
        default=int(env.get("GPULEDGER_PARTITIONS", "3")),
        help="partitions of the topics the worker creates when missing",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(env.get("GPULEDGER_METRICS_PORT", "9108")),
        help="port of /metrics, /healthz and the read endpoints (0: none)",
    )
    parser.add_argument("--http-host", default=env.get("GPULEDGER_HTTP_HOST", "127.0.0.1"))
    parser.add_argument("--flush-interval-s", type=float, default=1.0)
    parser.add_argument(
        "--exit-when-idle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="emit everything and exit after this long without input",
    )
    parser.add_argument("--log-level", default=env.get("GPULEDGER_LOG_LEVEL", "INFO"))
    parser.set_defaults(handler=lambda args: run_worker(args, env))


def run_worker(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from streams.worker.app import Worker, WorkerConfig, tune_garbage_collector

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        book = load_price_book(args.price_book)
        config = WorkerConfig(
            kafka=kafka_settings_from(args, env),
            clickhouse_dsn=args.clickhouse,
            stream=stream_settings_from(args),
            group_id=args.group_id,
            partitions=args.partitions,
            flush_interval_s=args.flush_interval_s,
            http_host=args.http_host,
            http_port=args.metrics_port,
            exit_when_idle_s=args.exit_when_idle,
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

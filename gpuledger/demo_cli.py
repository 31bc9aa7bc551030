"""`gpuledger demo`: the whole pipeline on one machine, no Docker and no GPU. An embedded broker
and embedded ClickHouse, a simulated cluster read by the real agent, pod watcher and token
scraper, and the worker; a showback table and an HTML report at the end. Ctrl-C stops early and
still reports what was collected; a second Ctrl-C quits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from runtime.errors import ConfigError, GpuledgerError
from runtime.options import add_env_option
from streams.pricing import load_price_book
from streams.worker_cli import add_allocation_options, stream_settings_from

if TYPE_CHECKING:
    from gpuledger.demo.pipeline import DemoConfig

DEFAULT_DATA = "gpuledger-demo"
DEFAULT_REPORT = "gpuledger-report.html"
EXIT_ERROR = 1
EXIT_ARGS = 2
EXIT_ABORTED = 130
PIPED_WIDTH = 120  # tables stay on one line when the output is a file or a pipe


def register(sub: Any, env: Mapping[str, str]) -> None:
    parser = sub.add_parser(
        "demo",
        help="run the whole pipeline on a simulated cluster (no Docker, no GPU) and report",
        description=__doc__,
    )
    add_env_option(
        parser,
        env,
        "--minutes",
        env="GPULEDGER_DEMO_MINUTES",
        type=float,
        default=10.0,
        help="simulated minutes of cluster life (default 10)",
    )
    add_env_option(
        parser,
        env,
        "--speed",
        env="GPULEDGER_DEMO_SPEED",
        type=float,
        default=10.0,
        help="simulated seconds per wall-clock second (default 10)",
    )
    add_env_option(
        parser,
        env,
        "--data",
        env="GPULEDGER_DEMO_DATA",
        default=DEFAULT_DATA,
        metavar="DIR",
        help=f"embedded ClickHouse folder, reset on every run (default ./{DEFAULT_DATA})",
    )
    add_env_option(
        parser,
        env,
        "--report",
        env="GPULEDGER_DEMO_REPORT",
        default=DEFAULT_REPORT,
        metavar="FILE",
        help=f"where to write the HTML report (default ./{DEFAULT_REPORT})",
    )
    add_env_option(
        parser,
        env,
        "--port",
        env="GPULEDGER_DEMO_PORT",
        type=int,
        default=9108,
        help="port of the live dashboard on 127.0.0.1 (a free one if taken; default 9108)",
    )
    parser.add_argument(
        "--sample-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="simulated seconds between GPU samples (default 1, as the agent)",
    )
    parser.add_argument(
        "--scrape-interval",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="simulated seconds between token scrapes (default 15, as the scraper)",
    )
    add_allocation_options(parser, env)
    parser.set_defaults(handler=run_demo)


def demo_config_from(args: argparse.Namespace) -> DemoConfig:
    from gpuledger.demo.pipeline import DemoConfig

    if not 0 < args.minutes <= 24 * 60:
        raise ConfigError(f"--minutes must be between 0 and 1440, got {args.minutes:g}")
    if args.speed <= 0:
        raise ConfigError(f"--speed must be positive, got {args.speed:g}")
    if args.sample_interval <= 0 or args.scrape_interval <= 0:
        raise ConfigError("--sample-interval and --scrape-interval must be positive")
    if args.minutes * 60 < args.sample_interval:
        raise ConfigError("--minutes is shorter than one sample interval")
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port out of range: {args.port}")
    stream = stream_settings_from(args)
    if stream.retention_s < args.minutes * 60:
        # Simulated time starts in the past; the whole run must stay within reach.
        stream = replace(stream, retention_s=args.minutes * 60 + 600)
    return DemoConfig(
        minutes=float(args.minutes),
        speed=float(args.speed),
        data_dir=Path(args.data).resolve(),
        report_path=Path(args.report).resolve(),
        price_book=load_price_book(args.price_book),
        stream=stream,
        http_port=int(args.port),
        sample_interval_s=float(args.sample_interval),
        scrape_interval_s=float(args.scrape_interval),
    )


def run_demo(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = PIPED_WIDTH
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        config = demo_config_from(args)
    except GpuledgerError as exc:
        print(f"gpuledger demo: {exc}", file=sys.stderr)
        return EXIT_ARGS
    try:
        return asyncio.run(_run(config, console))
    except ConfigError as exc:
        print(f"gpuledger demo: {exc}", file=sys.stderr)
        return EXIT_ARGS
    except GpuledgerError as exc:
        print(f"gpuledger demo: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("gpuledger demo: stopped without a report", file=sys.stderr)
        return EXIT_ABORTED


async def _run(config: DemoConfig, console: Console) -> int:
    from gpuledger.demo.console import live_progress, print_intro, print_outcome
    from gpuledger.demo.pipeline import DemoRun

    run = DemoRun(config)
    run.prepare()
    interrupted = asyncio.Event()
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    presses = [0]

    def on_signal() -> None:
        presses[0] += 1
        if presses[0] == 1:
            interrupted.set()  # stop simulating; drain and report what was collected
        elif main_task is not None:
            main_task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    print_intro(console, config, run.scenario)
    try:
        async with live_progress(console, run.progress):
            outcome = await run.run(interrupted)
    except asyncio.CancelledError:
        print("gpuledger demo: stopped without a report", file=sys.stderr)
        return EXIT_ABORTED
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    print_outcome(console, outcome)
    return 0

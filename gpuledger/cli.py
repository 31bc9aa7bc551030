"""The `gpuledger` command: one entry point for every deployable part.

The environment is read here and nowhere below: each `GPULEDGER_*` variable is declared once,
as the fallback of one flag (runtime/options.py; `[env: NAME]` in `--help`), and is converted
only when its subcommand is the one parsed, so a bad setting for one part stops that part
alone. Each subcommand builds its frozen configuration from the parsed arguments, and lives in
its own module, which exposes `register(subparsers, env)`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Mapping, Sequence

from runtime.options import gpuledger_env

# (module, the subcommands it registers) in the order `--help` lists them.
COMMAND_MODULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gpuledger.demo_cli", ("demo",)),
    ("streams.worker_cli", ("worker",)),
    ("agents.agent_cli", ("agent",)),
    ("agents.pods_cli", ("pods",)),
    ("agents.tokens_cli", ("tokens",)),
    ("streams.reports_cli", ("report", "export")),
    ("streams.bill_cli", ("bill",)),
    ("streams.plan_cli", ("plan",)),
)


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuledger",
        description="Real-time GPU cost ledger for shared LLM inference clusters.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, commands in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            for command in commands:
                stub = sub.add_parser(command, help=f"{command} (not yet available)")
                stub.set_defaults(handler=_not_yet(command))
            continue
        module.register(sub, env)
    return parser


def _not_yet(command: str):  # type: ignore[no-untyped-def]
    def handler(_: argparse.Namespace) -> int:
        print(f"gpuledger {command}: not yet available in this version", file=sys.stderr)
        return 2

    return handler


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(gpuledger_env(os.environ))
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return int(handler(args))


if __name__ == "__main__":
    sys.exit(main())

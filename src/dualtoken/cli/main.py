"""Entry point of ``dualtoken``. Each command group lives in its own module with a ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import DualTokenError

# modules that add sub-commands; each defines register(subparsers) and sets `func` on its parsers
COMMAND_MODULES = (
    "dualtoken.cli.tokens",  # encode, decode, reconstruct, info, convert-reference, demo
    "dualtoken.cli.train",  # train, encode-dataset
    "dualtoken.cli.evaluate",  # eval
    "dualtoken.cli.serve",  # serve
    "dualtoken.cli.mllm",  # chat, generate, train-mllm
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualtoken", description="DualToken: pixel + semantic image tokens")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DualTokenError as exc:
        print(f"dualtoken {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"dualtoken {args.command}: error: file not found: {exc.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dualtoken {args.command}: interrupted", file=sys.stderr)
        return 130

"""Entry point of ``dualtoken``. Each command group lives in its own module with a ``register(subparsers)``.

The console contract: an error on input is one line and exit code 2; a warning is one line (never a Python
warning with its source line); unreadable images are skipped, each named in one line, and counted at the end
(``--strict``: the first one is an error).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from tqdm import tqdm

from ..data.images import SkippedImageWarning
from ..errors import DualTokenError

# modules that add sub-commands; each defines register(subparsers) and sets `func` on its parsers
COMMAND_MODULES = (
    "dualtoken.cli.tokens",  # encode, decode, reconstruct, info, convert-reference, demo
    "dualtoken.cli.train",  # train, encode-dataset
    "dualtoken.cli.evaluate",  # eval
    "dualtoken.cli.serve",  # serve
    "dualtoken.cli.mllm",  # chat, generate, train-mllm
)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to every option's help, unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        return help_text if "default" in help_text else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's help shows each option's default."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dualtoken", description="DualToken: pixel + semantic image tokens")
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


class _Console:
    """Prints warnings as single lines (between progress-bar updates) and counts the skipped images."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.skipped = 0

    def show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, SkippedImageWarning):
            self.skipped += 1
            tqdm.write(f"skipped {message}", file=sys.stderr)
        else:
            tqdm.write(f"dualtoken {self.command}: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    console = _Console(args.command)
    with warnings.catch_warnings():
        warnings.showwarning = console.show
        warnings.simplefilter("default")
        warnings.simplefilter("error" if getattr(args, "strict", False) else "always", SkippedImageWarning)
        try:
            return int(args.func(args) or 0)
        except SkippedImageWarning as exc:
            print(f"dualtoken {args.command}: error: {exc} (--strict)", file=sys.stderr)
            return 2
        except DualTokenError as exc:
            print(f"dualtoken {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except FileNotFoundError as exc:
            print(f"dualtoken {args.command}: error: file not found: {exc.filename}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"dualtoken {args.command}: interrupted", file=sys.stderr)
            return 130
        finally:
            if console.skipped:
                print(f"dualtoken {args.command}: skipped {console.skipped} unreadable input(s)", file=sys.stderr)

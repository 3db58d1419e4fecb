"""Entry point of ``dualtoken``. Each command group lives in its own module with a ``register(subparsers)``.

The console contract: an error on input is one line and exit code 2; a warning is one line (never a Python
warning with its source line); unreadable images are skipped, each named in one line, and counted at the end
(``--strict``: the first one is an error).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import NoReturn

from tqdm import tqdm

from ..data.images import SkippedImageWarning
from ..errors import DualTokenError
from .options import plural

# modules that add sub-commands; each defines register(subparsers) and sets `func` on its parsers
COMMAND_MODULES = (
    "dualtoken.cli.tokens",  # encode, decode, reconstruct, info, convert-reference, demo
    "dualtoken.cli.train",  # train, finetune
    "dualtoken.cli.evaluate",  # eval
    "dualtoken.cli.serve",  # serve
    "dualtoken.cli.mllm",  # chat, generate, train-mllm
    "dualtoken.cli.export",  # export onnx
)


class _Formatter(argparse.HelpFormatter):
    """One default style: "(default: X)" after an option's help, unless the help already says "(default: ...)".
    Nothing is appended to a required option, a flag, or an option that is unset by default (None, [])."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        unset = action.default is None or action.default == [] or action.default is argparse.SUPPRESS
        flag = action.nargs == 0  # store_true / store_false / help
        if "(default: " in help_text or action.required or unset or flag or not action.option_strings:
            return help_text
        return f"{help_text} (default: {action.default})"


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's help shows each option's default; a command line it cannot parse (a missing argument,
    a count of 0, an unknown choice) is one error line, exit code 2, like every other error."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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

    def error(self, message: str) -> int:
        """The one line of a failed command (the count of skipped inputs folded in), exit code 2."""
        if self.skipped:
            message += f" (skipped {plural(self.skipped, 'unreadable input')})"
        print(f"dualtoken {self.command}: error: {message}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    console = _Console(args.command)
    strict = getattr(args, "strict", False)
    with warnings.catch_warnings():
        warnings.showwarning = console.show
        warnings.simplefilter("default")
        warnings.simplefilter("error" if strict else "always", SkippedImageWarning)
        try:
            code = int(args.func(args) or 0)
        except SkippedImageWarning as exc:
            return console.error(f"{exc}{' (--strict)' if strict else ''}")
        except DualTokenError as exc:
            return console.error(str(exc))
        except FileNotFoundError as exc:
            return console.error(f"file not found: {exc.filename}")
        except BrokenPipeError:  # `dualtoken info --list | head -2`: the reader has gone; not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush goes nowhere
            return 141  # 128 + SIGPIPE, what a shell tool killed by the closed pipe returns
        except KeyboardInterrupt:
            print(f"dualtoken {args.command}: interrupted", file=sys.stderr)
            return 130
    if console.skipped:
        print(f"dualtoken {args.command}: skipped {plural(console.skipped, 'unreadable input')}", file=sys.stderr)
    return code

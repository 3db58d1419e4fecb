"""The shared option types: every integer option of every command is checked once, at parse time."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from dualtoken.cli.main import build_parser, main
from dualtoken.cli.options import COUNT, PORT, ZERO_OR_MORE

# the lowest value each type accepts: one below it is an error
LOWEST = {COUNT: 1, ZERO_OR_MORE: 0, PORT: 1}


def _integer_options() -> list[tuple[str, str, object]]:
    """(command, option, type) of every option of every command that takes a whole number."""
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [
        (name, action.option_strings[-1], action.type)
        for name, command in sorted(subparsers.choices.items())
        for action in command._actions
        if action.type in (int, *LOWEST)
    ]


OPTIONS = _integer_options()


def test_no_option_takes_an_unchecked_int():
    unchecked = [f"{name} {option}" for name, option, kind in OPTIONS if kind is int]
    assert unchecked == []
    # the counts the issue named are among the checked ones
    named = {(name, option) for name, option, _ in OPTIONS}
    assert {("encode", "--batch-size"), ("decode", "--batch-size"), ("reconstruct", "--batch-size"),
            ("encode", "--shard-size"), ("eval", "--limit"), ("eval", "--num-workers"), ("serve", "--port"),
            ("serve", "--threads"), ("generate", "--num"), ("train", "--stop-at")} <= named


@pytest.mark.parametrize(("command", "option", "kind"), OPTIONS, ids=[f"{c} {o}" for c, o, _ in OPTIONS])
@pytest.mark.parametrize("offset", [-1, "word"])
def test_a_bad_count_is_one_error_line_and_exit_2(command, option, kind, offset, capsys):
    bad = str(LOWEST[kind] + offset) if offset != "word" else "many"
    with pytest.raises(SystemExit) as stopped:
        main([command, option, bad])  # checked before anything else, required arguments included
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1, lines
    assert lines[0].startswith(f"dualtoken {command}: error: argument {option}: expected a whole number"), lines[0]
    assert repr(bad) in lines[0] and lines[0].endswith(f"(see dualtoken {command} --help)")


def test_the_lowest_and_highest_values_are_accepted():
    assert (COUNT("1"), ZERO_OR_MORE("0"), PORT("1"), PORT("65535"), COUNT(" 16 ")) == (1, 0, 1, 65535, 16)
    with pytest.raises(argparse.ArgumentTypeError, match=r"in 1\.\.65535, got '65536'"):
        PORT("65536")
    with pytest.raises(argparse.ArgumentTypeError, match="got '2.5'"):
        COUNT("2.5")


@pytest.mark.parametrize(
    "args",
    [
        ["decode", "t.safetensors", "--out", "o", "--batch-size", "0"],  # was range()'s ValueError, exit 1
        ["encode", "photos", "--out", "t.safetensors", "--batch-size", "-1"],  # was accepted
        ["reconstruct", "photos", "--out", "r", "--batch-size", "0"],  # was accepted
    ],
)
def test_the_reported_command_lines_fail_in_one_line(args, tmp_path):
    result = subprocess.run([sys.executable, "-m", "dualtoken", *args], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"dualtoken {args[0]}: error: argument --batch-size: expected a whole number >= 1, got '{args[-1]}' "
        f"(see dualtoken {args[0]} --help)"
    ]
    assert list(tmp_path.iterdir()) == []  # nothing written

"""The parser: every option of every command has help text and shows its default."""

from __future__ import annotations

import argparse
import re

import pytest

from dualtoken.cli.main import build_parser, main


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_option_has_help_and_shows_its_default_in_one_style(name):
    command = _commands()[name]
    formatter = command._get_formatter()
    for action in command._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        where = f"{name} {action.option_strings or action.dest}"
        assert action.help, f"{where}: no help text"
        shown = formatter._get_help_string(action)
        assert not re.search(r"\(None:|\(default [^:]|default: (None|False|\[\])\)", shown), f"{where}: {shown}"
        assert shown.count("(default: ") <= 1, f"{where}: {shown}"
        has_value = action.default not in (None, [], False) and action.nargs != 0
        if action.option_strings and (has_value or action.nargs == 0 or action.required):
            assert ("(default: " in shown) == (has_value and not action.required), f"{where}: {shown}"
    assert "(default: None)" not in command.format_help()


def test_model_options_default_to_the_trained_model():
    for name in ("encode", "reconstruct", "info", "demo", "serve"):
        assert _commands()[name].parse_args([] if name in ("info", "demo", "serve") else ["x", "--out", "o"]).model == (
            "dualtoken-efflite0"
        )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["encode"], "the following arguments are required: inputs, --out"),
        (["eval", "--metrics", "speed"], "argument --metrics: invalid choice: 'speed'"),
    ],
)
def test_a_command_line_that_does_not_parse_is_one_error_line(args, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dualtoken {args[0]}: error: {message}"), lines
    assert lines[0].endswith(f"(see dualtoken {args[0]} --help)")

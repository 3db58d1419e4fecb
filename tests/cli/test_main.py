"""The parser: every option of every command has help text and shows its default."""

from __future__ import annotations

import argparse

import pytest

from dualtoken.cli.main import build_parser


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_option_has_help_and_shows_its_default(name):
    command = _commands()[name]
    formatter = command._get_formatter()
    for action in command._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
        if action.option_strings:
            shown = formatter._get_help_string(action)
            assert "default" in shown, f"{name} {action.option_strings}: the help does not show the default"


def test_model_options_default_to_the_trained_model():
    for name in ("encode", "reconstruct", "info", "demo", "serve"):
        assert _commands()[name].parse_args([] if name in ("info", "demo", "serve") else ["x", "--out", "o"]).model == (
            "dualtoken-efflite0"
        )

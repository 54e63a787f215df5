"""Every subcommand's --help lists all its flags; the CLI imports no torch until it runs."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest

from services.cli import engine_args
from services.cli.engine_args import DTYPE_CHOICES
from services.cli.main import build_parser, main


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(build_parser()))
CASES = [pytest.param(path, parser, id=" ".join(path) or "tandem") for path, parser in COMMANDS]


def test_every_subcommand_is_found() -> None:
    paths = {path for path, _ in COMMANDS}
    assert {("generate",), ("bench",), ("bench", "throughput")} <= paths


@pytest.mark.parametrize(("path", "parser"), CASES)
def test_help_lists_every_flag(
    capsys: pytest.CaptureFixture[str], path: tuple[str, ...], parser: argparse.ArgumentParser
) -> None:
    assert main([*path, "--help"]) == 0
    out = capsys.readouterr().out
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in out, f"{flag} missing from `tandem {' '.join(path)} --help`"
        if action.option_strings and action.help != argparse.SUPPRESS:
            assert action.help, f"{action.option_strings} of {path} has no help text"


def test_dtype_choices_match_the_engine() -> None:
    from services.engine.runner import DTYPES

    assert set(DTYPE_CHOICES) == set(DTYPES)


def test_kv_layout_choices_and_default_match_the_engine() -> None:
    from services.engine.engine import EngineConfig
    from services.engine.kv_cache import KV_LAYOUTS

    assert KV_LAYOUTS == engine_args.KV_LAYOUTS
    helps = {
        action.help
        for _, parser in _commands(build_parser())
        for action in parser._actions
        if "--kv-layout" in action.option_strings
    }
    assert len(helps) == 1  # one text, from engine_args, wherever the flag appears
    assert f"(default: {EngineConfig().kv_layout})" in helps.pop()


def test_importing_the_cli_does_not_import_torch() -> None:
    # `tandem gateway` and `tandem --help` must start fast; torch loads only in handlers.
    code = "import sys, services.cli.main; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

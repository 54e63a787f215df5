"""Shared helpers for the deployment-file tests: paths and the real CLI parser."""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

import pytest

from services.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def subcommands() -> set[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(action.choices)


def check_tandem_command(argv: list[str], where: str) -> argparse.Namespace:
    """Parse ``tandem ARGV`` with the real parser; fail naming ``where`` if it refuses.

    A service whose subcommand does not exist in this tree yet (another change adds
    it) is skipped, not passed: flags are checked as soon as the subcommand lands.
    """
    if argv[0] not in subcommands():
        pytest.skip(f"{where}: `tandem {argv[0]}` is not a subcommand in this tree yet")
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `tandem {' '.join(argv)}` is refused:\n{errors.getvalue()}")

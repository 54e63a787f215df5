"""The --drain-timeout-s flag every long-running service takes (workers, router, gateway)."""

from __future__ import annotations

import argparse

from services.cli import arg_types
from services.rpc.drain import DEFAULT_DRAIN_TIMEOUT_S


def add_drain_arg(
    parser: argparse.ArgumentParser, what: str, default: float = DEFAULT_DRAIN_TIMEOUT_S
) -> None:
    """``what``: how this service drains, in words, for --help."""
    parser.add_argument(
        "--drain-timeout-s",
        type=arg_types.non_negative_float,
        default=default,
        metavar="S",
        help="on SIGTERM/SIGINT, drain for at most S seconds before stopping "
        f"(default {default:g}; keep it below the supervisor's kill timeout, "
        f"30 s on Kubernetes and in deploy/compose.yaml; 0: stop at once): {what}",
    )

"""Unary calls from the client commands (``tandem models``, ``tandem usage``) to a
``--target``: one channel with the caller's key and TLS, gRPC failures turned into one
``error:`` line plus ``tandem generate``'s hint."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from services.cli import arg_types
from services.cli.generate import (
    EXIT_BAD_REQUEST,
    EXIT_FAILED,
    CallFailure,
    add_api_key_arg,
    api_key_from,
)
from services.cli.tls_args import add_client_tls_args, client_tls

if TYPE_CHECKING:
    import grpc.aio

T = TypeVar("T")

BAD_REQUEST_CODES = ("INVALID_ARGUMENT", "NOT_FOUND")
"""Statuses that say the request itself was wrong: exit 2, like a bad flag."""


def add_target_args(
    parser: argparse.ArgumentParser, target_help: str, timeout_s: float, timeout_help: str
) -> None:
    """``--target`` (required), ``--timeout``, ``--api-key`` and the client TLS flags."""
    parser.add_argument(
        "--target", required=True, type=arg_types.host_port, metavar="HOST:PORT", help=target_help
    )
    parser.add_argument(
        "--timeout",
        type=arg_types.positive_float,
        default=timeout_s,
        metavar="S",
        help=f"{timeout_help} (default %(default)s)",
    )
    add_api_key_arg(parser)
    add_client_tls_args(parser)


def aligned(rows: list[list[str]], left: int) -> str:
    """``rows`` (the header first) as lines of columns two spaces apart: the first ``left``
    columns left-aligned, the rest (numbers) right-aligned; no trailing spaces."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: list[str]) -> str:
        cells = (
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    return "\n".join(line(row) for row in rows)


class TargetCallFailed(Exception):
    """A failed call, with whether the target itself had accepted the connection (a
    gateway relays its router's connection failures word for word: this tells them apart)."""

    def __init__(self, code: str, details: str, answered: bool) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details, self.answered = code, details, answered


async def call_target(
    args: argparse.Namespace, call: Callable[[grpc.aio.Channel], Awaitable[T]]
) -> T:
    """``call(channel)`` on a channel to ``args.target`` carrying ``--api-key`` and the TLS
    flags; TargetCallFailed on any gRPC error."""
    import grpc

    from services.rpc.server import client_channel

    async with client_channel(args.target, api_key_from(args), client_tls(args)) as channel:
        try:
            return await call(channel)
        except grpc.aio.AioRpcError as exc:
            answered = channel.get_state() == grpc.ChannelConnectivity.READY
            raise TargetCallFailed(exc.code().name, exc.details() or "", answered) from None


def report(args: argparse.Namespace, failed: TargetCallFailed, about_models: bool = True) -> int:
    """Print the failure and its hint; the exit status (2: a bad request, 1: otherwise).
    ``about_models``: PERMISSION_DENIED / NOT_FOUND concern a model (hint: tandem models)."""
    print(f"error: {failed}", file=sys.stderr)
    answered = failed.answered
    hint = CallFailure.of(args, failed.code, failed.details).hint(lambda: answered)
    if not about_models and failed.code in ("PERMISSION_DENIED", "NOT_FOUND"):
        hint = None
    if hint is not None:
        print(f"hint: {hint}", file=sys.stderr)
    return EXIT_BAD_REQUEST if failed.code in BAD_REQUEST_CODES else EXIT_FAILED

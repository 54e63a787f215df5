"""``tandem models --target HOST:PORT``: the models the caller may use there.

One ``tandem.v1.Inference/ListModels`` call: a gateway answers with the models its policy
lets the caller's key or token use, a router with every model its workers serve. Failures
get ``tandem generate``'s hints (a missing or refused key, TLS, nothing listening).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TYPE_CHECKING

from services.cli import arg_types
from services.cli.generate import EXIT_FAILED, CallFailure, add_api_key_arg, api_key_from
from services.cli.tls_args import add_client_tls_args, client_tls

if TYPE_CHECKING:
    from services.rpc.tls import TlsConfig
    from services.stubs.tandem.v1 import inference_pb2

COLUMNS = ("MODEL", "CONTEXT", "VOCAB")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the models a Tandem gateway or router serves to you",
        description="Ask the tandem.v1.Inference service at --target which models the caller "
        "may use (a gateway: those its policy allows your key or token; a router: all it "
        "serves), with each one's context length and vocabulary size.",
    )
    parser.add_argument(
        "--target",
        required=True,
        type=arg_types.host_port,
        metavar="HOST:PORT",
        help="the gateway or router to ask (`tandem up` prints where to connect)",
    )
    parser.add_argument(
        "--timeout",
        type=arg_types.positive_float,
        default=10.0,
        metavar="S",
        help="deadline of the call in seconds (default %(default)s)",
    )
    add_api_key_arg(parser)
    parser.add_argument(
        "--json",
        action="store_true",
        help='print {"models": [{"id", "max_context_length", "vocab_size"}, ...]} instead of '
        "a table",
    )
    add_client_tls_args(parser)
    parser.set_defaults(handler=run)


class _Failed(Exception):
    """A failed ListModels, with whether the target itself had answered the connection."""

    def __init__(self, code: str, details: str, answered: bool) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details, self.answered = code, details, answered


def run(args: argparse.Namespace) -> int:
    try:
        models = asyncio.run(
            list_models(args.target, args.timeout, api_key_from(args), client_tls(args))
        )
    except _Failed as failed:
        print(f"error: {failed}", file=sys.stderr)
        answered = failed.answered
        hint = CallFailure.of(args, failed.code, failed.details).hint(lambda: answered)
        if hint is not None:
            print(f"hint: {hint}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps({"models": [_card(m) for m in models]}))
        return 0
    print(format_table(models))
    if not models:
        print(f"no models at {args.target} for this caller", file=sys.stderr)
    return 0


async def list_models(
    target: str, timeout_s: float, api_key: str | None, tls: TlsConfig | None
) -> list[inference_pb2.ModelCard]:
    """The ModelCards ``target`` lists for this caller; _Failed on any gRPC error."""
    import grpc

    from services.rpc.server import client_channel
    from services.stubs.tandem.v1 import inference_pb2, inference_pb2_grpc

    async with client_channel(target, api_key, tls) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        try:
            reply = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            answered = channel.get_state() == grpc.ChannelConnectivity.READY
            raise _Failed(exc.code().name, exc.details() or "", answered) from None
    return list(reply.models)


def _card(model: inference_pb2.ModelCard) -> dict[str, object]:
    return {
        "id": model.id,
        "max_context_length": model.max_context_length,
        "vocab_size": model.vocab_size,
    }


def format_table(models: list[inference_pb2.ModelCard]) -> str:
    """One row per model under a header, columns aligned."""
    rows = [COLUMNS] + [(m.id, str(m.max_context_length), str(m.vocab_size)) for m in models]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )

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

from services.cli.target_call import (
    TargetCallFailed,
    add_target_args,
    aligned,
    call_target,
    report,
)

if TYPE_CHECKING:
    import grpc.aio

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
    add_target_args(
        parser,
        "the gateway or router to ask (`tandem up` prints where to connect)",
        10.0,
        "deadline of the call in seconds",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='print {"models": [{"id", "max_context_length", "vocab_size"}, ...]} instead of '
        "a table",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        models = asyncio.run(call_target(args, lambda channel: list_models(channel, args)))
    except TargetCallFailed as failed:
        return report(args, failed)
    if args.json:
        print(json.dumps({"models": [_card(m) for m in models]}))
        return 0
    print(format_table(models))
    if not models:
        print(f"no models at {args.target} for this caller", file=sys.stderr)
    return 0


async def list_models(
    channel: grpc.aio.Channel, args: argparse.Namespace
) -> list[inference_pb2.ModelCard]:
    """The ModelCards the target lists for this caller."""
    from services.stubs.tandem.v1 import inference_pb2, inference_pb2_grpc

    stub = inference_pb2_grpc.InferenceStub(channel)
    reply = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=args.timeout)
    return list(reply.models)


def _card(model: inference_pb2.ModelCard) -> dict[str, object]:
    return {
        "id": model.id,
        "max_context_length": model.max_context_length,
        "vocab_size": model.vocab_size,
    }


def format_table(models: list[inference_pb2.ModelCard]) -> str:
    """One row per model under a header, columns aligned."""
    rows = [[m.id, str(m.max_context_length), str(m.vocab_size)] for m in models]
    return aligned([list(COLUMNS), *rows], left=len(COLUMNS))

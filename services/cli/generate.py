"""``tandem generate``: run one request through an in-process engine and print the result.

Text is streamed to stdout as the engine produces it; ``--json`` prints one object
with the token ids, text, finish reason and usage instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from services.cli import arg_types
from services.cli.engine_args import add_engine_args, add_model_arg, engine_config
from services.cli.sampling_args import add_sampling_args, sampling_params
from services.engine.outputs import FinishReason, RequestOutput
from services.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from services.engine.engine import LLMEngine

REQUEST_ID = "cli-generate"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from one prompt with an in-process engine",
        description="Run one request through an engine in this process, streaming the "
        "generated text to stdout (or, with --json, printing one JSON object at the end).",
    )
    add_model_arg(parser)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="prompt text, tokenized by the model")
    prompt.add_argument(
        "--prompt-token-ids",
        type=arg_types.token_ids,
        metavar="1,2,3",
        help="prompt as comma-separated token ids, sent as given (no BOS added)",
    )
    add_sampling_args(parser)
    parser.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object {"token_ids", "text", "finish_reason", "usage"} '
        "instead of streaming text",
    )
    add_engine_args(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from services.engine.engine import LLMEngine

    # Validate the request before loading weights, so a typo fails in milliseconds.
    params = sampling_params(args)
    engine = LLMEngine(args.model, engine_config(args))
    prompt = args.prompt_token_ids
    if prompt is None:
        prompt = engine.tokenizer.encode(args.prompt)
    on_text = None if args.json else _write_stdout
    token_ids, text, last = stream_request(engine, prompt, params, on_text)
    if args.json:
        print(json.dumps(_as_json(token_ids, text, last)))
    else:
        print()
    if last.finish_reason is FinishReason.ERROR:
        print("error: the engine failed while generating; see the log above", file=sys.stderr)
        return 1
    return 0


def stream_request(
    engine: LLMEngine,
    prompt: list[int],
    params: SamplingParams,
    on_text: Callable[[str], None] | None = None,
) -> tuple[list[int], str, RequestOutput]:
    """Run one request to the end, passing each text delta to ``on_text`` as it arrives.

    Returns all generated token ids, the whole text and the final delta (finish reason
    and usage).
    """
    engine.add_request(REQUEST_ID, prompt, params)
    token_ids: list[int] = []
    pieces: list[str] = []
    while engine.has_unfinished():
        for out in engine.step():
            token_ids += out.token_ids
            pieces.append(out.text)
            if on_text and out.text:
                on_text(out.text)
            if out.finished:
                return token_ids, "".join(pieces), out
    raise RuntimeError(f"the engine dropped request {REQUEST_ID!r} without a final output")


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()  # stdout is block-buffered when piped; flush so text appears as made


def _as_json(token_ids: list[int], text: str, last: RequestOutput) -> dict[str, Any]:
    assert last.finish_reason is not None and last.usage is not None  # the final delta
    return {
        "token_ids": token_ids,
        "text": text,
        "finish_reason": last.finish_reason.value,
        "usage": asdict(last.usage),
    }

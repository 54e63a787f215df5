"""``tandem generate``: run one request and print the result.

The request runs through an in-process engine, or with ``--target HOST:PORT`` through
a running tandem.v1.Inference service (Inference.Generate over gRPC; nothing imports
torch on that path). Text is streamed to stdout as it is produced; ``--json`` prints
one object with the token ids, text, finish reason and usage instead (plus the
server's "serving" info with --target).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from services.cli import arg_types
from services.cli.engine_args import add_engine_args, engine_config
from services.cli.sampling_args import add_sampling_args, sampling_params
from services.cli.tls_args import add_client_tls_args, client_tls
from services.engine.errors import InvalidRequestError
from services.engine.outputs import FinishReason, RequestOutput
from services.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import grpc

    from services.engine.engine import LLMEngine
    from services.rpc.tls import TlsConfig
    from services.stubs.tandem.v1 import inference_pb2

REQUEST_ID = "cli-generate"
REMOTE_MODEL = "tandem-tiny"
"""The model --target asks for when --model is not given."""
EXIT_BAD_REQUEST = 2
"""The server rejected the request (INVALID_ARGUMENT, NOT_FOUND): like a bad flag."""
EXIT_FAILED = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from one prompt, in-process or on a running service",
        description="Run one request through an engine in this process, or with --target "
        "through a running tandem.v1.Inference service, streaming the generated text to "
        "stdout (or, with --json, printing one JSON object at the end).",
    )
    parser.add_argument(
        "--model",
        metavar="DIR|tandem-tiny",
        help="in-process: a Hugging Face-format model directory (config.json, *.safetensors, "
        "tokenizer.json) or 'tandem-tiny', the built-in model created on first use "
        f"(required); with --target: the model id to ask for ({REMOTE_MODEL})",
    )
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
        'instead of streaming text (with --target, also "serving": the workers that served it)',
    )
    remote = parser.add_argument_group("remote")
    remote.add_argument(
        "--target",
        type=arg_types.host_port,
        metavar="HOST:PORT",
        help="send the request to the tandem.v1.Inference service at HOST:PORT instead of "
        "running an engine here (the engine flags then do not apply)",
    )
    remote.add_argument(
        "--timeout",
        type=arg_types.positive_float,
        default=300.0,
        metavar="S",
        help="with --target: deadline of the whole request in seconds (300)",
    )
    remote.add_argument(
        "--api-key",
        metavar="KEY",
        help="with --target: API key (or access token) sent as 'authorization: Bearer KEY', "
        "needed by a gateway (default: $TANDEM_API_KEY; `tandem up` prints one). Prefer the "
        "variable: a flag is visible to other users in the process list",
    )
    add_client_tls_args(remote)
    add_engine_args(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.target:
        return run_remote(args)
    if args.model is None:
        raise InvalidRequestError(
            "--model", "is required without --target: a model directory or 'tandem-tiny'"
        )
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


def run_remote(args: argparse.Namespace) -> int:
    """``--target``: one Inference.Generate call; gRPC errors become ``error: CODE: ...``."""
    import grpc

    params = sampling_params(args)  # the offline checks and messages, before any network
    for flag in ("dtype", "device", "kv_cache_gib"):
        if getattr(args, flag, None) is not None:
            raise InvalidRequestError(
                "--" + flag.replace("_", "-"),
                "configures an in-process engine and does nothing with --target; drop it",
            )
    request = remote_request(args.model or REMOTE_MODEL, args, params)
    completion = RemoteCompletion()
    on_text = None if args.json else _write_stdout
    try:
        asyncio.run(
            stream_remote(
                args.target,
                request,
                args.timeout,
                completion,
                on_text,
                api_key_from(args),
                client_tls(args),
            )
        )
    except grpc.aio.AioRpcError as exc:
        _print_partial(completion, args.json)
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        if (hint := _hint(exc, args)) is not None:
            print(f"hint: {hint}", file=sys.stderr)
        bad_request = exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        return EXIT_BAD_REQUEST if bad_request else EXIT_FAILED
    if completion.final is None:
        _print_partial(completion, args.json)
        print("error: the server ended the stream without a final message", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(completion.as_json()) if args.json else "")
    return 0


API_KEY_HINT = (
    "the target is a gateway; pass --api-key KEY or set TANDEM_API_KEY (tandem up prints one)"
)
"""What to do when a gateway refuses a call that carried no credential."""


def _hint(exc: grpc.aio.AioRpcError, args: argparse.Namespace) -> str | None:
    """What to do about a failed call, where the status says it clearly."""
    import grpc

    if exc.code() == grpc.StatusCode.UNAUTHENTICATED and not api_key_from(args):
        return API_KEY_HINT
    if exc.code() == grpc.StatusCode.UNAVAILABLE and "failed to connect" in (exc.details() or ""):
        return (
            f"nothing answered at {args.target}: start Tandem there (tandem up prints the "
            "address to use) or fix --target"
        )
    return None


def api_key_from(args: argparse.Namespace) -> str | None:
    """``--api-key``, else ``$TANDEM_API_KEY``, else None (no authorization metadata)."""
    import os

    return args.api_key or os.environ.get("TANDEM_API_KEY") or None


def remote_request(
    model: str, args: argparse.Namespace, params: SamplingParams
) -> inference_pb2.GenerateRequest:
    """The GenerateRequest for the prompt flags and validated sampling parameters."""
    from services.stubs.tandem.v1 import inference_pb2

    request = inference_pb2.GenerateRequest(
        model=model,
        max_tokens=params.max_tokens,
        min_tokens=params.min_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        stop=params.stop,
        ignore_eos=params.ignore_eos,
    )
    if params.seed is not None:
        request.seed = params.seed
    if args.prompt_token_ids is None:
        request.prompt = args.prompt
        return request
    for token_id in args.prompt_token_ids:
        if not 0 <= token_id < 2**32:
            raise InvalidRequestError(
                "--prompt-token-ids", f"token ids must be in [0, 2^32), got {token_id}"
            )
    request.prompt_token_ids.extend(args.prompt_token_ids)
    return request


@dataclass
class RemoteCompletion:
    """What a Generate stream has delivered so far."""

    token_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    final: inference_pb2.GenerateResponse | None = None
    """The message with a finish reason, usage and serving info, once it arrives."""

    def add(self, message: inference_pb2.GenerateResponse) -> None:
        self.token_ids += message.token_ids
        self.pieces.append(message.text)
        if message.finish_reason:  # FINISH_REASON_UNSPECIFIED is 0
            self.final = message

    def as_json(self) -> dict[str, Any]:
        """The offline --json shape, plus "serving" when the server sent it."""
        if self.final is None:
            raise ValueError("the stream has no final message yet")
        out = {
            "token_ids": self.token_ids,
            "text": "".join(self.pieces),
            "finish_reason": _finish_reason(self.final.finish_reason),
            "usage": _fields(self.final.usage),
        }
        if self.final.HasField("serving"):
            out["serving"] = _fields(self.final.serving)
        return out


async def stream_remote(
    target: str,
    request: inference_pb2.GenerateRequest,
    timeout_s: float,
    completion: RemoteCompletion,
    on_text: Callable[[str], None] | None = None,
    api_key: str | None = None,
    tls: TlsConfig | None = None,
) -> None:
    """Call Inference.Generate at ``target``, adding each message to ``completion``.

    ``api_key`` goes out as ``authorization: Bearer …`` metadata (never printed); ``tls``
    verifies the server (and presents a client certificate, if it has one)."""
    from services.rpc.server import client_channel
    from services.stubs.tandem.v1 import inference_pb2_grpc

    async with client_channel(target, api_key, tls) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        async for message in stub.Generate(request, timeout=timeout_s):
            completion.add(message)
            if on_text and message.text:
                on_text(message.text)


def _print_partial(completion: RemoteCompletion, as_json: bool) -> None:
    """After a failure: end the streamed line, or print the JSON of a final error message."""
    if as_json and completion.final is not None:
        print(json.dumps(completion.as_json()))
    elif not as_json and any(completion.pieces):
        print()


def _finish_reason(value: int) -> str:
    """FINISH_REASON_LENGTH → "length", the engine's FinishReason value."""
    from services.stubs.tandem.v1 import inference_pb2

    return inference_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def _fields(message: Any) -> dict[str, Any]:
    """Every field of a flat proto message, ints kept as numbers (MessageToDict quotes uint64)."""
    return {f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields}

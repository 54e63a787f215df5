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
import re
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
    add_api_key_arg(remote, "with --target: ")
    add_client_tls_args(remote)
    add_engine_args(parser)
    parser.set_defaults(handler=run)


def add_api_key_arg(group: argparse._ActionsContainer, prefix: str = "") -> None:
    """``--api-key``, read by :func:`api_key_from` (shared by every client command)."""
    group.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"{prefix}API key (or access token) sent as 'authorization: Bearer KEY', "
        "needed by a gateway (default: $TANDEM_API_KEY; `tandem up` prints one). Prefer the "
        "variable: a flag is visible to other users in the process list",
    )


def run(args: argparse.Namespace) -> int:
    if args.prompt == "":  # a service refuses it; offline, the tokenizer's BOS alone ran
        raise InvalidRequestError("--prompt", "is empty; give some text")
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
        streamed = len(completion.token_ids)
        failure = CallFailure.of(args, exc.code().name, exc.details() or "", streamed)
        if (hint := failure.hint(lambda: completion.target_answered)) is not None:
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
CONNECT_FAILED = "failed to connect to all addresses"
"""gRPC's details when a channel found no peer: the client's own, or relayed by the target
(a gateway whose router is down passes the router's status on as it is)."""
DNS_FAILED = ("errors resolving", "DNS resolution failed")
"""How gRPC's two resolvers (native, c-ares) begin a failed host lookup."""
TLS_PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class CallFailure:
    """A failed call to ``--target``, as much as the hints need of it."""

    code: str
    """The status code's name (UNAVAILABLE, ...)."""
    details: str
    target: str
    tls: bool
    """The client spoke TLS (--tls or --tls-ca)."""
    key_from: str | None
    """Where the API key came from (--api-key, TANDEM_API_KEY); None: no key was sent."""
    client_cert: bool = False
    """The client presented a certificate (--tls-cert)."""
    streamed: int = 0
    """Tokens the call had delivered before it failed (a stream cut mid-way)."""

    @classmethod
    def of(
        cls, args: argparse.Namespace, code: str, details: str, streamed: int = 0
    ) -> CallFailure:
        """The failure of a call made with ``tandem generate``/``bench serve``'s flags."""
        tls = bool(args.tls or args.tls_ca or args.tls_cert)
        cert = bool(getattr(args, "tls_cert", None))
        return cls(code, details, args.target, tls, api_key_source(args), cert, streamed)

    def hint(self, answered: Callable[[], bool]) -> str | None:
        """What to do about it, where the status says clearly; None otherwise.

        ``answered()``: whether the target itself accepted the connection, asked only for
        a connection failure: from there a gateway relays its router's failure word for
        word, and only the client's side can tell the two apart."""
        if self.code == "UNAUTHENTICATED":
            return self._key_hint()
        if self.code in ("PERMISSION_DENIED", "NOT_FOUND"):
            return f"list the models you may use there: tandem models --target {self.target}"
        if self.code == "UNIMPLEMENTED":
            return (
                f"{self.target} does not serve this call: keys, usage and audit are the "
                "gateway's, and a router (tandem up --no-gateway) serves Generate and "
                "ListModels only; point --target at the gateway (tandem up prints it)"
            )
        if self.code not in ("UNAVAILABLE", "UNKNOWN"):
            return None
        if self.streamed:
            return (
                f"the stream was cut after {self.streamed} tokens (above): the server "
                "stopped, or lost the worker it needed; send the request again"
            )
        dns = self.details.startswith(DNS_FAILED)
        if not (dns or CONNECT_FAILED in self.details):
            return None  # the target's own answer (a router with no worker, ...)
        if dns and self.target in self.details:  # (not the gateway's --router)
            host = self.target.rsplit(":", 1)[0]
            return f"cannot resolve host {host}: check the host name in --target {self.target}"
        if answered():
            return self._behind_hint()
        if dns:
            return None
        if "handshake failed" in self.details.lower():
            return self._tls_hint()
        if speaks_tls(self.target):
            if not self.tls:
                return (
                    f"{self.target} speaks TLS: pass --tls-ca CA.pem (tandem up --tls prints "
                    "its CA), or --tls for a certificate the system trusts"
                )
            if not self.client_cert:  # it closed on a TLS client without a certificate
                return (
                    f"{self.target} asks for a client certificate: pass --tls-cert CERT.pem "
                    "--tls-key KEY.pem signed by a CA it trusts (its --client-ca / --tls-ca)"
                )
        return (
            f"nothing answered at {self.target}: start Tandem there (tandem up prints the "
            "address to use) or fix --target"
        )

    def _key_hint(self) -> str:
        if self.key_from is None:
            return API_KEY_HINT
        return (
            f"the gateway refused the API key from {self.key_from} (unknown, revoked or "
            "mistyped): check --api-key / TANDEM_API_KEY, or mint another (tandem keys "
            "create; each tandem up prints a new admin key and revokes the last run's)"
        )

    def _behind_hint(self) -> str:
        relayed = re.search(r"ipv[46]:(\S+?): ", self.details)
        where = f" at {relayed.group(1)}" if relayed else ""
        return (
            f"{self.target} answered, but the service behind it{where} did not: a gateway "
            "whose router is down or unreachable; start the router or fix the gateway's "
            "--router (tandem up: see router.log in its state directory)"
        )

    def _tls_hint(self) -> str:
        details = self.details
        if "WRONG_VERSION_NUMBER" in details:
            return (
                f"{self.target} does not speak TLS: drop --tls/--tls-ca, or serve TLS there "
                "(tandem up --tls)"
            )
        if "CERTIFICATE_VERIFY_FAILED" in details:
            return (
                f"{self.target}'s certificate is not signed by a CA this client trusts: pass "
                "--tls-ca with the CA that issued it (tandem up --tls: <state dir>/tls/ca.pem)"
            )
        if "not in peer certificate" in details:
            host = self.target.rsplit(":", 1)[0]
            return (
                f"{self.target}'s certificate does not name {host}: connect by a name it "
                "holds (tandem's development CA: localhost, 127.0.0.1 and the service's name)"
            )
        return (
            f"the TLS handshake with {self.target} failed: check --tls-ca, and --tls-cert/"
            "--tls-key for a server that asks for a client certificate"
        )


def speaks_tls(target: str, timeout_s: float = TLS_PROBE_TIMEOUT_S) -> bool:
    """Whether ``target`` completes a TLS handshake (its certificate unchecked: this only
    tells a plaintext client that it knocked on a TLS door, which closes on it silently)."""
    import socket
    import ssl

    host, port = target.rsplit(":", 1)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    host = host.strip("[]")
    try:
        with (
            socket.create_connection((host, int(port)), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        return False


def api_key_source(args: argparse.Namespace) -> str | None:
    """Which of --api-key and $TANDEM_API_KEY gave the key ``api_key_from`` returns."""
    import os

    if args.api_key:
        return "--api-key"
    return "TANDEM_API_KEY" if os.environ.get("TANDEM_API_KEY") else None


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
    target_answered: bool = False
    """After a failed call: whether the channel to the target was connected (READY), so
    the failure came from the target, not from reaching it."""

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
    import grpc

    from services.rpc.server import client_channel
    from services.stubs.tandem.v1 import inference_pb2_grpc

    async with client_channel(target, api_key, tls) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        try:
            async for message in stub.Generate(request, timeout=timeout_s):
                completion.add(message)
                if on_text and message.text:
                    on_text(message.text)
        finally:  # read before the channel closes: the hints tell relayed failures by it
            completion.target_answered = channel.get_state() == grpc.ChannelConnectivity.READY


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

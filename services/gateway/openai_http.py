"""The OpenAI-compatible HTTP API of the gateway: aiohttp on the gateway's asyncio loop.

Routes: ``GET /v1/models`` (the caller's models), ``GET /v1/models/{id}``,
``POST /v1/completions``, ``POST /v1/chat/completions``. Credentials are the gRPC ones, in
the ``Authorization: Bearer`` header (an API key ``tdm_…`` or a Keycloak access token), and
every request goes through the same :class:`Pipeline` as gRPC: authenticate, authorize,
reserve, forward, settle once into admission, ledger and audit. Chat messages are sent to
the router as ``GenerateRequest.messages``; it applies the model's chat template.

Order of checks: the credential first, before the body is read (401 even for a malformed
body; a caller without a credential cannot make the gateway parse 16 MiB of JSON, and its
audit record names no model), then the body (400, not audited: no policy decision was
made), then the pipeline's policy.

Streaming (``stream: true``): server-sent events, ``data: {chunk}\\n\\n`` per chunk and
``data: [DONE]`` at the end. Refusals before the first token still get a plain HTTP error
(status and JSON body): the event stream starts once the router sent its first message, or
after ``SSE_KEEPALIVE_S`` without one (a long prefill), with a comment line every
``SSE_KEEPALIVE_S`` until it comes so that proxies do not drop the silent connection.
A failure after that is sent as a last event ``data: {"error": {…}}`` and the stream ends
without ``[DONE]``. The usage chunk is sent only when ``stream_options.include_usage`` is
true, as OpenAI does (clients that index ``choices[0]`` of every chunk would break on it);
metering never depends on it. A client that disconnects cancels the request (aiohttp's
``handler_cancellation``), and the pipeline settles the tokens produced so far.

Every generate response has an ``x-request-id`` header: the request's id in the ledger and
audit log (OpenAI's ``id`` is ``cmpl-``/``chatcmpl-`` plus it). Prompt text is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from services.gateway import openai_responses as shapes
from services.gateway.auth import Identity
from services.gateway.cors import Cors
from services.gateway.model_cards import CARDS_TIMEOUT_S
from services.gateway.openai_errors import error_body, error_response, gateway_error
from services.gateway.openai_requests import (
    BadRequest,
    OpenAIRequest,
    parse_chat,
    parse_completion,
)
from services.gateway.pipeline import (
    CallInfo,
    GatewayError,
    Pipeline,
    check_client_request_id,
    prompt_estimate,
)
from services.gateway.tracing import http_middlewares
from services.rpc.shutdown import first_of
from services.stubs.tandem.v1 import inference_pb2

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 2**20
"""Largest request body (long prompts fit; aiohttp's default of 1 MiB may not)."""
IDLE_TIMEOUT_S = 30.0
"""A connection that has not sent a whole request's headers this long after it opened or
after its last answer is closed: idle keep-alive connections, and a slow client trickling
headers to hold a connection (and one of the gateway's file descriptors) open for ever."""
BODY_TIMEOUT_S = 60.0
"""Longest wait for a request's body once its headers are in (408 after it): a 16 MiB body
needs ~280 KB/s; a client promising bytes it never sends holds the connection no longer."""
LINGER_S = 5.0
"""After answering a request whose body was not all read (a 408, an early refusal), how
long the rest is still read and dropped before the connection closes: closed at once, the
client's TCP stack may discard the answer on a reset."""
SSE_KEEPALIVE_S = 15.0
"""A streamed request whose first token takes longer gets its event stream opened and a
comment line this often until it comes (nginx and most load balancers drop a connection
silent for 60 s)."""
SHUTDOWN_TIMEOUT_S = 5.0
"""How long stop() lets in-flight requests finish before cancelling them (they settle)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Messages = AsyncIterator[inference_pb2.GenerateResponse]


class OpenAIApi:
    """The routes, in front of one :class:`Pipeline`."""

    def __init__(
        self, pipeline: Pipeline, owned_by: str = "tandem", cors_origins: Collection[str] = ()
    ) -> None:
        self._pipeline = pipeline
        self._owned_by = owned_by
        self._cards = pipeline.cards
        self._cors = Cors(cors_origins) if cors_origins else None

    def app(self) -> web.Application:
        middlewares = [*http_middlewares(), _openai_errors]  # the span sees the final status
        app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
        if self._cors is not None:
            self._cors.install(app)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        return app

    async def models(self, request: web.Request) -> web.StreamResponse:
        cards = await self._visible(request)
        if isinstance(cards, web.Response):
            return cards
        data = [shapes.model_card(c, self._owned_by) for c in cards]
        return web.json_response({"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.StreamResponse:
        cards = await self._visible(request)
        if isinstance(cards, web.Response):
            return cards
        name = request.match_info["model"]
        for card in cards:
            if card.id == name:
                return web.json_response(shapes.model_card(card, self._owned_by))
        message = f"The model {name!r} does not exist or you do not have access to it."
        return error_response(404, message, "invalid_request_error", "model", "model_not_found")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    # ---- the generate routes -------------------------------------------------------------

    async def _visible(self, request: web.Request) -> list[inference_pb2.ModelCard] | web.Response:
        call = _call_info(request, "")
        try:
            who = await self._pipeline.authenticate(call)
            return list((await self._pipeline.list_models(who, call)).models)
        except GatewayError as error:
            return _error(error)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        call = _call_info(request, uuid.uuid4().hex)
        headers = {"x-request-id": call.request_id}
        try:
            who = await self._pipeline.authenticate(call)
            body = await _read_json(request)
            call = replace(call, client_request_id=_client_request_id(request))
            parsed = parse_chat(body) if chat else parse_completion(body)
        except GatewayError as error:
            return _error(error, headers=headers)
        except BadRequest as error:
            answer = error_response(
                error.status, str(error), "invalid_request_error", error.param, None, headers
            )
            if error.status == 408:  # the rest of the body may never come: close after it
                answer.force_close()
            return answer
        if chat and not parsed.generate.HasField("max_tokens"):
            await self._up_to_the_context(parsed.generate, call, who)
        shape = shapes.Shape(chat, call.request_id, parsed.generate.model)
        async with aclosing(self._pipeline.generate(who, parsed.generate, call)) as stream:
            early = _EarlyEvents(request, headers) if parsed.stream else None
            try:
                first = await _first_message(stream, early)
            except GatewayError as error:
                if early is None or early.response is None:
                    return _error(error, parsed.max_tokens_param, headers)
                await _event(early.response, gateway_error(error, parsed.max_tokens_param)[1])
                return early.response
            except ConnectionResetError:  # the client left while we kept its stream alive
                assert early is not None and early.response is not None
                return early.response
            if early is not None:
                return await _stream(parsed, shape, first, stream, early)
            return await _complete(parsed, shape, first, stream, headers)

    async def _up_to_the_context(
        self, generate: inference_pb2.GenerateRequest, call: CallInfo, who: Identity
    ) -> None:
        """OpenAI's chat default: no ``max_tokens`` lets the reply run to the end of the
        context, not the proto's 16 (chat front-ends rarely send one, and got 16-token
        replies). The engine stops at the context, so its length is the bound; a caller
        whose smallest token limit is below it gets what that limit can ever admit (the
        whole context was refused on every call, however short the chat)."""
        remaining = call.time_remaining()
        timeout = CARDS_TIMEOUT_S if remaining is None else min(remaining, CARDS_TIMEOUT_S)
        context = await self._cards.context_length(generate.model, timeout)
        if context:
            bound = context
            ceiling = self._pipeline.token_ceiling(who)
            if ceiling is not None:
                bound = min(bound, max(1, ceiling - prompt_estimate(generate)))
            generate.max_tokens = min(bound, 2**31 - 1)


async def _complete(
    parsed: OpenAIRequest,
    shape: shapes.Shape,
    first: inference_pb2.GenerateResponse | None,
    stream: Messages,
    headers: dict[str, str],
) -> web.Response:
    """Collect the whole completion into one response."""
    texts: list[str] = []
    final = None
    message = first
    try:
        while message is not None:
            texts.append(message.text)
            if message.finish_reason:
                final = message
            message = await anext(stream, None)
    except GatewayError as error:
        return _error(error, parsed.max_tokens_param, headers)
    failure = _unfinished(final)
    if failure is not None:
        status, body = failure
        return web.json_response(body, status=status, headers=headers)
    assert final is not None
    return web.json_response(shapes.completion(shape, "".join(texts), final), headers=headers)


class _EarlyEvents:
    """A streamed request's event stream, opened before its first message when that takes
    long (a long prompt's prefill, a queue): ``SSE_KEEPALIVE_S`` of silence is enough for
    proxies and load balancers to cut an idle connection."""

    def __init__(self, request: web.Request, headers: dict[str, str]) -> None:
        self.request = request
        self.headers = headers
        self.response: web.StreamResponse | None = None
        """Set once opened: a failure after that is an error event, not an HTTP status."""

    async def open(self) -> web.StreamResponse:
        if self.response is None:
            headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            self.response = web.StreamResponse(headers={**self.headers, **headers})
            await self.response.prepare(self.request)
        return self.response


async def _first_message(
    stream: Messages, early: _EarlyEvents | None
) -> inference_pb2.GenerateResponse | None:
    """The stream's first message. For a streamed request, every ``SSE_KEEPALIVE_S`` it
    has not come, the event stream is opened (if it is not yet) and sent a comment line,
    which clients ignore (the openai SDK does). Refusals come within milliseconds, so they
    still get their HTTP status."""
    if early is None:
        return await anext(stream, None)
    pending = asyncio.ensure_future(anext(stream, None))
    try:
        while not (await asyncio.wait({pending}, timeout=SSE_KEEPALIVE_S))[0]:
            response = await early.open()
            await response.write(b": waiting for the first token\n\n")
        return pending.result()
    finally:
        if not pending.done():  # the client left (the handler was cancelled or a write failed)
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending


async def _stream(
    parsed: OpenAIRequest,
    shape: shapes.Shape,
    first: inference_pb2.GenerateResponse | None,
    stream: Messages,
    early: _EarlyEvents,
) -> web.StreamResponse:
    """Relay the completion as server-sent events (see the module docstring)."""
    response = await early.open()
    try:
        if shape.chat:
            await _event(response, shapes.role_chunk(shape))
        final = None
        message = first
        try:
            while message is not None:
                if message.finish_reason:
                    final = message
                    if _unfinished(final) is None:
                        # Sent before the next read, at which the pipeline counts its tokens
                        # as sent: a client gone by then is charged for what it was sent.
                        reason = shapes.FINISH_REASONS[final.finish_reason]
                        await _event(response, shapes.chunk(shape, final.text, reason))
                elif message.text:
                    await _event(response, shapes.chunk(shape, message.text))
                message = await anext(stream, None)
        except GatewayError as error:
            await _event(response, gateway_error(error, parsed.max_tokens_param)[1])
            return response
        await _end_stream(response, parsed, shape, final)
    except ConnectionResetError:  # the client left; the pipeline settles on close
        log.info("client of request %s disconnected mid-stream", shape.request_id)
    return response


async def _end_stream(
    response: web.StreamResponse,
    parsed: OpenAIRequest,
    shape: shapes.Shape,
    final: inference_pb2.GenerateResponse | None,
) -> None:
    """The stream's end, after its last chunk: an error event, or the usage and [DONE]."""
    failure = _unfinished(final)
    if failure is not None:
        await _event(response, failure[1])
        return
    assert final is not None
    if parsed.include_usage:
        await _event(response, shapes.usage_chunk(shape, final))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()


def _unfinished(
    final: inference_pb2.GenerateResponse | None,
) -> tuple[int, dict[str, Any]] | None:
    """An error (status, body) when the stream did not finish normally, else None."""
    if final is None:
        message = "the router ended the stream without a final message"
        return 502, error_body(message, "server_error", None, "bad_gateway")
    if final.finish_reason not in shapes.FINISH_REASONS:  # CANCELLED (ERROR raises instead)
        message = "the server aborted the request before it finished (e.g. shutting down)"
        return 503, error_body(message, "server_error", None, "service_unavailable")
    return None


async def _event(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    await response.write(f"data: {data}\n\n".encode())


def _error(
    error: GatewayError, max_tokens_param: str = "max_tokens", headers: dict[str, str] | None = None
) -> web.Response:
    status, body, extra = gateway_error(error, max_tokens_param)
    return web.json_response(body, status=status, headers={**(headers or {}), **extra})


CLIENT_REQUEST_ID = "X-Client-Request-Id"
"""The header OpenAI's API takes a client's own request id from: kept beside the gateway's
id for correlation (``Ledger.find``), never used to meter."""


def _client_request_id(request: web.Request) -> str:
    """The client's ``X-Client-Request-Id`` ('' without one); GatewayError when unusable."""
    value = request.headers.get(CLIENT_REQUEST_ID, "")
    check_client_request_id(value, CLIENT_REQUEST_ID)
    return value


def _call_info(request: web.Request, request_id: str) -> CallInfo:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    address = f"http:{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "http:"
    credentials = [("authorization", v) for v in request.headers.getall("Authorization", [])]
    return CallInfo(request_id=request_id, metadata=credentials, peer=address)


async def _read_json(request: web.Request) -> Any:
    """The parsed body; BadRequest saying why it cannot be read."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            body = await request.read()
    except TimeoutError:
        raise BadRequest(
            None, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s", status=408
        ) from None
    try:
        return json.loads(body)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an int over 4,300 digits
        raise BadRequest(None, f"the request body is not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise BadRequest(None, "the request body nests JSON too deeply") from exc


@web.middleware
async def _openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (unknown route, wrong method, body too large), and anything
    unforeseen, in OpenAI's shape; a 405 keeps its Allow header."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = f"{exc.reason}: {request.method} {request.path}"
        if exc.status == 404:
            message = f"Invalid URL ({request.method} {request.path})"
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, message, "invalid_request_error", headers=allow)
    except Exception:
        # A client gets OpenAI's shape, never aiohttp's plain-text page; the details stay
        # in the log.
        log.exception("the HTTP API failed on %s %s", request.method, request.path)
        return error_response(500, "the server failed on this request", "server_error")


@dataclass
class HttpServer:
    """A running HTTP API; ``stop()`` drains it."""

    runner: web.AppRunner
    port: int

    async def stop(self, interrupt: asyncio.Event | None = None) -> None:
        """Stop listening and let the requests in flight finish (the runner's shutdown
        timeout); once ``interrupt`` is set, close their connections: each handler is
        cancelled as if its client had left, so what it streamed is still metered."""
        cleanup = asyncio.ensure_future(self.runner.cleanup())
        if interrupt is not None:
            await first_of(asyncio.shield(cleanup), interrupt.wait())
            server = self.runner.server
            if not cleanup.done() and server is not None:
                for connection in server.connections:
                    connection.force_close()
        await cleanup


async def start_http(
    pipeline: Pipeline,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    drain_timeout_s: float = SHUTDOWN_TIMEOUT_S,
    cors_origins: Collection[str] = (),
) -> HttpServer:
    """Serve the API on host:port (0: a free port) on the running loop; HTTPS with
    ``ssl_context`` (``services.rpc.tls.server_ssl_context``). ``stop()`` lets requests in
    flight finish for ``drain_timeout_s``. ``cors_origins``: browser pages allowed to call
    it (services/gateway/cors.py); none by default."""
    runner = web.AppRunner(
        OpenAIApi(pipeline, cors_origins=cors_origins).app(),
        handler_cancellation=True,  # a client that leaves stops its generation
        keepalive_timeout=IDLE_TIMEOUT_S,  # also bounds a first request's headers (aiohttp)
        lingering_time=LINGER_S,
        shutdown_timeout=drain_timeout_s,
        access_log=None,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0]
    return HttpServer(runner, int(bound[1]))

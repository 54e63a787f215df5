"""OpenAI request bodies (``/v1/completions``, ``/v1/chat/completions``) → GenerateRequest.

Mapped fields: ``model``; ``prompt`` (a string, a list of token ids, or a one-element list
of either) or ``messages`` (at most 16,384; ``content`` a string or a list of
``{"type": "text"}`` parts, joined with newlines as vLLM joins them; role ``developer`` is
sent as ``system``); ``max_completion_tokens`` or ``max_tokens``
(unset: a chat may run to the end of the context, as OpenAI's chat API lets it — the HTTP
API sets the model's context length from the router's model list, and the limiter reserves
it; a legacy completion stops at 16, OpenAI's default and the proto's); ``temperature``,
``top_p``, ``seed``, ``stop`` (a string or a list of at most 16, each at most 1,024
characters, as the engine takes); ``n`` (only 1); ``user`` (accepted and
not forwarded: the ledger charges the authenticated caller); ``stream`` and
``stream_options.include_usage``. vLLM's extensions ``top_k``, ``min_tokens`` and
``ignore_eos`` are mapped too. Range checks (temperature ≥ 0, top_p in (0, 1], …) are the
router's, as for gRPC callers.

Features Tandem lacks (logprobs, echo, best_of, suffix, penalties, logit_bias, tools,
response_format other than text) are refused when set to anything but their default, so a
client never silently gets less than it asked for; unknown fields are ignored.

Every refusal is :class:`BadRequest` naming the OpenAI parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.engine.errors import InvalidRequestError
from services.engine.sampling_params import check_stop_strings
from services.stubs.tandem.v1 import inference_pb2

MAX_CHAT_MESSAGES = 16_384
"""Most messages one chat may carry: far beyond any context's worth of turns, and a bound
on the work a body does on the event loop before the router sees it (1.3 M empty messages
held every other call up for 2 s)."""

_UNSUPPORTED_COMMON: dict[str, tuple[object, ...]] = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
}
_UNSUPPORTED_COMPLETIONS = {
    **_UNSUPPORTED_COMMON,
    "logprobs": (None,),  # 0 still asks for the sampled token's logprob
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
}
_UNSUPPORTED_CHAT = {
    **_UNSUPPORTED_COMMON,
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
}
_ROLE_ALIASES = {"developer": "system"}
"""OpenAI's newer name for the system role; chat templates know ``system``."""


class BadRequest(Exception):
    """An invalid request body (HTTP 400; 408 for one that never arrived); ``param`` is the
    OpenAI parameter at fault."""

    def __init__(self, param: str | None, message: str, status: int = 400) -> None:
        super().__init__(message if param is None else f"{param}: {message}")
        self.param = param
        self.status = status


@dataclass(frozen=True)
class OpenAIRequest:
    """A parsed body: what to forward and how to answer."""

    generate: inference_pb2.GenerateRequest
    """The request for the pipeline (request_id not yet set)."""
    stream: bool
    """Answer as server-sent events."""
    include_usage: bool
    """``stream_options.include_usage``: end the stream with a usage chunk."""
    max_tokens_param: str
    """The name the client used for the token limit (for error messages)."""


def parse_completion(body: Any) -> OpenAIRequest:
    """A ``/v1/completions`` body; BadRequest naming the parameter otherwise."""
    body = _object(body)
    _refuse_unsupported(body, _UNSUPPORTED_COMPLETIONS)
    request = _common(body)
    _set_prompt(request, body.get("prompt"))
    return _finish(body, request)


def parse_chat(body: Any) -> OpenAIRequest:
    """A ``/v1/chat/completions`` body; BadRequest naming the parameter otherwise."""
    body = _object(body)
    _refuse_unsupported(body, _UNSUPPORTED_CHAT)
    request = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages", "is required: a non-empty list of {role, content}")
    if len(messages) > MAX_CHAT_MESSAGES:
        raise BadRequest(
            "messages", f"has {len(messages)} messages; at most {MAX_CHAT_MESSAGES} are taken"
        )
    for index, message in enumerate(messages):
        role, content = _message(message, f"messages[{index}]")
        request.messages.add(role=_ROLE_ALIASES.get(role, role), content=content)
    return _finish(body, request)


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest(None, "the request body must be a JSON object")
    return body


def _refuse_unsupported(body: Mapping[str, Any], table: Mapping[str, tuple[object, ...]]) -> None:
    for name, defaults in table.items():
        value = body.get(name)
        if not any(value == d and type(value) is type(d) for d in defaults):
            raise BadRequest(name, f"is not supported by this server (got {value!r})")


def _common(body: Mapping[str, Any]) -> inference_pb2.GenerateRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model", "is required: one of the ids GET /v1/models returns")
    _text(model, "model")
    n = body.get("n")
    if n is not None and (_integer(n, "n") != 1):
        raise BadRequest("n", f"only n=1 is supported (got {n})")
    if not isinstance(body.get("user", ""), str):
        raise BadRequest("user", "must be a string")
    request = inference_pb2.GenerateRequest(model=model)
    max_param = _max_tokens_param(body)
    if body.get(max_param) is not None:
        request.max_tokens = _int32(body[max_param], max_param)
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            setattr(request, name, _number(body[name], name))
    for name in ("top_k", "min_tokens"):
        if body.get(name) is not None:
            setattr(request, name, _int32(body[name], name))
    if request.HasField("top_k") and request.top_k == -1:
        request.top_k = 0  # vLLM's "off", which clients written for vLLM send; 0 here
    if body.get("seed") is not None:
        seed = _integer(body["seed"], "seed")
        if not 0 <= seed < 2**63:
            raise BadRequest("seed", f"must be in [0, 2^63), got {seed}")
        request.seed = seed
    request.stop.extend(_stop(body.get("stop")))
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None:
        if not isinstance(ignore_eos, bool):
            raise BadRequest("ignore_eos", "must be true or false")
        request.ignore_eos = ignore_eos
    return request


def _finish(body: Mapping[str, Any], request: inference_pb2.GenerateRequest) -> OpenAIRequest:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("stream", "must be true or false")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise BadRequest("stream_options", "must be an object")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise BadRequest("stream_options.include_usage", "must be true or false")
        if not stream:  # as OpenAI answers: the options would silently do nothing
            raise BadRequest("stream_options", "is only allowed when stream is true")
    return OpenAIRequest(request, bool(stream), include_usage, _max_tokens_param(body))


def _max_tokens_param(body: Mapping[str, Any]) -> str:
    """``max_completion_tokens`` (OpenAI's current name) wins over ``max_tokens``."""
    return (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else ("max_tokens")
    )


def _set_prompt(request: inference_pb2.GenerateRequest, prompt: Any) -> None:
    if isinstance(prompt, list) and prompt and not _is_token_list(prompt):
        if len(prompt) != 1:
            raise BadRequest(
                "prompt", f"only one prompt per request is supported (got {len(prompt)})"
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        request.prompt = _text(prompt, "prompt")
    elif isinstance(prompt, list) and _is_token_list(prompt):
        if any(not 0 <= t < 2**32 for t in prompt):
            raise BadRequest("prompt", "token ids must be in [0, 2^32)")
        request.prompt_token_ids.extend(prompt)
    else:
        raise BadRequest("prompt", "is required: a string or a non-empty list of token ids")


def _is_token_list(value: list[Any]) -> bool:
    return bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _message(message: Any, where: str) -> tuple[str, str]:
    if not isinstance(message, dict):
        raise BadRequest(where, "must be an object with role and content")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise BadRequest(f"{where}.role", "is required")
    _text(role, f"{where}.role")
    if message.get("tool_calls"):
        raise BadRequest(f"{where}.tool_calls", "tool calls are not supported by this server")
    content = message.get("content")
    if content is None:
        return role, ""
    if isinstance(content, str):
        return role, _text(content, f"{where}.content")
    if isinstance(content, list):
        return role, "\n".join(
            _text_part(part, f"{where}.content[{i}]") for i, part in enumerate(content)
        )
    raise BadRequest(f"{where}.content", "must be a string or a list of text parts")


def _text_part(part: Any, where: str) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return _text(part["text"], f"{where}.text")
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    raise BadRequest(where, f"only text parts are supported (got {kind!r})")


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        stop = [_text(value, "stop")]
    elif isinstance(value, list) and all(isinstance(s, str) for s in value):
        stop = value
    else:
        raise BadRequest("stop", "must be a string or a list of strings")
    try:  # the engine's bounds, before a long list is copied anywhere
        check_stop_strings(stop)
    except InvalidRequestError as error:
        raise BadRequest("stop", error.description) from None
    return [_text(s, f"stop[{i}]") for i, s in enumerate(stop)]


def _text(value: str, name: str) -> str:
    """``value``, if it is text protobuf can carry. JSON allows an escaped lone UTF-16
    surrogate ("\\ud83d": a browser front-end cutting a string inside an emoji sends one),
    which no UTF-8 string can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        surrogate = f"\\u{ord(value[e.start]):04x}"
        raise BadRequest(
            name, f"is not valid Unicode: a lone surrogate ({surrogate}) at character {e.start}"
        ) from None
    return value


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(name, f"must be an integer, got {value!r}")
    return value


def _int32(value: Any, name: str) -> int:
    number = _integer(value, name)
    if not -(2**31) <= number < 2**31:
        raise BadRequest(name, f"is out of range: {number}")
    return number


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(name, f"must be a number, got {value!r}")
    return float(value)

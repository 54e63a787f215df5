"""Admission: turn a client's GenerateRequest into a checked, tokenized request.

Every check that can fail without a worker happens here, before any worker is
picked, so a bad request costs no worker time and fails with INVALID_ARGUMENT
naming the field (or NOT_FOUND for a model nobody serves). The defaults of
unset sampling fields are SamplingParams' (max_tokens 16, temperature 1.0,
top_p 1.0, ...), the same the proto documents and the workers apply.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.engine.block_hash import BlockHash, hash_prefix_blocks
from services.engine.chat_template import ChatTemplate, load_chat_template
from services.engine.errors import InvalidRequestError
from services.engine.model_source import resolve_model
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import Tokenizer
from services.router.errors import RouteError
from services.router.registry import WorkerRegistry
from services.rpc.requests import sampling_params
from services.stubs.tandem.v1 import inference_pb2


@dataclass(frozen=True)
class AdmittedRequest:
    """A request that passed every check; ``template`` is never mutated."""

    request_id: str
    """The client's request_id, or a uuid4 hex assigned here."""
    model: str
    prompt_token_ids: tuple[int, ...]
    """The prompt as the client gave it or as the model's tokenizer encoded it."""
    params: SamplingParams
    """The effective sampling parameters (defaults filled in), validated."""
    max_context_length: int
    """The model's context (the smallest among its workers) when admitted."""
    template: inference_pb2.GenerateRequest
    """The client's request with ``prompt`` and ``messages`` cleared, ``prompt_token_ids`` and
    ``request_id`` set, sampling fields exactly as the client set them."""
    block_size: int = 0
    """Tokens per KV block of the model's workers (0: none was alive to say)."""
    model_id: str = ""
    """The model identity the workers hash blocks with (KVLayout.model_id)."""
    block_hashes: tuple[BlockHash, ...] = ()
    """Chained hashes of the prompt's full blocks (hash_prefix_blocks, the engines'
    function), computed once here; the router looks them up in its prefix index."""


class TokenizerCache:
    """One Tokenizer and one ChatTemplate per model name, loaded off the event loop on
    first use."""

    def __init__(self, locate: Callable[[str], Path] = resolve_model) -> None:
        """``locate`` maps a model name to its directory (default: resolve_model, which
        builds tandem-tiny on first use); only tokenizer.json and configs are read."""
        self._locate = locate
        self._loading: dict[tuple[str, str], asyncio.Future[Any]] = {}

    async def get(self, model: str) -> Tokenizer:
        """The model's tokenizer; raises the TandemError of a model that cannot be found
        or loaded (nothing is cached then, so a later call tries again)."""
        tokenizer: Tokenizer = await self._cached("tokenizer", model)
        return tokenizer

    async def chat_template(self, model: str) -> ChatTemplate:
        """The model's chat template (the plain one when it has none); errors as ``get``."""
        template: ChatTemplate = await self._cached("chat_template", model)
        return template

    async def _cached(self, kind: str, model: str) -> Any:
        key = (kind, model)
        future = self._loading.get(key)
        if future is None:
            future = asyncio.ensure_future(asyncio.to_thread(self._load, kind, model))
            self._loading[key] = future
        try:
            return await asyncio.shield(future)
        except Exception:
            if self._loading.get(key) is future and future.done():
                del self._loading[key]
            raise

    def _load(self, kind: str, model: str) -> Tokenizer | ChatTemplate:
        directory = self._locate(model)
        if kind == "chat_template":
            return load_chat_template(directory)
        return Tokenizer.from_dir(directory)


async def admit(
    request: inference_pb2.GenerateRequest,
    registry: WorkerRegistry,
    tokenizers: TokenizerCache,
) -> AdmittedRequest:
    """Check ``request`` and tokenize its prompt (chat messages through the model's template).

    Raises InvalidRequestError naming the field, RouteError(NOT_FOUND) for a model
    no worker ever served, RouteError(UNAVAILABLE) for one whose workers are all
    gone or, while the router has just started, not registered yet, and the tokenizer's
    TandemError when the router cannot load it.
    """
    if not request.model:
        raise InvalidRequestError("model", "is required: one of the ids ListModels returns")
    has_text, has_ids = bool(request.prompt), len(request.prompt_token_ids) > 0
    has_chat = len(request.messages) > 0
    if has_chat and (has_text or has_ids):
        raise InvalidRequestError(
            "messages", "set exactly one of prompt, prompt_token_ids and messages, not several"
        )
    if has_text and has_ids:
        raise InvalidRequestError(
            "prompt", "set exactly one of prompt and prompt_token_ids, not both"
        )
    if not (has_text or has_ids or has_chat):
        raise InvalidRequestError("prompt", "is empty; set prompt, prompt_token_ids or messages")
    params = sampling_params(request)
    info = registry.model_info(request.model)
    if info is None:
        if registry.was_served(request.model):
            raise RouteError(
                grpc.StatusCode.UNAVAILABLE,
                f"no worker serving model {request.model!r} is alive; retry later",
            )
        if (age := registry.settling_s()) is not None:
            raise RouteError(
                grpc.StatusCode.UNAVAILABLE,
                f"no worker has registered model {request.model!r} yet: this router started "
                f"{age:.1f} s ago and workers join within {registry.heartbeat_timeout_s:g} s; "
                "retry",
            )
        # No list of what is served: behind the gateway a caller sees only the models the
        # policy lets it use (ListModels, filtered), and this message reaches it as it is.
        raise RouteError(
            grpc.StatusCode.NOT_FOUND,
            f"model {request.model!r} is not served here; ListModels lists the models you can use",
        )
    if has_text or has_chat:
        _check_text_size(request, info.max_context_length)
        prompt, field = await _encode(request, tokenizers)
    else:
        prompt = tuple(request.prompt_token_ids)
        field = "prompt_token_ids"
    if len(prompt) >= info.max_context_length:  # before the scan below: it is O(prompt)
        raise InvalidRequestError(
            field,
            f"has {len(prompt)} tokens; the model's context holds {info.max_context_length}, "
            f"so a prompt may have at most {info.max_context_length - 1}",
        )
    bad = next((t for t in prompt if t >= info.vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(
            "prompt_token_ids", f"token id {bad} is outside the vocabulary [0, {info.vocab_size})"
        )
    template = inference_pb2.GenerateRequest()
    template.CopyFrom(request)
    template.ClearField("prompt")
    template.ClearField("messages")
    template.prompt_token_ids[:] = prompt
    template.request_id = request.request_id or uuid.uuid4().hex
    block_size, model_id = _block_layout(registry, request.model)
    return AdmittedRequest(
        request_id=template.request_id,
        model=request.model,
        prompt_token_ids=prompt,
        params=params,
        max_context_length=info.max_context_length,
        template=template,
        block_size=block_size,
        model_id=model_id,
        block_hashes=tuple(prompt_block_hashes(prompt, block_size, model_id)),
    )


MAX_BYTES_PER_TOKEN = 64
"""Text longer than the context times this many UTF-8 bytes cannot fit and is refused
before it is tokenized: natural text averages about 4 bytes a token, and even a prompt made
of a tokenizer's longest whitespace or code tokens stays well below 64."""


def _check_text_size(request: inference_pb2.GenerateRequest, max_context_length: int) -> None:
    """Refuse a text or chat prompt that certainly exceeds the context, without tokenizing
    it: 15 MiB of text took the tokenizer 15 s."""
    limit = max_context_length * MAX_BYTES_PER_TOKEN
    if len(request.messages) > max_context_length:  # each renders as one token at least
        raise InvalidRequestError(
            "messages",
            f"has {len(request.messages)} messages: more than the model's "
            f"{max_context_length}-token context can hold",
        )
    if request.messages:  # roles too: a template may write them out as they are
        size = sum(len(m.role.encode()) + len(m.content.encode()) for m in request.messages)
        field = "messages"
    else:
        size, field = len(request.prompt.encode()), "prompt"
    if size > limit:
        raise InvalidRequestError(
            field,
            f"has {size} bytes of text: more than the model's {max_context_length}-token "
            f"context can hold (at most {limit} bytes are tokenized)",
        )


async def _encode(
    request: inference_pb2.GenerateRequest, tokenizers: TokenizerCache
) -> tuple[tuple[int, ...], str]:
    """The token ids of a text or chat prompt, and the field they came from.

    Rendering and tokenizing run on a thread: on the event loop a long prompt held up
    every other call, and the router missed its workers' heartbeats and dropped them."""
    tokenizer = await tokenizers.get(request.model)
    if not request.messages:
        prompt = tuple(await asyncio.to_thread(tokenizer.encode_releasing_gil, request.prompt))
        if not prompt:
            raise InvalidRequestError("prompt", "encodes to no tokens")
        return prompt, "prompt"
    chat = await tokenizers.chat_template(request.model)
    turns = [(m.role, m.content) for m in request.messages]

    def render_and_encode() -> tuple[int, ...]:
        text = chat.render(turns)
        special = chat.add_special_tokens
        return tuple(tokenizer.encode_releasing_gil(text, add_special_tokens=special))

    prompt = await asyncio.to_thread(render_and_encode)
    if not prompt:
        raise InvalidRequestError("messages", "render to a prompt of no tokens")
    return prompt, "messages"


def prompt_block_hashes(
    token_ids: tuple[int, ...], block_size: int, model_id: str
) -> list[BlockHash]:
    """The chained block hashes the workers would give ``token_ids``; none when the
    layout is unknown (no live worker)."""
    if block_size < 1 or not model_id:
        return []
    return hash_prefix_blocks(token_ids, block_size, model_id)


def _block_layout(registry: WorkerRegistry, model: str) -> tuple[int, str]:
    """(block_size, model_id) of the model's live workers; the registry refuses workers
    of one model that disagree on either. (0, "") when none is alive."""
    for worker in registry.workers():
        if worker.model == model:
            return worker.layout.block_size, worker.layout.model_id
    return 0, ""

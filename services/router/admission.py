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

import grpc

from services.engine.block_hash import BlockHash, hash_prefix_blocks
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
    """The client's request with ``prompt`` cleared, ``prompt_token_ids`` and
    ``request_id`` set, sampling fields exactly as the client set them."""
    block_size: int = 0
    """Tokens per KV block of the model's workers (0: none was alive to say)."""
    model_id: str = ""
    """The model identity the workers hash blocks with (KVLayout.model_id)."""
    block_hashes: tuple[BlockHash, ...] = ()
    """Chained hashes of the prompt's full blocks (hash_prefix_blocks, the engines'
    function), computed once here; the router looks them up in its prefix index."""


class TokenizerCache:
    """One Tokenizer per model name, loaded off the event loop on first use."""

    def __init__(self, locate: Callable[[str], Path] = resolve_model) -> None:
        """``locate`` maps a model name to its directory (default: resolve_model, which
        builds tandem-tiny on first use); only tokenizer.json and configs are read."""
        self._locate = locate
        self._loading: dict[str, asyncio.Future[Tokenizer]] = {}

    async def get(self, model: str) -> Tokenizer:
        """The model's tokenizer; raises the TandemError of a model that cannot be found
        or loaded (nothing is cached then, so a later call tries again)."""
        future = self._loading.get(model)
        if future is None:
            future = asyncio.ensure_future(asyncio.to_thread(self._load, model))
            self._loading[model] = future
        try:
            return await asyncio.shield(future)
        except Exception:
            if self._loading.get(model) is future and future.done():
                del self._loading[model]
            raise

    def _load(self, model: str) -> Tokenizer:
        return Tokenizer.from_dir(self._locate(model))


async def admit(
    request: inference_pb2.GenerateRequest,
    registry: WorkerRegistry,
    tokenizers: TokenizerCache,
) -> AdmittedRequest:
    """Check ``request`` and tokenize its prompt.

    Raises InvalidRequestError naming the field, RouteError(NOT_FOUND) for a model
    no worker ever served, RouteError(UNAVAILABLE) for one whose workers are all
    gone, and the tokenizer's TandemError when the router cannot load it.
    """
    if not request.model:
        raise InvalidRequestError("model", "is required: one of the ids ListModels returns")
    has_text, has_ids = bool(request.prompt), len(request.prompt_token_ids) > 0
    if has_text and has_ids:
        raise InvalidRequestError(
            "prompt", "set exactly one of prompt and prompt_token_ids, not both"
        )
    if not has_text and not has_ids:
        raise InvalidRequestError("prompt", "is empty; set prompt or prompt_token_ids")
    params = sampling_params(request)
    info = registry.model_info(request.model)
    if info is None:
        if registry.was_served(request.model):
            raise RouteError(
                grpc.StatusCode.UNAVAILABLE,
                f"no worker serving model {request.model!r} is alive; retry later",
            )
        served = ", ".join(m.model for m in registry.models()) or "none"
        raise RouteError(
            grpc.StatusCode.NOT_FOUND,
            f"model {request.model!r} is not served here; served models: {served}",
        )
    if has_text:
        tokenizer = await tokenizers.get(request.model)
        prompt = tuple(tokenizer.encode(request.prompt))
        field = "prompt"
        if not prompt:
            raise InvalidRequestError("prompt", "encodes to no tokens")
    else:
        prompt = tuple(request.prompt_token_ids)
        field = "prompt_token_ids"
    bad = next((t for t in prompt if t >= info.vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(
            "prompt_token_ids", f"token id {bad} is outside the vocabulary [0, {info.vocab_size})"
        )
    if len(prompt) >= info.max_context_length:
        raise InvalidRequestError(
            field,
            f"has {len(prompt)} tokens; the model's context holds {info.max_context_length}, "
            f"so a prompt may have at most {info.max_context_length - 1}",
        )
    template = inference_pb2.GenerateRequest()
    template.CopyFrom(request)
    template.ClearField("prompt")
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

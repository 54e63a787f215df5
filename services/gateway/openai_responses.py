"""The JSON objects of OpenAI's completion and chat completion responses, from our messages.

Shapes follow OpenAI's API reference: ``text_completion`` / ``chat.completion`` objects for
whole responses, ``text_completion`` / ``chat.completion.chunk`` objects for stream chunks
(the first chat chunk carries ``delta.role``; the last one with choices carries
``finish_reason``; with ``stream_options.include_usage`` a final chunk has ``choices: []``
and ``usage``). ``usage.prompt_tokens_details.cached_tokens`` is the prefix-cache hit count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from services.stubs.tandem.v1 import inference_pb2

FINISH_REASONS = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
}
"""The finish reasons OpenAI has; CANCELLED and ERROR end the request with an error instead."""


@dataclass(frozen=True)
class Shape:
    """What every object of one response shares."""

    chat: bool
    """A chat completion (else a text completion)."""
    request_id: str
    """The gateway's request id (the ledger's); the OpenAI id is derived from it."""
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    """Unix seconds, the same on every chunk."""

    @property
    def id(self) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{self.request_id}"

    def _base(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def usage(final: inference_pb2.GenerateResponse) -> dict[str, Any]:
    counts = final.usage
    return {
        "prompt_tokens": counts.prompt_tokens,
        "completion_tokens": counts.completion_tokens,
        "total_tokens": counts.prompt_tokens + counts.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": counts.cached_tokens},
    }


def completion(shape: Shape, text: str, final: inference_pb2.GenerateResponse) -> dict[str, Any]:
    """The whole (non-streamed) response."""
    reason = FINISH_REASONS[final.finish_reason]
    if shape.chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": reason,
        }
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        kind = "text_completion"
    return {**shape._base(kind), "choices": [choice], "usage": usage(final)}


def chunk(shape: Shape, text: str, finish_reason: str | None = None) -> dict[str, Any]:
    """One stream chunk with new text (and, on the last, why it ended)."""
    if shape.chat:
        delta = {"content": text} if text or finish_reason is None else {}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**shape._base("chat.completion.chunk"), "choices": [choice]}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {**shape._base("text_completion"), "choices": [choice]}


def role_chunk(shape: Shape) -> dict[str, Any]:
    """The first chat chunk, announcing the assistant's turn."""
    delta = {"role": "assistant", "content": ""}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
    return {**shape._base("chat.completion.chunk"), "choices": [choice]}


def usage_chunk(shape: Shape, final: inference_pb2.GenerateResponse) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, usage."""
    kind = "chat.completion.chunk" if shape.chat else "text_completion"
    return {**shape._base(kind), "choices": [], "usage": usage(final)}


def model_card(card: inference_pb2.ModelCard, owned_by: str) -> dict[str, Any]:
    """A ``model`` object; ``max_model_len`` is vLLM's name for the context length."""
    return {
        "id": card.id,
        "object": "model",
        "created": 0,
        "owned_by": owned_by,
        "max_model_len": card.max_context_length,
    }

"""What the engine reports per request: streamed deltas, a finish reason and usage."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(enum.Enum):
    """Why a request ended; mirrors ``tandem.v1.FinishReason``."""

    STOP = "stop"
    """An EOS token or a stop string ended it."""
    LENGTH = "length"
    """It reached max_tokens or the model's context length."""
    CANCELLED = "cancelled"
    """The caller aborted it."""
    ERROR = "error"
    """The engine failed while running it."""


@dataclass(frozen=True)
class Usage:
    """Token accounting for one request."""

    prompt_tokens: int
    """Tokens in the prompt."""
    completion_tokens: int
    """Tokens generated (every token streamed back)."""
    cached_tokens: int
    """Prompt tokens whose KV came from the prefix cache instead of being computed."""


@dataclass(frozen=True)
class HeldKV:
    """A prefilled prompt's blocks, pinned until a decode worker has read them."""

    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int
    """Tokens of KV in the blocks (the prompt length)."""
    expires_at: float
    """time.monotonic() after which the blocks are released unread."""


@dataclass(frozen=True)
class RequestOutput:
    """One delta of a request's stream; the last one carries finish_reason and usage, the
    first one (its first generated token) usage too: its cached tokens are known then, and a
    router resuming a stream that died before its end still learns them."""

    request_id: str
    token_ids: tuple[int, ...]
    """Tokens new since the previous delta."""
    text: str
    """Text new since the previous delta (held back while a stop string may be forming)."""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    held: HeldKV | None = None
    """On the last delta of a prefill-only request: its blocks, pinned from then on. The
    prefill worker's answer is built from it, with no second trip to the engine thread."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

"""Per-request sampling parameters, validated once at admission (no torch here)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.engine.errors import InvalidRequestError

GREEDY_BELOW = 1e-5
"""Temperatures below this are decoded greedily (see ``SamplingParams.temperature``)."""
MAX_STOP_STRINGS = 16
"""Most stop strings one request may give (OpenAI takes 4): every new token's text is
searched for each of them on the engine thread, which every request shares."""
MAX_STOP_CHARS = 1024
"""Longest stop string, in characters: text that may begin one is held back that long."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop."""

    max_tokens: int = 16
    """Most tokens to generate; must be at least 1."""
    min_tokens: int = 0
    """EOS and stop strings are ignored until this many tokens exist."""
    temperature: float = 1.0
    """0 selects greedy decoding; otherwise logits are divided by it.

    Any temperature below ``GREEDY_BELOW`` (1e-5) is decoded greedily too: dividing
    logits by, say, 1.4e-45 (a valid float32) overflows to inf/NaN, and at such a
    temperature the distribution is already argmax up to ties."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose mass reaches top_p, in (0, 1]."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens, whatever else is batched."""
    stop: tuple[str, ...] = field(default=())
    """Generation stops when the text contains one of these; it is not included in the text."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks use it to fix output length)."""

    @property
    def greedy(self) -> bool:
        """Decoded by argmax: temperature 0, or below ``GREEDY_BELOW``."""
        return self.temperature < GREEDY_BELOW

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first field out of range."""
        if self.max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise InvalidRequestError("min_tokens", f"must be 0 or more, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                "min_tokens",
                f"must not exceed max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(
                "temperature", f"must be a finite number ≥ 0, got {self.temperature}"
            )
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be 0 (off) or more, got {self.top_k}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InvalidRequestError("seed", f"must be in [0, 2^63), got {self.seed}")
        check_stop_strings(self.stop)


def check_stop_strings(stop: tuple[str, ...] | list[str]) -> None:
    """InvalidRequestError("stop", ...) unless ``stop`` has at most ``MAX_STOP_STRINGS``
    strings, each non-empty and at most ``MAX_STOP_CHARS`` characters."""
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(
            "stop", f"gives {len(stop)} stop strings; at most {MAX_STOP_STRINGS} are allowed"
        )
    for s in stop:
        if not s:
            raise InvalidRequestError("stop", "stop strings must not be empty")
        if len(s) > MAX_STOP_CHARS:
            raise InvalidRequestError(
                "stop", f"a stop string has {len(s)} characters; at most {MAX_STOP_CHARS}"
            )

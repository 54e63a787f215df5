"""A request's output text as it streams: incremental detokenization and stop strings.

Text that could still turn out to be the start of a stop string is held back
until it cannot, so a client never receives text that is later retracted. When
a stop string appears, the text ends just before it (the stop string itself is
not returned, as in the OpenAI API); the token that completed it is still
counted and returned as a token id.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.engine.tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    CONTEXT_TOKENS = 8
    """Prompt tokens kept as the detokenizer's context (it reads the last few)."""

    def __init__(
        self, tokenizer: Tokenizer, stop: tuple[str, ...], prompt: Sequence[int] = ()
    ) -> None:
        """``prompt``: context only, never part of the text (the first generated token
        is decoded after it, as it would be read after the prompt)."""
        self._detok = IncrementalDetokenizer(tokenizer, prompt[-self.CONTEXT_TOKENS :])
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._text = ""
        self._sent = 0  # characters of _text already returned

    def push(self, token_id: int, check_stop: bool) -> tuple[str, bool]:
        """Add one token; returns (text safe to send now, whether a stop string ended it)."""
        before = len(self._text)
        self._text += self._detok.push([token_id])
        if check_stop and self._stop:
            cut = self._find_stop(before)
            if cut is not None:
                delta = self._text[self._sent : cut]
                self._text = self._text[:cut]
                self._sent = cut
                return delta, True
        safe = max(self._sent, len(self._text) - self._hold)
        delta = self._text[self._sent : safe]
        self._sent = safe
        return delta, False

    def finish(self) -> str:
        """Everything held back, once the request ends for a reason other than a stop string."""
        self._text += self._detok.flush()
        delta = self._text[self._sent :]
        self._sent = len(self._text)
        return delta

    @property
    def text(self) -> str:
        return self._text

    def _find_stop(self, before: int) -> int | None:
        # Only a match ending in the new text (past ``before``) counts: one that completed
        # earlier did so while stops were not checked (min_tokens), even if it is still
        # held back for a longer stop string. The earliest such match wins.
        found = [
            i
            for s in self._stop
            if (i := self._text.find(s, max(self._sent, before - len(s) + 1))) >= 0
        ]
        return min(found) if found else None

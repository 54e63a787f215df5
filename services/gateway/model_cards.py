"""The served models' facts (context length), from the router's ListModels, briefly cached.

The OpenAI chat API lets a reply run to the end of the context when ``max_tokens`` is
unset; the gateway turns that into an explicit ``max_tokens`` of the model's context
length (the engine stops at the context anyway), and reserves it. Asking the router per
request would add a round trip to every such call, so the cards are kept for ``ttl_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from services.stubs.tandem.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

CARDS_TTL_S = 10.0
"""How long the router's model list is reused: models come and go with workers."""
CARDS_TIMEOUT_S = 5.0
"""Longest wait for the router's model list (a router that does not answer fails the call
soon after anyway)."""
MISS_REFRESH_S = 1.0
"""A model not in the list is looked for again after this long at the soonest: a newly
served one is found quickly, and a caller naming unknown models cannot make every one of
its requests a ListModels."""


WARN_EVERY_S = 60.0
"""A ListModels that keeps failing is logged as a warning at most this often."""


class ModelCards:
    """Context lengths of the models the router serves, refreshed at most every ``ttl_s``,
    and asked again at most every MISS_REFRESH_S whatever the outcome (a router that fails
    or hangs is not asked once per waiting request)."""

    def __init__(self, router: inference_pb2_grpc.InferenceStub, ttl_s: float = CARDS_TTL_S):
        self._router = router
        self._ttl_s = ttl_s
        self._contexts: dict[str, int] = {}
        self._fetched = float("-inf")  # the last list that came back
        self._asked = float("-inf")  # the last ListModels, answered or not
        self._warned = float("-inf")  # the last failure logged as a warning
        self._lock = asyncio.Lock()  # one ListModels at a time, whoever asks
        self._background: asyncio.Task[None] | None = None

    async def context_length(self, model: str, timeout_s: float | None) -> int | None:
        """``model``'s context length; None when the router does not serve it or cannot be
        asked (the request then goes on, and the router says what is wrong)."""
        if self._stale(model):
            async with self._lock:
                if self._stale(model):  # not refreshed while this call waited
                    await self._refresh(timeout_s)
        return self._contexts.get(model)

    def cached(self, model: str) -> int | None:
        """``model``'s context length as last listed, without waiting: a stale list is
        refreshed in the background for the next caller."""
        if self._stale(model) and self._background is None and not self._lock.locked():
            self._background = asyncio.ensure_future(self._refresh_in_background())
        return self._contexts.get(model)

    async def _refresh_in_background(self) -> None:
        try:
            async with self._lock:
                await self._refresh(CARDS_TIMEOUT_S)
        finally:
            self._background = None

    async def close(self) -> None:
        """Cancel a background refresh in flight."""
        if self._background is not None:
            self._background.cancel()
            await asyncio.gather(self._background, return_exceptions=True)

    def _stale(self, model: str) -> bool:
        now = time.monotonic()
        if now - self._asked <= MISS_REFRESH_S:
            return False
        age = now - self._fetched
        return age > self._ttl_s or model not in self._contexts

    async def _refresh(self, timeout_s: float | None) -> None:
        # ``_asked`` is set when the answer (or failure) is in, not when the ask begins: a
        # caller arriving meanwhile must wait on the lock for the list, not go on without it.
        try:
            served = await self._router.ListModels(
                inference_pb2.ListModelsRequest(), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as error:
            # asked again every MISS_REFRESH_S while it fails: said once a minute, not each time
            quiet = time.monotonic() - self._warned < WARN_EVERY_S
            log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "could not list the router's models: %s",
                error.details(),
            )
            self._warned = self._warned if quiet else time.monotonic()
            return  # the last list stands; asked again after MISS_REFRESH_S
        finally:
            self._asked = time.monotonic()
        self._contexts = {m.id: m.max_context_length for m in served.models}
        self._fetched = time.monotonic()

"""Graceful shutdown of a worker: refuse new work, finish what it holds, then exit.

On SIGTERM (a rolling update, ``docker compose stop``, ``tandem up`` closing) a
worker closes its ``CallGate``: new Prefill and Decode calls are refused with
UNAVAILABLE, which the router takes as "try another worker", while the calls
already in flight run to their end. The heartbeat tells the router at once, so
it stops placing requests here instead of learning it from refusals or, worse,
from a heartbeat timeout. KV reads and releases are not gated: a decode worker
elsewhere may still be pulling a prompt this prefill worker holds.

The worker is idle, and exits, when no gated call runs and the engine holds no
unread prefill (``wait_idle``); a drain timeout bounds the wait so a stuck
client cannot hold a rolling update forever (the calls still running are then
cut, and the router resumes them elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from services.engine.errors import TandemError
from services.rpc.status import abort_with

POLL_S = 0.05
"""How often ``wait_idle`` asks the engine whether it still holds work."""


class DrainingError(TandemError):
    """The worker is shutting down and takes no new requests (UNAVAILABLE: retry elsewhere)."""

    grpc_code = "UNAVAILABLE"

    def __init__(self, worker_id: str) -> None:
        super().__init__(
            f"worker {worker_id} is draining (shutting down): it finishes its requests "
            "and takes no new ones; send this one to another worker"
        )


class CallGate:
    """Counts the data-plane calls in flight and refuses new ones once closed."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self._active = 0
        self._closed = False
        self._changed = asyncio.Event()

    @property
    def active(self) -> int:
        """Gated calls running now."""
        return self._active

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Refuse every call from now on; the ones running go on."""
        self._closed = True
        self._changed.set()

    @contextlib.asynccontextmanager
    async def admit(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Run the block as one gated call, or end the call with UNAVAILABLE when closed."""
        if self._closed:
            await abort_with(context, DrainingError(self.worker_id))
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            self._changed.set()

    async def wait_idle(self, busy: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
        """Wait until no gated call runs and ``busy()`` (the engine's own work: prefills
        held for a reader) is False; False if ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._until_idle(busy), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _until_idle(self, busy: Callable[[], Awaitable[bool]]) -> None:
        while self._active or await busy():
            self._changed.clear()
            # A call ending wakes us at once; the engine's work is polled.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), POLL_S)

"""Graceful shutdown of a service: refuse new work, finish what it has, then exit.

On SIGTERM (a rolling update, ``docker compose stop``, ``tandem up`` closing) a
service closes its ``CallGate``: new calls are refused with UNAVAILABLE ("retry:
another replica takes it"), while the calls already in flight run to their end.
The server itself keeps listening meanwhile: gRPC's own graceful stop answers a
call that arrives during it with CANCELLED, which clients do not retry, and
stops the heartbeats and KV reads that the calls in flight still need.

Workers gate Prefill and Decode (not KV reads and releases: a decode worker
elsewhere may still be pulling a prompt a draining prefill worker holds); the
router and the gateway gate Generate. ``wait_idle`` returns once no gated call
runs and the service's own outstanding work (``busy``: a worker's pinned
prefills) is done; a drain timeout bounds the wait so a stuck client cannot
hold a rolling update forever (what still runs is then cut, and the router
resumes it elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import grpc

from services.engine.errors import TandemError
from services.rpc.shutdown import first_of
from services.rpc.status import abort_with

if TYPE_CHECKING:
    from services.rpc.server import RunningServer

T = TypeVar("T")

DEFAULT_DRAIN_TIMEOUT_S = 25.0
"""Every service's ``--drain-timeout-s``: below Kubernetes' default 30 s grace period and
compose's ``stop_grace_period: 30s`` (deploy/)."""
POLL_S = 0.05
"""How often ``wait_idle`` asks ``busy`` whether the service still holds work."""


class DrainingError(TandemError):
    """The service is shutting down and takes no new calls (UNAVAILABLE: retry elsewhere)."""

    grpc_code = "UNAVAILABLE"

    def __init__(self, name: str) -> None:
        super().__init__(
            f"{name} is draining (shutting down): it finishes the calls it has and takes no "
            "new ones; retry, and another replica takes this one"
        )


async def _nothing_else() -> bool:
    return False


class CallGate:
    """Counts the calls in flight and refuses new ones once closed."""

    def __init__(self, name: str) -> None:
        self.name = name
        """Who refuses, in the refusal's message ("worker decode-0", "the router")."""
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
            await abort_with(context, DrainingError(self.name))
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            self._changed.set()

    async def stream(
        self, context: grpc.aio.ServicerContext, messages: AsyncIterator[T]
    ) -> AsyncIterator[T]:
        """Relay a response stream as one gated call (refused with UNAVAILABLE when closed).
        ``messages`` is closed when the call ends, cancelled included, so its own cleanup
        (a settle, a release) runs then, not whenever it is garbage collected."""
        async with self.admit(context), _closing(messages):
            async for message in messages:
                yield message

    async def wait_idle(
        self, timeout_s: float, busy: Callable[[], Awaitable[bool]] = _nothing_else
    ) -> bool:
        """Wait until no gated call runs and ``busy()`` (the service's own outstanding work)
        is False; False if ``timeout_s`` passed first (0: whether that holds now)."""
        if timeout_s <= 0:
            return not self._active and not await busy()
        try:
            async with asyncio.timeout(timeout_s):
                await self._until_idle(busy)
        except TimeoutError:
            return False
        return True

    async def _until_idle(self, busy: Callable[[], Awaitable[bool]]) -> None:
        while self._active or await busy():
            self._changed.clear()
            # A call ending wakes us at once; ``busy`` is polled.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._changed.wait()


def _closing(messages: AsyncIterator[T]) -> contextlib.AbstractAsyncContextManager[object]:
    """Closes ``messages`` on exit when it can be closed (an async generator)."""
    if hasattr(messages, "aclose"):
        return contextlib.aclosing(messages)  # type: ignore[type-var]
    return contextlib.nullcontext()


async def drain_server(
    server: RunningServer,
    gate: CallGate,
    timeout_s: float,
    busy: Callable[[], Awaitable[bool]] = _nothing_else,
) -> bool:
    """Close ``gate``, answer health checks NOT_SERVING (the server keeps listening), and
    wait until idle (``CallGate.wait_idle``); False when ``timeout_s`` passed first."""
    gate.close()
    await server.health.enter_graceful_shutdown()
    return await gate.wait_idle(timeout_s, busy)


async def drained_unless(drain: Awaitable[bool], interrupt: asyncio.Event | None) -> bool:
    """``drain``'s answer, or False as soon as ``interrupt`` is set (a second SIGTERM: an
    operator who will not wait for the streams); the drain is cancelled then."""
    if interrupt is None:
        return await drain
    waiting = asyncio.ensure_future(drain)
    await first_of(waiting, interrupt.wait())
    return waiting.done() and not waiting.cancelled() and waiting.result()


def interrupted(interrupt: asyncio.Event | None) -> bool:
    """Whether a drain was cut short by a second signal (rather than its timeout)."""
    return interrupt is not None and interrupt.is_set()


def why_cut(interrupt: asyncio.Event | None) -> str:
    """Why a drain ended with calls still in flight, for its log line."""
    return "signalled again" if interrupted(interrupt) else "drain timeout"

"""Until SIGINT or SIGTERM: how every ``tandem <service>`` process waits before draining."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Ctrl-C, and what supervisors (compose, Kubernetes, ``tandem up``) send to stop a service."""


@asynccontextmanager
async def shutdown_signals(stop: asyncio.Event | None = None) -> AsyncIterator[asyncio.Event]:
    """An event set by SIGINT/SIGTERM while the block runs (``stop`` if given, so code can
    set it too); the handlers are removed on the way out, draining included."""
    event = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in SIGNALS:
        loop.add_signal_handler(sig, event.set)
    try:
        yield event
    finally:
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)


async def first_of(*awaitables: Awaitable[object], timeout: float | None = None) -> None:
    """Wait until one of ``awaitables`` is done (or ``timeout`` s pass), then cancel the
    rest: a signal, a stop event and a drain racing each other."""
    waits = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def serve_until_signalled(
    stop: Callable[[asyncio.Event | None], Awaitable[None]],
    log: logging.Logger,
    draining: str,
    drain_timeout_s: float,
) -> None:
    """Wait for SIGINT/SIGTERM, log ``draining`` (what the service does now) with its
    bound, then ``await stop(interrupt)`` with the handlers still installed: a second signal
    sets ``interrupt`` (stop now, cut the drain short) instead of killing the process
    mid-drain, so the calls it cuts are still metered and its stores closed. If the wait
    ends any other way (cancelled, an error), ``stop(None)`` still runs."""
    stopping = False
    try:
        async with shutdown_signals() as signalled:
            await signalled.wait()
            signalled.clear()
            log.info("%s (at most %g s; signal again to stop now)", draining, drain_timeout_s)
            stopping = True
            await stop(signalled)
    finally:
        if not stopping:
            await stop(None)

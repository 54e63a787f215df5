"""A TLS channel that follows its certificate's renewals.

gRPC fixes a channel's credentials when it is made, and Tandem's channels live as long as
the process (the gateway's to the router, the router's to each worker, a worker's to the
router and its peers). After cert-manager renews the files, such a channel would keep
presenting the old certificate on every reconnection, until it expired and every new
connection failed. ``RenewingChannel`` is a ``grpc.aio.Channel`` whose calls go to an inner
channel made from the files' current generation (services/rpc/tls.py); when they are renewed,
the next call makes a new inner channel, and the old one is kept ``CLOSE_GRACE_S`` for the
calls still on it, then closed. Stubs made once keep working: their methods look the inner
channel up on each call, which costs a comparison while nothing changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc

from services.rpc.tls import TlsConfig, generation

CLOSE_GRACE_S = 60.0
"""How long a replaced inner channel is kept for its calls (a long token stream, say)."""


class RenewingChannel(grpc.aio.Channel):
    def __init__(self, tls: TlsConfig, make: Callable[[], grpc.aio.Channel]) -> None:
        """``make`` builds an inner channel with the credentials of the moment."""
        self._tls = tls
        self._make = make
        self._generation = generation(tls)
        self._inner = make()
        self._retired: dict[asyncio.Task[None], grpc.aio.Channel] = {}  # closing gracefully
        self._stale: list[grpc.aio.Channel] = []  # replaced outside an event loop

    def current(self) -> grpc.aio.Channel:
        """The inner channel for the files' current generation (made anew after a renewal)."""
        renewed = generation(self._tls)
        if renewed != self._generation:
            old, self._inner, self._generation = self._inner, self._make(), renewed
            try:
                task = asyncio.get_running_loop().create_task(_retire(old))
            except RuntimeError:
                self._stale.append(old)
            else:
                self._retired[task] = old
                task.add_done_callback(lambda t: self._retired.pop(t, None))
        return self._inner

    def unary_unary(self, method: str, **kwargs: Any) -> Any:
        return _Method(self, "unary_unary", method, kwargs)

    def unary_stream(self, method: str, **kwargs: Any) -> Any:
        return _Method(self, "unary_stream", method, kwargs)

    def stream_unary(self, method: str, **kwargs: Any) -> Any:
        return _Method(self, "stream_unary", method, kwargs)

    def stream_stream(self, method: str, **kwargs: Any) -> Any:
        return _Method(self, "stream_stream", method, kwargs)

    async def close(self, grace: float | None = None) -> None:
        """Close the inner channel and any replaced one still in its grace, all within
        ``grace``."""
        for task in self._retired:
            task.cancel()  # its grace cut short: closed below like the rest
        older, self._stale = [*self._stale, *self._retired.values()], []
        self._retired.clear()
        await asyncio.gather(self._inner.close(grace), *(c.close(grace) for c in older))

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._inner.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._inner.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.current().channel_ready()

    async def __aenter__(self) -> RenewingChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close(None)


async def _retire(old: grpc.aio.Channel) -> None:
    """Give a replaced channel's calls CLOSE_GRACE_S, then close it (cancelling what is left).
    Not ``old.close(CLOSE_GRACE_S)``: a close cannot be cut short once begun (a second
    close returns at once, and cancelling the first leaves its calls running)."""
    await asyncio.sleep(CLOSE_GRACE_S)
    await old.close(None)  # no grace: no await inside, so never interrupted half-way


class _Method:
    """One RPC method of a stub: made on the inner channel, again when that is replaced."""

    def __init__(self, channel: RenewingChannel, kind: str, method: str, kwargs: Any) -> None:
        self._channel, self._kind, self._method, self._kwargs = channel, kind, method, kwargs
        self._inner: grpc.aio.Channel | None = None
        self._bound: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inner = self._channel.current()
        if inner is not self._inner:
            self._bound = getattr(inner, self._kind)(self._method, **self._kwargs)
            self._inner = inner
        return self._bound(*args, **kwargs)

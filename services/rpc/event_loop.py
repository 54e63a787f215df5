"""The event loop every long-running Tandem service runs on: uvloop.

grpc.aio relays each streamed message through the event loop, and the router and the
gateway relay every token message: on uvloop a bare Python gRPC hop adds 1.97 ms instead
of 2.42 ms to an 8-message stream, and the gateway serves ~1,030 instead of ~730 requests
per core (bench/gateway/README.md, same machine, same run).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a fresh uvloop event loop (like ``asyncio.run``)."""
    import uvloop

    return uvloop.run(main)

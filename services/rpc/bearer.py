"""Send ``authorization: Bearer <credential>`` on every call of a client channel.

Clients of the gateway (``tandem generate --target``, ``tandem bench serve``) hold one API key
or token for the whole channel; interceptors add it to each call so that no call site can
forget it. The credential lives only in these objects: it is never logged, ``repr`` hides it.

grpc.aio files an interceptor under the first interceptor type it is an instance of, so
unary and server-streaming calls need one object each (:func:`bearer_interceptors`).
"""

from __future__ import annotations

from typing import Any

import grpc.aio


class _Bearer:
    def __init__(self, credential: str) -> None:
        self._value = f"Bearer {credential}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<credential hidden>)"

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add("authorization", self._value)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class UnaryBearer(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request) -> Any:  # type: ignore[no-untyped-def]
        return await continuation(self._details(client_call_details), request)


class StreamBearer(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request) -> Any:  # type: ignore[no-untyped-def]
        return await continuation(self._details(client_call_details), request)


def bearer_interceptors(credential: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors adding ``authorization: Bearer <credential>`` to unary and streaming calls."""
    return [UnaryBearer(credential), StreamBearer(credential)]

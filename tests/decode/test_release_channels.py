"""The decode worker's channels to prefill workers (its ReleaseKV calls) are bounded like
the KV reader's peers: past MAX_PEERS addresses the least recently used is closed, after its
calls. Prefill workers come and go at new addresses; each one kept a channel for ever."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import grpc

from services.decode import service as decode_service
from services.decode.service import DecodeService
from services.kv_transfer.client import KVReader
from services.kv_transfer.grpc_transport import GrpcTransport
from tests.kv_transfer.helpers import layout_of, make_kv


def test_the_least_recently_used_channel_is_closed_past_the_bound(monkeypatch: Any) -> None:
    monkeypatch.setattr(decode_service, "MAX_PEERS", 2)

    async def body() -> None:
        kv = make_kv(8)
        reader = KVReader("decode-0", layout_of(kv), GrpcTransport(kv))
        service = DecodeService(
            cast(Any, None), "decode-0", reader, 1.0, cast(Any, None), cast(Any, None), model="m"
        )
        a = service._channel("127.0.0.1:1")
        b = service._channel("127.0.0.1:2")
        assert service._channel("127.0.0.1:1") is a  # reused, and now the most recent
        service._channel("127.0.0.1:3")
        assert list(service._channels) == ["127.0.0.1:1", "127.0.0.1:3"]
        await asyncio.gather(*service._background)  # b closed, with no call left on it
        assert b.get_state() == grpc.ChannelConnectivity.SHUTDOWN
        await service.close()

    asyncio.run(asyncio.wait_for(body(), 20))

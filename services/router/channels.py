"""One gRPC channel per registered worker entry, closed when the entry is removed.

Keyed by (worker id, address): a worker that restarts registers a new entry, and
gets a fresh channel rather than one stuck in reconnect backoff to the dead process.
"""

from __future__ import annotations

import asyncio

import grpc

from services.router.registry import WorkerState
from services.rpc.server import client_channel
from services.rpc.tls import TlsConfig
from services.stubs.tandem.v1 import worker_pb2_grpc


class WorkerChannels:
    """Lazily opened channels and stubs to workers; ``drop`` is a registry remove listener."""

    def __init__(self, tls: TlsConfig | None = None) -> None:
        self._tls = tls
        """The router's TLS identity and the workers' CA (mTLS); None: plaintext."""
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def channel(self, worker: WorkerState) -> grpc.aio.Channel:
        key = (worker.worker_id, worker.address)
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = client_channel(worker.address, tls=self._tls)
        return channel

    def prefill(self, worker: WorkerState) -> worker_pb2_grpc.PrefillWorkerStub:
        return worker_pb2_grpc.PrefillWorkerStub(self.channel(worker))

    def decode(self, worker: WorkerState) -> worker_pb2_grpc.DecodeWorkerStub:
        return worker_pb2_grpc.DecodeWorkerStub(self.channel(worker))

    def drop(self, worker: WorkerState) -> None:
        """Close the worker's channel (in the background; calls on it are cancelled)."""
        channel = self._channels.pop((worker.worker_id, worker.address), None)
        if channel is not None:
            task = asyncio.get_running_loop().create_task(channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every channel; called once the server has stopped."""
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close() for c in channels), *self._closing)

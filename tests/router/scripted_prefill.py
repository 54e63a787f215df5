"""A fake prefill worker (tests/router/fakes.py) whose answers a test rewrites or delays.

``edit`` runs on every successful Prefill answer before it is sent: it may change the
reply (a finish reason, a lease) and await (hold the answer back until the test is ready).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from services.rpc.server import Servicer, start_server
from services.stubs.tandem.v1 import worker_pb2, worker_pb2_grpc
from tests.router.fakes import FakeWorker, _Prefill
from tests.router.harness import Cluster

Edit = Callable[[worker_pb2.PrefillResponse], Awaitable[None]]


class _EditedPrefill(_Prefill):
    def __init__(self, worker: FakeWorker, edit: Edit) -> None:
        super().__init__(worker)
        self.edit = edit

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        reply = await super().Prefill(request, context)
        await self.edit(reply)
        return reply


class ScriptedPrefill(FakeWorker):
    """A fake prefill worker whose answers go through ``edit``."""

    def __init__(self, worker_id: str, edit: Edit) -> None:
        super().__init__(worker_id, worker_pb2.WORKER_ROLE_PREFILL)
        self.edit = edit

    async def start(self) -> ScriptedPrefill:
        servicer = Servicer(
            _EditedPrefill(self, self.edit),
            worker_pb2_grpc.add_PrefillWorkerServicer_to_server,
            "tandem.v1.PrefillWorker",
        )
        self._server = await start_server([servicer])
        return self


async def add_scripted_prefill(c: Cluster, worker_id: str, edit: Edit) -> ScriptedPrefill:
    """Start a ScriptedPrefill and register it with ``c``'s router (stopped with ``c``)."""
    worker = await ScriptedPrefill(worker_id, edit).start()
    c.workers[worker_id] = worker
    await worker.register(c.router.address)
    return worker

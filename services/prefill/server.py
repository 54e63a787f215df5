"""A prefill worker process: PrefillWorker and KVTransfer on one gRPC server."""

from __future__ import annotations

from services.engine.engine import LLMEngine
from services.kv_transfer.factory import make_transport
from services.kv_transfer.layout import describe
from services.kv_transfer.service import PinCheck, servicer
from services.prefill.service import PrefillService
from services.rpc.server import Servicer
from services.stubs.tandem.v1 import worker_pb2 as wpb
from services.stubs.tandem.v1 import worker_pb2_grpc
from services.worker.host import WorkerConfig, WorkerHost, run_worker


async def run(config: WorkerConfig) -> int:
    return await run_worker(config, wpb.WORKER_ROLE_PREFILL, _servicers)


def _servicers(host: WorkerHost) -> list[Servicer]:
    engine = host.engine
    kv = engine.runner.kv_cache
    host.transport = make_transport(host.config.kv_transport, kv, host.worker_id, host.config.tls)

    async def pinned(request_id: str, block_ids: list[int]) -> PinCheck:
        def check(e: LLMEngine) -> PinCheck:
            held = e.held(request_id)
            return PinCheck.of(held.block_ids if held else None, block_ids)

        return await host.loop.call(check)

    prefill = PrefillService(
        host.loop,
        host.worker_id,
        lambda: host.address,
        host.config.lease_s,
        host.metrics,
        host.gate,
        model=host.config.model,
    )
    return [
        Servicer(
            prefill, worker_pb2_grpc.add_PrefillWorkerServicer_to_server, "tandem.v1.PrefillWorker"
        ),
        servicer(
            describe(kv, engine.model_id),
            host.transport,
            pinned,
            host.worker_id,
            served=host.metrics.kv_bytes_served.inc,  # ReadBlocks only: NIXL READs are one-sided
        ),
    ]

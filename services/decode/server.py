"""A decode worker process: DecodeWorker and KVTransfer on one gRPC server."""

from __future__ import annotations

from services.decode.service import DecodeService
from services.kv_transfer.client import KVReader
from services.kv_transfer.factory import make_transport
from services.kv_transfer.layout import describe
from services.kv_transfer.service import PinCheck, servicer
from services.rpc.server import Servicer
from services.stubs.tandem.v1 import worker_pb2 as wpb
from services.stubs.tandem.v1 import worker_pb2_grpc
from services.worker.host import WorkerConfig, WorkerHost, run_worker


async def run(config: WorkerConfig) -> int:
    return await run_worker(config, wpb.WORKER_ROLE_DECODE, _servicers)


def _servicers(host: WorkerHost) -> list[Servicer]:
    engine = host.engine
    kv = engine.runner.kv_cache
    layout = describe(kv, engine.model_id)
    tls = host.config.tls
    host.transport = make_transport(host.config.kv_transport, kv, host.worker_id, tls)
    reader = KVReader(host.worker_id, layout, host.transport, tls)
    decode = DecodeService(
        host.loop,
        host.worker_id,
        reader,
        host.config.kv_timeout_s,
        host.metrics,
        host.gate,
        host.config.kv_room_wait_s,
        model=host.config.model,
    )
    host.on_stop(decode.close)  # its channels to prefill workers, releases in flight

    def nothing_pinned(request_id: str, block_ids: list[int]) -> PinCheck:
        return PinCheck.of(None, block_ids)  # decode workers hand no KV out (yet)

    return [
        Servicer(
            decode, worker_pb2_grpc.add_DecodeWorkerServicer_to_server, "tandem.v1.DecodeWorker"
        ),
        servicer(layout, host.transport, nothing_pinned, host.worker_id),
    ]

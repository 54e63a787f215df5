"""tandem.v1.DecodeWorker: read a prompt's KV from a prefill worker, stream the rest."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass

import grpc

from services.decode.room import RoomWaiter
from services.engine.engine import LLMEngine, TransferTarget
from services.engine.errors import InvalidRequestError, TandemError
from services.kv_transfer.client import MAX_PEERS, KVReader
from services.kv_transfer.errors import KVTransferError
from services.rpc.drain import CallGate
from services.rpc.requests import (
    check_model,
    prompt_token_ids,
    response_from,
    sampling_params,
)
from services.rpc.server import client_channel
from services.rpc.status import abort_with
from services.stubs.tandem.v1 import inference_pb2 as pb
from services.stubs.tandem.v1 import worker_pb2 as wpb
from services.stubs.tandem.v1 import worker_pb2_grpc
from services.telemetry.tracing import tracer
from services.worker.engine_loop import EngineLoop
from services.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

RELEASE_TIMEOUT_S = 5.0
CLOSE_WAIT_S = 1.0
"""At shutdown, how long the releases still in flight get to finish before they are
cancelled: a finished one unpins the prefill's blocks now, a cancelled one leaves them to
its lease. Bounded, so a silent prefill worker cannot hold the shutdown up."""
LEASE_MARGIN_S = 0.5
"""Of a prefill's lease, what a read leaves unused (at most a quarter of it): the handle's
time in transit, and wake-ups late by a scheduling tick."""


@dataclass
class _Transfer:
    """What happened to one request's KV, for its final message."""

    target: TransferTarget | None = None
    ok: bool = False
    bytes: int = 0


class DecodeService(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(
        self,
        loop: EngineLoop,
        worker_id: str,
        peers: KVReader,
        kv_timeout_s: float,
        metrics: WorkerMetrics,
        gate: CallGate,
        kv_room_wait_s: float = 0.0,
        *,
        model: str,
    ) -> None:
        self.loop = loop
        self.model = model
        """The model this worker serves: calls naming another are NOT_FOUND."""
        self.gate = gate
        self.worker_id = worker_id
        self.peers = peers
        self.kv_timeout_s = kv_timeout_s
        self.kv_room_wait_s = kv_room_wait_s
        self.metrics = metrics
        self.rooms = RoomWaiter(loop)
        peers.transport.on_unreleased = self._keep_out_of_use
        self._background: set[asyncio.Task[grpc.StatusCode]] = set()
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def close(self) -> None:
        """Free what outlives the calls, once the server runs none (WorkerHost.on_stop):
        finish or cancel the background releases, stop the room waiter, close the
        channels to prefill workers."""
        await self._finish_releases(CLOSE_WAIT_S)
        await self.rooms.close()
        channels, self._channels = self._channels, {}
        await asyncio.gather(*(channel.close() for channel in channels.values()))

    async def _finish_releases(self, wait_s: float) -> None:
        """Give the releases in flight ``wait_s`` to finish, then cancel the rest."""
        if not self._background:
            return
        _, pending = await asyncio.wait(set(self._background), timeout=wait_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            log.info("cancelled %d KV releases at shutdown; their leases will expire", len(pending))

    async def Decode(
        self, request: wpb.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        async for message in self.gate.stream(context, self._decode(request, context)):
            yield message  # the gate: UNAVAILABLE once the worker drains

    async def _decode(
        self, request: wpb.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        req = request.request
        rid = req.request_id or uuid.uuid4().hex
        try:
            check_model(req, self.model)
            prompt = prompt_token_ids(req)
            params = sampling_params(req)
            if request.HasField("kv") != request.HasField("first_token_id"):
                raise InvalidRequestError(
                    "first_token_id", "must be set exactly when kv is set (disaggregated mode)"
                )
            if request.HasField("kv"):
                _check_handle(request.kv, len(prompt), self.peers.layout.block_size)
        except TandemError as e:
            await abort_with(context, e)
        transfer = _Transfer()
        arrival = time.monotonic()
        if request.HasField("kv"):
            timeout = request.kv_timeout_ms / 1000 if request.kv_timeout_ms else self.kv_timeout_s
            first = request.first_token_id

            wait = self.kv_room_wait_s > 0

            def submit(engine: LLMEngine) -> None:
                transfer.target = engine.add_transferred_request(rid, prompt, first, params, wait)

            async def after_submit() -> None:
                self._count("disaggregated")
                await self._read_kv(rid, request.kv, transfer, timeout, arrival)

            stream = self.loop.outputs(rid, submit, after_submit)
        else:

            async def counted() -> None:
                self._count("aggregated")

            stream = self.loop.outputs(rid, lambda e: e.add_request(rid, prompt, params), counted)
        try:
            async for msg in self._relay(stream, transfer):
                yield msg
        except TandemError as e:
            await abort_with(context, e)

    def _keep_out_of_use(self, block_ids: list[int], until: Future[None]) -> None:
        """A read abandoned but not yet released may still write ``block_ids``: keep them
        from the next request until NIXL releases it (else it writes that request's KV)."""
        self.metrics.kv_reads_unreleased.inc()
        self.loop.keep_blocks(block_ids, until)

    def _count(self, mode: str) -> None:
        """Count a request the engine took (``outputs`` runs this once its submit did): one
        refused, a duplicate id or one the engine will not run, was never served."""
        self.metrics.decode_requests.labels(mode).inc()

    async def _relay(
        self, stream: AsyncIterator, transfer: _Transfer
    ) -> AsyncIterator[pb.GenerateResponse]:
        last = None
        async for out in stream:
            now = time.monotonic()
            if last is not None and out.token_ids:
                self.metrics.inter_token_seconds.observe(now - last)
            last = now
            msg = response_from(out)
            if out.finished:
                msg.serving.CopyFrom(self._serving(transfer))
            yield msg

    def _serving(self, transfer: _Transfer) -> pb.ServingInfo:
        info = pb.ServingInfo(decode_worker=self.worker_id)
        if transfer.ok:
            info.kv_transfer_bytes = transfer.bytes
            info.kv_transport = self.peers.transport.name
        if transfer.target is not None:
            info.kv_blocks_reused = transfer.target.num_reused
        return info

    async def _read_kv(
        self, rid: str, kv: wpb.KVHandle, transfer: _Transfer, timeout: float, arrival: float
    ) -> None:
        """Copy the blocks this worker lacks, release the prefill side, join the batch.

        Any failure (peer gone, incompatible, timeout) falls back to prefilling here. Waiting
        for room and the read both end before the prefill's lease does (``_lease_end``); after
        a read, the release must find the blocks still pinned, else the read is discarded
        (``_check_still_pinned``): the backstop for a lease that ended early all the same.
        """
        lease_end = _lease_end(kv, arrival)
        target = transfer.target
        if target is None and self.kv_room_wait_s > 0:  # queued for room: wait for it
            wait_end = min(time.monotonic() + self.kv_room_wait_s, lease_end)
            target = transfer.target = await self._wait_for_room(rid, wait_end)
        if target is None:  # no room: the engine queued it to be prefilled here
            self._release_remote(kv)
            return
        start = time.monotonic()
        timeout = min(timeout, lease_end - start)
        remote = list(kv.block_ids)[target.num_reused :]
        local = list(target.block_ids)[target.num_reused :]
        released = False
        with _tracer.start_as_current_span("kv.read") as span:
            span.set_attribute("tandem.kv.blocks_read", len(remote))
            span.set_attribute("tandem.kv.blocks_reused", target.num_reused)
            span.set_attribute("tandem.kv.prefill_worker", kv.worker_id)
            try:
                if timeout <= 0:
                    raise TimeoutError(f"{kv.worker_id}'s lease on the blocks is ending")
                if remote:
                    # asyncio.timeout: Python 3.11's wait_for drops a client's cancel that
                    # lands as the pull ends, and the request went on for a gone client.
                    async with asyncio.timeout(timeout):
                        transfer.bytes = await self.peers.pull(
                            kv.address, remote, local, kv.request_id, timeout
                        )
                    released = True
                    # Counted as they arrive: they crossed the wire (and the prefill side
                    # counted them served) even if the check below throws them away.
                    self.metrics.kv_bytes_received.inc(transfer.bytes)
                    read = time.monotonic()
                    self.metrics.kv_transfer_seconds.observe(read - start)
                    await self._check_still_pinned(kv, start + timeout)
                    self.metrics.kv_release_seconds.observe(time.monotonic() - read)
                transfer.ok = True
                span.set_attribute("tandem.kv.bytes", transfer.bytes)
            except (TandemError, TimeoutError, grpc.aio.AioRpcError, OSError) as e:
                self.metrics.kv_transfer_failures.inc()
                span.set_attribute("tandem.kv.fallback", "local prefill")
                log.warning(
                    "KV read for %s from %s failed (%s); prefilling locally", rid, kv.worker_id, e
                )
        if not released:
            self._release_remote(kv)
        ok = transfer.ok  # False: the blocks read are freed uncached, and the prompt prefilled
        await self.loop.call(lambda engine: engine.transfer_done(rid, ok))

    async def _check_still_pinned(self, kv: wpb.KVHandle, deadline: float) -> None:
        """Release the prefill side after a read, and raise KVTransferError when it no longer
        held the blocks: its lease ran out, so they may have held another prompt's KV while
        they were read (a one-sided NIXL READ cannot tell). A release that fails otherwise
        (the peer unreachable) proves nothing either way; the read stands.

        The answer is awaited until the read's ``deadline`` (time.monotonic) at most: a
        prefill worker busy with a long step answers late, and the request must not wait
        past its KV timeout for it (it waited the release's own 5 s). No answer by then is
        a failed read (KVTransferError: prefilled here), not one that stands: a late answer
        may yet be NOT_FOUND, and reused blocks would decode wrong tokens without a word.
        The release goes on in the background, so the blocks are unpinned all the same."""
        release = self._background_task(_release(self._channel(kv.address), kv))
        done, _ = await asyncio.wait({release}, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            raise KVTransferError(
                f"{kv.worker_id} did not answer the release of {kv.request_id!r} by the KV "
                "deadline, so whether it still held the blocks read is unknown"
            )
        code = release.result()
        if code == grpc.StatusCode.NOT_FOUND:
            raise KVTransferError(
                f"{kv.worker_id} no longer held the blocks of {kv.request_id!r} after the read "
                "(lease ran out): they may hold another prompt's KV",
                peer_code=code.name,
            )

    async def _wait_for_room(self, rid: str, deadline: float) -> TransferTarget | None:
        start = time.monotonic()
        with _tracer.start_as_current_span("kv.wait_for_room") as span:
            target = await self.rooms.wait(rid, deadline)
            span.set_attribute("tandem.kv.room_found", target is not None)
        if target is None:
            self.metrics.kv_room_give_ups.inc()
            log.info("no room for %s's KV in %.1f s; prefilling it here", rid, deadline - start)
        else:
            self.metrics.kv_room_wait_seconds.observe(time.monotonic() - start)
        return target

    def _release_remote(self, kv: wpb.KVHandle) -> None:
        """Tell the prefill worker to unpin, without waiting (its lease is the backstop)."""
        self._background_task(_release(self._channel(kv.address), kv))

    def _background_task(self, release: Coroutine[None, None, grpc.StatusCode]) -> asyncio.Task:
        """Run ``release`` to its end, whoever waits for it (a reference keeps it alive)."""
        task = asyncio.create_task(release)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _channel(self, address: str) -> grpc.aio.Channel:
        """The channel to a prefill worker, made once per address; past ``MAX_PEERS`` the
        least recently used is closed once its calls are done (prefill workers come and go
        at new addresses, as the KV reader's peers do)."""
        channel = self._channels.pop(address, None)
        if channel is None:
            channel = client_channel(address, tls=self.peers.tls)
        self._channels[address] = channel  # the most recently used last
        while len(self._channels) > MAX_PEERS:
            oldest = self._channels.pop(next(iter(self._channels)))
            self._background_task(_closed(oldest))
        return channel


async def _closed(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """Close ``channel`` once the releases on it are done (at most RELEASE_TIMEOUT_S)."""
    await channel.close(grace=RELEASE_TIMEOUT_S)
    return grpc.StatusCode.OK


async def _release(channel: grpc.aio.Channel, kv: wpb.KVHandle) -> grpc.StatusCode:
    """ReleaseKV ``kv`` on the prefill worker; returns the status it ended with."""
    try:
        await worker_pb2_grpc.PrefillWorkerStub(channel).ReleaseKV(
            wpb.ReleaseKVRequest(request_id=kv.request_id), timeout=RELEASE_TIMEOUT_S
        )
    except grpc.aio.AioRpcError as e:
        log.info(
            "release of %s on %s failed (%s); its lease will expire",
            kv.request_id,
            kv.worker_id,
            e.code().name,
        )
        return e.code()
    return grpc.StatusCode.OK


def _check_handle(kv: wpb.KVHandle, prompt_len: int, block_size: int) -> None:
    """Raise InvalidRequestError naming the KVHandle field that does not describe the
    prompt's KV: a handle short of blocks, or naming one twice, would leave blocks here
    that nothing writes, and the request would decode on whatever they hold."""
    needed = -(-prompt_len // block_size)
    if len(kv.block_ids) != needed:
        raise InvalidRequestError(
            "kv.block_ids",
            f"has {len(kv.block_ids)} blocks; a prompt of {prompt_len} tokens in blocks of "
            f"{block_size} needs {needed}",
        )
    if len(set(kv.block_ids)) != len(kv.block_ids):
        raise InvalidRequestError("kv.block_ids", "names a block more than once")
    if kv.num_tokens not in (0, prompt_len):
        raise InvalidRequestError(
            "kv.num_tokens", f"is {kv.num_tokens}; must be the prompt's length, {prompt_len} (or 0)"
        )


def _lease_end(kv: wpb.KVHandle, arrival: float) -> float:
    """When a read of ``kv``'s blocks must be over (time.monotonic): before the prefill
    worker's lease runs out and the blocks may be reused. Counted from this request's
    arrival, less a margin for the handle's time in transit; no bound when the handle
    does not say (an older prefill worker)."""
    if not kv.lease_ms:
        return float("inf")
    lease_s = kv.lease_ms / 1000
    return arrival + lease_s - min(LEASE_MARGIN_S, lease_s / 4)

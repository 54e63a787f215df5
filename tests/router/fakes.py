"""Scripted prefill and decode workers: real grpc.aio servers, no model.

They follow the worker interface the router expects (see services/router/
orchestrator.py) with a fixed rule for tokens: the token after a sequence of n
tokens is ``1000 + n``. A run that is resumed elsewhere therefore produces the
same ids as one that is not, so tests can check every token exactly.

Each worker records the requests it received, and can be told to fail with a
status, to die mid-stream after k tokens, or to hang (recording the
cancellation the router sends).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from services.rpc.server import RunningServer, Servicer, client_channel, start_server
from services.stubs.tandem.v1 import inference_pb2, worker_pb2, worker_pb2_grpc

MODEL = "fake-model"
MODEL_ID = "fake-model@1"
BLOCK_SIZE = 16
VOCAB_SIZE = 4096
CONTEXT = 512
KV_BYTES = 4096


def next_token(sequence_length: int) -> int:
    """The scripted model: the token that follows ``sequence_length`` tokens."""
    return 1000 + sequence_length


def token_text(token_id: int) -> str:
    return f" t{token_id}"


def expected_completion(prompt_length: int, max_tokens: int) -> list[int]:
    """What an uninterrupted request gets from the fakes."""
    return [next_token(prompt_length + i) for i in range(max_tokens)]


@dataclass
class Behaviour:
    """How a fake worker misbehaves; the default is to serve correctly."""

    fail_code: grpc.StatusCode | None = None
    """Abort every call at once with this status."""
    die_after: int | None = None
    """Decode: abort with UNAVAILABLE after sending this many token messages."""
    hang_after: int | None = None
    """Prefill: never answer (any value). Decode: stop after this many token messages
    and wait until the call is cancelled."""
    cancel_after: int | None = None
    """Decode: end with a FINISH_REASON_CANCELLED message after this many token messages
    (what a worker that shuts down does)."""
    error_after: int | None = None
    """Decode: after this many token messages, send a FINISH_REASON_ERROR message and
    end with INTERNAL (an engine failure)."""
    kv_fallback: bool = False
    """Decode: report that reading the prefill's KV failed and it prefilled locally."""
    cached_tokens: int = 0
    """Prefix-cache hits reported for every prompt."""
    token_interval_s: float = 0.0
    """Decode: pause between token messages, as a real engine's inter-token latency
    (0: as fast as the event loop goes)."""
    prefill_delay_s: float = 0.0
    """Prefill: pause before answering, as a long prompt's prefill takes."""


class FakeWorker:
    """One prefill or decode worker serving on 127.0.0.1:<free port>."""

    def __init__(
        self,
        worker_id: str,
        role: int,
        behaviour: Behaviour | None = None,
        *,
        model: str = MODEL,
        block_size: int = BLOCK_SIZE,
        model_id: str = MODEL_ID,
        kv_layout: str = "slot-layer-kv-head-dim",
    ) -> None:
        self.worker_id = worker_id
        self.kv_layout = kv_layout
        self.role = role
        self.behaviour = behaviour or Behaviour()
        self.model = model
        self.block_size = block_size
        self.model_id = model_id
        self.calls: list[worker_pb2.PrefillRequest | worker_pb2.DecodeRequest] = []
        self.released: list[str] = []
        self.cancelled = asyncio.Event()
        self.hanging = asyncio.Event()
        self.load = worker_pb2.WorkerLoad()
        self.heartbeats = 0
        self._server: RunningServer | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._peers: dict[str, grpc.aio.Channel] = {}  # prefill workers released, by address
        self._releases: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        assert self._server is not None, "start() the worker first"
        return self._server.address

    async def start(self) -> FakeWorker:
        if self.role == worker_pb2.WORKER_ROLE_PREFILL:
            servicer = Servicer(
                _Prefill(self),
                worker_pb2_grpc.add_PrefillWorkerServicer_to_server,
                "tandem.v1.PrefillWorker",
            )
        else:
            servicer = Servicer(
                _Decode(self),
                worker_pb2_grpc.add_DecodeWorkerServicer_to_server,
                "tandem.v1.DecodeWorker",
            )
        self._server = await start_server([servicer])
        return self

    def register_request(self) -> worker_pb2.RegisterRequest:
        return worker_pb2.RegisterRequest(
            worker_id=self.worker_id,
            role=self.role,
            address=self.address,
            model=self.model,
            layout=worker_pb2.KVLayout(
                protocol_version=1,
                model_id=self.model_id,
                block_size=self.block_size,
                dtype="bfloat16",
                layout=self.kv_layout,
                num_blocks=128,
            ),
            max_context_length=CONTEXT,
            vocab_size=VOCAB_SIZE,
        )

    async def register(self, router_address: str, heartbeat: bool = True) -> None:
        """Register over the router's Registry RPC, then heartbeat at the interval it gives."""
        self._channel = self._channel or client_channel(router_address)
        registry = worker_pb2_grpc.RegistryStub(self._channel)
        reply = await registry.Register(self.register_request(), timeout=5)
        if heartbeat:
            interval = reply.heartbeat_interval_ms / 1000
            self._heartbeat_task = asyncio.create_task(self._heartbeat(registry, interval))

    async def stop_heartbeats(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
            self._heartbeat_task = None

    def release(self, kv: worker_pb2.KVHandle) -> None:
        """ReleaseKV on the prefill worker that pinned ``kv``, as a decode worker does before
        its first token; in the background, on a channel kept per address, so the fake's
        streams stay as quick as before (the gateway overhead bench times them)."""
        channel = self._peers.get(kv.address)
        if channel is None:
            channel = self._peers[kv.address] = grpc.aio.insecure_channel(kv.address)
        task = asyncio.ensure_future(_release(channel, kv))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def stop(self) -> None:
        await self.stop_heartbeats()
        await asyncio.gather(*self._releases, return_exceptions=True)
        for peer in self._peers.values():
            await peer.close()
        if self._channel is not None:
            await self._channel.close()
        if self._server is not None:
            await self._server.stop(grace=0)

    async def _heartbeat(self, registry: worker_pb2_grpc.RegistryStub, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            request = worker_pb2.HeartbeatRequest(worker_id=self.worker_id, load=self.load)
            await registry.Heartbeat(request, timeout=5)
            self.heartbeats += 1

    async def wait_cancelled(self) -> None:
        """Hang (``hanging`` is set) until the call is cancelled (then ``cancelled`` is)."""
        self.hanging.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


class _Prefill(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, worker: FakeWorker) -> None:
        self.worker = worker

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        worker, behaviour = self.worker, self.worker.behaviour
        worker.calls.append(request)
        if behaviour.fail_code is not None:
            await context.abort(behaviour.fail_code, f"{worker.worker_id}: scripted failure")
        if behaviour.hang_after is not None:
            await worker.wait_cancelled()
        await asyncio.sleep(behaviour.prefill_delay_s)
        prompt = request.request.prompt_token_ids
        first = next_token(len(prompt))
        reply = worker_pb2.PrefillResponse(
            first_token_id=first,
            first_text=token_text(first),
            cached_tokens=behaviour.cached_tokens,
        )
        max_tokens = request.request.max_tokens if request.request.HasField("max_tokens") else 16
        if max_tokens == 1:
            reply.finish_reason = inference_pb2.FINISH_REASON_LENGTH
            return reply
        reply.kv.CopyFrom(
            worker_pb2.KVHandle(
                worker_id=worker.worker_id,
                address=worker.address,
                request_id=request.request.request_id,
                block_ids=list(range(-(-len(prompt) // worker.block_size))),
                num_tokens=len(prompt),
            )
        )
        return reply

    async def ReleaseKV(
        self, request: worker_pb2.ReleaseKVRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReleaseKVResponse:
        self.worker.released.append(request.request_id)
        return worker_pb2.ReleaseKVResponse()


async def _release(channel: grpc.aio.Channel, kv: worker_pb2.KVHandle) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError):
        await worker_pb2_grpc.PrefillWorkerStub(channel).ReleaseKV(
            worker_pb2.ReleaseKVRequest(request_id=kv.request_id), timeout=2
        )


class _Decode(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, worker: FakeWorker) -> None:
        self.worker = worker

    async def Decode(
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        worker, behaviour = self.worker, self.worker.behaviour
        worker.calls.append(request)
        if behaviour.fail_code is not None:
            await context.abort(behaviour.fail_code, f"{worker.worker_id}: scripted failure")
        if request.HasField("kv"):  # as a real one: released (read or not) before any token
            worker.release(request.kv)
        generate = request.request
        max_tokens = generate.max_tokens if generate.HasField("max_tokens") else 16
        has_first = request.HasField("first_token_id")
        completion = 1 if has_first else 0
        length = len(generate.prompt_token_ids) + completion
        sent = 0
        while completion < max_tokens:
            if sent == behaviour.die_after:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{worker.worker_id} died")
            if sent == behaviour.hang_after:
                await worker.wait_cancelled()
            if sent == behaviour.error_after:
                yield inference_pb2.GenerateResponse(
                    request_id=generate.request_id,
                    finish_reason=inference_pb2.FINISH_REASON_ERROR,
                )
                await context.abort(grpc.StatusCode.INTERNAL, "scripted engine failure")
            if sent == behaviour.cancel_after:
                yield inference_pb2.GenerateResponse(
                    request_id=generate.request_id,
                    finish_reason=inference_pb2.FINISH_REASON_CANCELLED,
                )
                return
            token = next_token(length)
            message = inference_pb2.GenerateResponse(
                request_id=generate.request_id, token_ids=[token], text=token_text(token)
            )
            if completion == 0:  # its own prefill's first token: says what was cached
                message.usage.prompt_tokens = len(generate.prompt_token_ids)
                message.usage.completion_tokens = 1
                message.usage.cached_tokens = behaviour.cached_tokens
            yield message
            completion, length, sent = completion + 1, length + 1, sent + 1
            await asyncio.sleep(behaviour.token_interval_s)
        if sent == behaviour.die_after:  # every token out, the final message never sent
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{worker.worker_id} died")
        with_kv = request.HasField("kv") and not behaviour.kv_fallback
        yield inference_pb2.GenerateResponse(
            request_id=generate.request_id,
            finish_reason=inference_pb2.FINISH_REASON_LENGTH,
            usage=inference_pb2.Usage(
                prompt_tokens=len(generate.prompt_token_ids),
                completion_tokens=completion,
                cached_tokens=behaviour.cached_tokens,
            ),
            serving=inference_pb2.ServingInfo(
                decode_worker=worker.worker_id,
                kv_transfer_bytes=KV_BYTES if with_kv else 0,
                kv_transport="grpc" if with_kv else "",
            ),
        )

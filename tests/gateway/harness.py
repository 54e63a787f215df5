"""Real gateways in front of a real router with scripted fake workers, for end-to-end tests.

The scripted workers (:class:`ScriptedWorker`) read what to do from the request's prompt, so
one worker can serve well-behaved and misbehaving requests side by side:

- ``prompt[0] == HANG_PREFILL``: the prefill never answers (until cancelled): no token is
  ever produced;
- ``prompt[0] == PAUSE + p``: the decode streams ``p`` tokens, then waits until cancelled;
  with the prefill's first token the client has then received exactly ``1 + p`` tokens and
  nothing more is in flight, so what the client read is what was produced;
- anything else: the fakes' normal behaviour (``tests.router.fakes``).

:func:`store_url` gives a SQLite file or a fresh PostgreSQL schema (via libpq's
``options=-csearch_path=…``, since the gateway opens its store from a URL alone), with the
same skip rule as ``conftest.open_same``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.gateway.audit import AuditEvent, AuditLog
from services.gateway.ledger import Ledger
from services.gateway.limits import Admission
from services.gateway.server import Gateway, GatewayConfig, start_gateway
from services.router.config import RouterConfig
from services.rpc.server import Servicer, client_channel, start_server
from services.stubs.tandem.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.gateway.issuer import Issuer
from tests.router.fakes import (
    MODEL,
    Behaviour,
    FakeWorker,
    _Decode,
    _Prefill,
    next_token,
    token_text,
)
from tests.router.harness import DECODE, FAST, PREFILL, Cluster, cluster

HANG_PREFILL = 2999
PAUSE = 3000

MODEL_B = "fake-model-b"


def policy_text(limits: str = "", models: Sequence[str] = (MODEL, MODEL_B)) -> str:
    """Every model open to role ``model-user``; ``limits`` is appended TOML."""
    parts = ['admin_role = "admin"\n']
    for m in models:
        parts.append(f'[models."{m}"]\nroles = ["model-user"]\n')
    return "\n".join(parts) + limits


# ---- scripted workers -------------------------------------------------------------------


async def _hang_until_cancelled(worker: FakeWorker) -> None:
    await worker.wait_cancelled()


class _ScriptedPrefill(_Prefill):
    async def Prefill(self, request, context):  # type: ignore[no-untyped-def]
        prompt = request.request.prompt_token_ids
        if prompt and prompt[0] == HANG_PREFILL:
            self.worker.calls.append(request)
            await _hang_until_cancelled(self.worker)
        return await super().Prefill(request, context)


class _ScriptedDecode(_Decode):
    async def Decode(self, request, context):  # type: ignore[no-untyped-def]
        prompt = request.request.prompt_token_ids
        if not prompt or prompt[0] < PAUSE:
            async for message in super().Decode(request, context):
                yield message
            return
        self.worker.calls.append(request)
        length = len(prompt) + (1 if request.HasField("first_token_id") else 0)
        for _ in range(prompt[0] - PAUSE):
            token = next_token(length)
            yield inference_pb2.GenerateResponse(
                request_id=request.request.request_id, token_ids=[token], text=token_text(token)
            )
            length += 1
        await _hang_until_cancelled(self.worker)


class ScriptedWorker(FakeWorker):
    """A fake worker that also follows the prompt's script (see the module docstring)."""

    async def start(self) -> ScriptedWorker:
        if self.role == worker_pb2.WORKER_ROLE_PREFILL:
            servicer = Servicer(
                _ScriptedPrefill(self),
                worker_pb2_grpc.add_PrefillWorkerServicer_to_server,
                "tandem.v1.PrefillWorker",
            )
        else:
            servicer = Servicer(
                _ScriptedDecode(self),
                worker_pb2_grpc.add_DecodeWorkerServicer_to_server,
                "tandem.v1.DecodeWorker",
            )
        self._server = await start_server([servicer])
        return self


@dataclass(frozen=True)
class Spec:
    """One worker to start: id, role, model served and (optionally) scripted misbehaviour."""

    worker_id: str
    role: int
    model: str = MODEL
    behaviour: Behaviour | None = None


DEFAULT_WORKERS = (Spec("p1", PREFILL), Spec("d1", DECODE))


async def add_scripted(c: Cluster, spec: Spec) -> FakeWorker:
    worker = await ScriptedWorker(
        spec.worker_id, spec.role, spec.behaviour, model=spec.model
    ).start()
    worker_id = spec.worker_id
    c.workers[worker_id] = worker  # stopped with the cluster
    await worker.register(c.router.address)
    return worker


def token(issuer: Issuer, sub: str = "ann", team: str = "ml") -> str:
    """An access token of a ``model-user`` in ``team`` (Keycloak group ``/team``)."""
    return issuer.mint(realm_roles=["model-user"], groups=[f"/{team}"], sub=sub)


# ---- gateways ---------------------------------------------------------------------------


@dataclass
class Reply:
    """What one call through the gateway gave the client."""

    messages: list[inference_pb2.GenerateResponse] = field(default_factory=list)
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    request_id: str = ""
    """The gateway's id for the call (trailing metadata ``x-request-id``, or the messages'
    ``request_id``): the ledger's key."""

    @property
    def tokens(self) -> int:
        return sum(len(m.token_ids) for m in self.messages)

    @property
    def final(self) -> inference_pb2.GenerateResponse | None:
        return next((m for m in self.messages if m.finish_reason), None)


@dataclass
class Stack:
    """A router (``cluster``), one or more gateways on one store, and a stub per gateway."""

    cluster: Cluster
    gateways: list[Gateway]
    stubs: list[inference_pb2_grpc.InferenceStub]

    @property
    def gateway(self) -> Gateway:
        return self.gateways[0]

    @property
    def ledger(self) -> Ledger:
        """The store's ledger, once every replica's finished calls are written to it (the
        gateway writes after a call ends: services/gateway/settler.py)."""
        self.settled()
        return Ledger(self.gateway.store, metrics=None)

    def audit(self) -> list[AuditEvent]:
        self.settled()
        return [r.event for r in AuditLog(self.gateway.store, metrics=None).records()]

    def settled(self) -> None:
        for g in self.gateways:
            g.service.pipeline.settler.wait()

    async def id_of(self, principal: str, own_id: str) -> str:
        """The gateway's id of ``principal``'s one call with client id ``own_id``, once its
        row is written: how a client that cancelled (no status, no trailer) finds it."""
        await until(lambda: len(self.ledger.find(principal, own_id)) == 1)
        (row,) = self.ledger.find(principal, own_id)
        return row.request_id

    async def generate(
        self,
        credential: str | None,
        *,
        replica: int = 0,
        cancel_after: int | None = None,
        cancel_when: asyncio.Event | None = None,
        timeout: float = 10,
        **fields: object,
    ) -> Reply:
        """One Generate call; ``cancel_after=k`` cancels once k tokens were read,
        ``cancel_when`` cancels when the event is set (before reading anything)."""
        fields.setdefault("model", MODEL)
        metadata = () if credential is None else (("authorization", f"Bearer {credential}"),)
        call = self.stubs[replica].Generate(
            inference_pb2.GenerateRequest(**fields), metadata=metadata, timeout=timeout
        )
        reply = Reply()
        if cancel_when is not None:
            # Cancelled before its first message, the client never learns the gateway's
            # id (it comes on the messages and the status): tests use Ledger.find.
            await asyncio.wait_for(cancel_when.wait(), timeout)
            call.cancel()
            reply.code = grpc.StatusCode.CANCELLED
            return reply
        try:
            async for message in call:
                reply.messages.append(message)
                if cancel_after is not None and reply.tokens >= cancel_after:
                    call.cancel()
                    reply.code = grpc.StatusCode.CANCELLED
                    break
        except grpc.aio.AioRpcError as err:
            reply.code, reply.details = err.code(), err.details() or ""
        reply.request_id = await gateway_id(call, reply, own_id=str(fields.get("request_id", "")))
        return reply


async def gateway_id(
    call: grpc.aio.UnaryStreamCall, reply: Reply | None = None, own_id: str = ""
) -> str:
    """The gateway's id for ``call``: trailing metadata ``x-request-id`` of a call that ended
    with a status; for one the client cancelled, the messages' ``request_id`` when the
    client chose no id of its own (the messages carry the gateway's), else "" (unknown to
    the client: its row is found by its own id, ``Ledger.find``)."""
    initial = [k for k, _ in await call.initial_metadata() or () if k == "x-request-id"]
    assert not initial, "x-request-id travels in trailing metadata only"
    ids = [str(v) for k, v in await call.trailing_metadata() or () if k == "x-request-id"]
    messages = reply.messages if reply is not None else []
    if not ids and own_id:
        return ""
    if not ids:
        ids = sorted({m.request_id for m in messages})
    assert len(ids) == 1, ids
    if not own_id and messages:  # the messages carry the same id as the trailer
        assert {m.request_id for m in messages} == set(ids)
    return ids[0]


@asynccontextmanager
async def stack(
    tmp_path: Path,
    store: str,
    issuer_url: str,
    *,
    limits: str = "",
    replicas: int = 1,
    admission: Sequence[Admission | None] = (),
    router: RouterConfig = FAST,
    workers: Sequence[Spec] = DEFAULT_WORKERS,
    http: bool = False,
) -> AsyncIterator[Stack]:
    """Start a router with scripted ``workers`` and ``replicas`` gateways on one store
    (``http``: each serving the OpenAI HTTP API too, on a free port)."""
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(limits))
    async with cluster(router) as c:
        for spec in workers:
            await add_scripted(c, spec)
        config = GatewayConfig(
            router_address=c.router.address,
            policy_path=policy,
            store_url=store,
            issuer_url=issuer_url,
            http_port=0 if http else None,
        )
        gateways: list[Gateway] = []
        channels: list[grpc.aio.Channel] = []
        try:
            for i in range(replicas):
                adm = admission[i] if i < len(admission) else None
                gateways.append(await start_gateway(config, admission=adm))
                channels.append(client_channel(gateways[-1].address))
            yield Stack(c, gateways, [inference_pb2_grpc.InferenceStub(ch) for ch in channels])
        finally:
            for ch in channels:
                await ch.close()
            for g in gateways:
                await g.stop(grace=0)


async def until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate()`` until true; fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)

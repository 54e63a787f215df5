"""How a request through the gateway settles when it does not simply finish.

Each path must settle exactly once (one ledger row, one allow audit record, one admission
adjustment) with the tokens actually produced, and must give the caller the router's status.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import grpc
import redis

from services.gateway.limits import DAY, MINUTE, InProcessAdmission, window_start
from services.gateway.limits_redis import RedisAdmission
from services.gateway.pipeline import CallInfo
from services.stubs.tandem.v1 import inference_pb2
from tests.gateway.harness import (
    DECODE,
    HANG_PREFILL,
    MODEL,
    PAUSE,
    PREFILL,
    Spec,
    Stack,
    stack,
    token,
    until,
)
from tests.gateway.issuer import Issuer
from tests.router.fakes import Behaviour
from tests.router.harness import run

LIMITS = """
[limits.user]
requests_per_minute = 1000
tokens_per_minute = 100000

[limits.team]
tokens_per_day = 1000000
"""


class Counters:
    """The admission counters one caller (user ``ann``, team ``ml``) is charged on."""

    def __init__(self, now: float) -> None:
        self.admission = InProcessAdmission(clock=lambda: now)  # frozen: no window rollover
        m, d = window_start(MINUTE, now), window_start(DAY, now)
        self._keys = (
            f"user:ann|requests|minute|{m}",
            f"user:ann|tokens|minute|{m}",
            f"team:ml|tokens|day|{d}",
        )

    def read(self) -> tuple[int, int, int]:
        """(requests this minute, user tokens this minute, team tokens today)."""
        return tuple(self.admission.used(k) for k in self._keys)  # type: ignore[return-value]


async def _settled(s: Stack, request_id: str) -> None:
    """Wait for the ledger row, then long enough that a second settle would have landed."""
    await until(lambda: s.ledger.get(request_id) is not None)
    await asyncio.sleep(0.3)


def _allows(s: Stack, request_id: str) -> list:
    return [e for e in s.audit() if e.request_id == request_id and e.decision == "allow"]


def test_a_cancelled_stream_settles_once_with_the_tokens_produced(
    tmp_path: Path, issuer: Issuer
) -> None:
    async def body() -> None:
        counters = Counters(time.time())
        store = f"sqlite:{tmp_path / 'gw.db'}"
        async with stack(
            tmp_path, store, issuer.url, limits=LIMITS, admission=[counters.admission]
        ) as s:
            prompt = [PAUSE + 3, 1, 2, 3, 4]  # decode stops after 3 tokens and waits
            reply = await s.generate(
                token(issuer),
                prompt_token_ids=prompt,
                max_tokens=10,
                request_id="c1",
                cancel_after=4,  # the prefill's token and the decode's 3: all there is
            )
            assert reply.code == grpc.StatusCode.CANCELLED
            assert reply.tokens == 4
            reply.request_id = await s.id_of("ann", "c1")
            await _settled(s, reply.request_id)
            row = s.ledger.get(reply.request_id)
            assert row is not None and row.client_request_id == "c1"
            assert (row.prompt_tokens, row.completion_tokens, row.outcome) == (5, 4, "cancelled")
            assert s.ledger.find("ann", "c1") == (row,)
            [event] = _allows(s, reply.request_id)
            assert (event.reason, event.prompt_tokens, event.completion_tokens) == (
                "cancelled",
                5,
                4,
            )
            # reserved 5 + 10, settled to the 9 produced, once
            assert counters.read() == (1, 9, 9)
            decode = s.cluster.workers["d1"]
            await asyncio.wait_for(decode.cancelled.wait(), 5)  # the cancel went upstream

    run(body())


def test_a_message_handed_to_the_transport_is_charged_when_the_call_ends_at_once(
    tmp_path: Path, issuer: Issuer
) -> None:
    """The transport takes a message and the call ends before it asks for the next one: the
    client may have read it and cancelled (it was charged a token less than it read), or
    the write was cut short. Either way the tokens were produced: charged, as the router
    counts them."""

    async def body() -> None:
        async with stack(tmp_path, f"sqlite:{tmp_path / 'gw.db'}", issuer.url, limits=LIMITS) as s:
            pipeline = s.gateway.service.pipeline
            call = CallInfo(
                request_id="cut-1", metadata=(("authorization", f"Bearer {token(issuer)}"),)
            )
            who = await pipeline.authenticate(call, MODEL)
            request = inference_pb2.GenerateRequest(
                model=MODEL, prompt_token_ids=[PAUSE + 3, 1, 2, 3, 4], max_tokens=10
            )
            stream = pipeline.generate(who, request, call)
            sent = await anext(stream)  # the prefill's token: written, then the next asked
            last = await anext(stream)  # the decode's first: the call ends at its yield
            assert len(sent.token_ids) == len(last.token_ids) == 1
            await stream.aclose()
            await _settled(s, "cut-1")
            row = s.ledger.get("cut-1")
            assert row is not None
            assert (row.completion_tokens, row.outcome) == (2, "cancelled")

    run(body())


def test_an_upstream_error_mid_stream_settles_and_relays_the_routers_status(
    tmp_path: Path, issuer: Issuer
) -> None:
    async def body() -> None:
        counters = Counters(time.time())
        store = f"sqlite:{tmp_path / 'gw.db'}"
        workers = (Spec("p1", PREFILL), Spec("d1", DECODE, behaviour=Behaviour(error_after=2)))
        async with stack(
            tmp_path, store, issuer.url, limits=LIMITS, admission=[counters.admission],
            workers=workers,
        ) as s:  # fmt: skip
            fields = {"prompt_token_ids": [7, 8, 9], "max_tokens": 6}
            direct = await s.cluster.generate(**fields, request_id="direct")
            reply = await s.generate(token(issuer), **fields, request_id="e1")
            assert direct.code == grpc.StatusCode.INTERNAL
            assert (reply.code, reply.details) == (direct.code, direct.details)
            assert reply.tokens == len(direct.tokens) == 3
            assert reply.final is not None
            assert reply.final.finish_reason == inference_pb2.FINISH_REASON_ERROR
            await _settled(s, reply.request_id)
            row = s.ledger.get(reply.request_id)
            assert row is not None and row.client_request_id == "e1"
            assert (row.prompt_tokens, row.completion_tokens, row.outcome) == (3, 3, "error")
            [event] = _allows(s, reply.request_id)
            assert event.reason == "error (FINISH_REASON_ERROR)"
            assert counters.read() == (1, 6, 6)  # reserved 3 + 6, settled to 6

    run(body())


def test_no_token_produced_releases_the_reservation(tmp_path: Path, issuer: Issuer) -> None:
    """Cancelled while the prefill hangs, and refused by the worker before any token: the
    counters (requests included) return to where they were; the ledger row says 0 tokens."""

    async def body() -> None:
        counters = Counters(time.time())
        store = f"sqlite:{tmp_path / 'gw.db'}"
        async with stack(
            tmp_path, store, issuer.url, limits=LIMITS, admission=[counters.admission]
        ) as s:
            done = await s.generate(token(issuer), prompt_token_ids=[5, 6], max_tokens=2)
            assert done.code == grpc.StatusCode.OK
            assert counters.read() == (1, 4, 4)
            reply = await s.generate(
                token(issuer),
                prompt_token_ids=[HANG_PREFILL, 1, 2],
                max_tokens=8,
                request_id="h1",
                cancel_when=s.cluster.workers["p1"].hanging,  # the prefill has it
            )
            assert (reply.code, reply.tokens) == (grpc.StatusCode.CANCELLED, 0)
            await asyncio.wait_for(s.cluster.workers["p1"].cancelled.wait(), 5)
            await until(lambda: len(s.ledger.find("ann", "h1")) == 1)
            await asyncio.sleep(0.3)  # long enough that a second settle would have landed
            [row] = s.ledger.find("ann", "h1")
            assert (row.prompt_tokens, row.completion_tokens, row.outcome) == (0, 0, "cancelled")
            assert len(_allows(s, row.request_id)) == 1
            assert counters.read() == (1, 4, 4)

        failing = Behaviour(fail_code=grpc.StatusCode.RESOURCE_EXHAUSTED)
        workers = (Spec("p1", PREFILL, behaviour=failing), Spec("d1", DECODE))
        async with stack(
            tmp_path, store, issuer.url, limits=LIMITS, admission=[counters.admission],
            workers=workers,
        ) as s:  # fmt: skip
            direct = await s.cluster.generate(prompt_token_ids=[5, 6], max_tokens=2)
            reply = await s.generate(
                token(issuer), prompt_token_ids=[5, 6], max_tokens=2, request_id="f1"
            )
            assert direct.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (reply.code, reply.details, reply.tokens) == (direct.code, direct.details, 0)
            await _settled(s, reply.request_id)
            row = s.ledger.get(reply.request_id)
            assert row is not None and row.client_request_id == "f1"
            assert (row.prompt_tokens, row.completion_tokens, row.outcome) == (0, 0, "error")
            assert counters.read() == (1, 4, 4)

    run(body())


def test_an_audit_failure_does_not_cost_the_ledger_row(tmp_path: Path, issuer: Issuer) -> None:
    """Ledger row and audit record share one transaction; when the audit insert fails (a
    real SQLite error from a trigger), the row is still written on its own."""

    async def body() -> None:
        path = tmp_path / "gw.db"
        async with stack(tmp_path, f"sqlite:{path}", issuer.url, limits=LIMITS) as s:
            with sqlite3.connect(path) as db:
                db.execute(
                    "CREATE TRIGGER audit_down BEFORE INSERT ON audit_log "
                    "BEGIN SELECT RAISE(ABORT, 'audit store down'); END"
                )
            reply = await s.generate(token(issuer), prompt_token_ids=[5, 6, 7], max_tokens=2)
            assert reply.code == grpc.StatusCode.OK and reply.tokens == 2
            await until(lambda: s.ledger.get(reply.request_id) is not None)
            row = s.ledger.get(reply.request_id)
            assert (row.prompt_tokens, row.completion_tokens, row.outcome) == (3, 2, "ok")
            assert s.audit() == []  # nothing was audited, and nothing half-written

    run(body())


class _HeldRedis(RedisAdmission):
    """A Redis admission whose reserve waits, on its thread, until the test lets it go."""

    def __init__(self, client: redis.Redis, prefix: str, now: float) -> None:
        super().__init__(client, prefix=prefix, clock=lambda: now)
        self.started, self.go = threading.Event(), threading.Event()

    def reserve(self, scopes, tokens):  # type: ignore[no-untyped-def]
        self.started.set()
        self.go.wait(10)
        return super().reserve(scopes, tokens)


async def _cancel_during_reserve(
    s: Stack, issuer: Issuer, held: _HeldRedis, request_id: str
) -> None:
    """Send a call and cancel it while its Redis reserve waits on its thread, then let the
    reserve run (the gateway has seen the cancel by then)."""
    started = asyncio.Event()
    loop = asyncio.get_running_loop()
    threading.Thread(
        target=lambda: held.started.wait(10) and loop.call_soon_threadsafe(started.set),
        daemon=True,
    ).start()
    reply = await s.generate(
        token(issuer), prompt_token_ids=[1, 2, 3], max_tokens=5, request_id=request_id,
        cancel_when=started,
    )  # fmt: skip
    assert reply.code == grpc.StatusCode.CANCELLED
    await asyncio.sleep(0.2)
    held.go.set()


def test_a_call_cancelled_while_a_redis_reserve_runs_gives_the_charge_back(
    tmp_path: Path, issuer: Issuer, rds: redis.Redis, prefix: str
) -> None:
    """The reserve goes on in its thread after the call is cancelled; what it charges is
    settled as a call cancelled before its first token, not left for the window."""
    now = time.time()
    held = _HeldRedis(rds, prefix, now)
    m, d = window_start(MINUTE, now), window_start(DAY, now)
    keys = [f"{prefix}user:ann|requests|minute|{m}", f"{prefix}team:ml|tokens|day|{d}"]

    async def body() -> None:
        async with stack(
            tmp_path, f"sqlite:{tmp_path / 'gw.db'}", issuer.url, limits=LIMITS,
            admission=[held],
        ) as s:  # fmt: skip
            await _cancel_during_reserve(s, issuer, held, "c1")
            await until(lambda: len(s.ledger.find("ann", "c1")) == 1)
            [row] = s.ledger.find("ann", "c1")
            assert (row.prompt_tokens, row.completion_tokens, row.outcome) == (0, 0, "cancelled")
            await until(lambda: [rds.get(k) for k in keys] == [b"0", b"0"])

    run(body())


def test_a_refusal_decided_after_its_call_was_cancelled_is_still_audited(
    tmp_path: Path, issuer: Issuer, rds: redis.Redis, prefix: str
) -> None:
    """The call stops waiting; the reserve it left running refuses (3 + 5 tokens against a
    limit of 4): nothing is charged and no ledger row written, but the decision gets its
    deny record, as every decision does."""
    held = _HeldRedis(rds, prefix, time.time())
    tight = "[limits.user]\ntokens_per_minute = 4\n"

    async def body() -> None:
        async with stack(
            tmp_path, f"sqlite:{tmp_path / 'gw.db'}", issuer.url, limits=tight, admission=[held]
        ) as s:
            await _cancel_during_reserve(s, issuer, held, "c2")
            await until(lambda: len(s.audit()) == 1)
            [event] = s.audit()
            assert (event.decision, event.principal, event.client_request_id) == (
                "deny",
                "ann",
                "c2",
            )
            assert event.reason.startswith("limit exceeded: ")
            assert event.reason.endswith(" (the client had cancelled)")
            assert not s.ledger.find("ann", "c2")
            charged = {k: rds.get(k) for k in rds.scan_iter(match=prefix + "*")}
            assert all(v == b"0" for v in charged.values()), charged

    run(body())

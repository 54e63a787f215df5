"""Metering is exact: the ledger (and the metering counters) sum to what clients were served.

What a client is charged for:

- a completed request: the final message's usage (prompt tokens, completion tokens), which
  must equal the tokens the client read;
- a request the client cancels mid-stream: its prompt plus every token the gateway handed to
  the transport for it before the cancellation arrived (never less than the client read;
  see ``Pipeline._generate``). The scripted decode (``harness.PAUSE``) stops after p
  tokens and waits, and the client cancels once it has read the prefill's token and those p,
  so the tokens relayed are exactly the ``1 + p`` the client read: nothing else was produced;
- a request cancelled before any token: nothing (a ledger row with 0 and 0 if the gateway
  had already admitted it, none if the cancellation beat admission).

A few hundred requests over two teams and two models, seeded, 32 in flight at a time, on
SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.gateway.metrics import METRICS
from tests.gateway import harness
from tests.gateway.harness import (
    DECODE,
    HANG_PREFILL,
    MODEL,
    MODEL_B,
    PAUSE,
    PREFILL,
    Spec,
    Stack,
    stack,
    token,
)
from tests.gateway.issuer import Issuer
from tests.router.fakes import Behaviour
from tests.router.harness import run
from tests.router.test_failover import ROUND_ROBIN

REQUESTS = 300
IN_FLIGHT = 32
WORKERS = (
    Spec("p1", PREFILL),
    Spec("d1", DECODE),
    Spec("pb", PREFILL, model=MODEL_B),
    Spec("db", DECODE, model=MODEL_B),
)


@dataclass(frozen=True)
class Plan:
    """One request and what its client must be charged for."""

    request_id: str
    team: str
    model: str
    prompt: list[int]
    max_tokens: int
    kind: str  # "complete", "cancel" (after ``1 + pause`` tokens) or "early" (before any)
    pause: int = 0

    @property
    def charged(self) -> tuple[int, int]:
        """(prompt, completion) tokens this request must be metered as."""
        if self.kind == "complete":
            return len(self.prompt), self.max_tokens
        if self.kind == "cancel":
            return len(self.prompt), 1 + self.pause
        return 0, 0


def _plans(rng: random.Random, teams: list[str]) -> list[Plan]:
    plans = []
    for i in range(REQUESTS):
        length, max_tokens = rng.randint(1, 8), rng.randint(2, 10)
        kind = rng.choices(["complete", "cancel", "early"], [0.5, 0.4, 0.1])[0]
        pause = rng.randint(0, max_tokens - 2)
        prompt = [rng.randint(1, 2000) for _ in range(length)]
        if kind == "cancel":
            prompt[0] = PAUSE + pause
        elif kind == "early":
            prompt[0] = HANG_PREFILL
        model = rng.choice([MODEL, MODEL_B])
        plans.append(Plan(f"m{i}", rng.choice(teams), model, prompt, max_tokens, kind, pause))
    return plans


async def _send(s: Stack, issuer: Issuer, plan: Plan, gate: asyncio.Semaphore) -> str:
    """Send ``plan``, check what the client got; the gateway's id for the call."""
    async with gate:
        fields = {
            "model": plan.model,
            "prompt_token_ids": plan.prompt,
            "max_tokens": plan.max_tokens,
            "request_id": plan.request_id,
        }
        credential = token(issuer, sub=f"user-{plan.team}", team=plan.team)
        if plan.kind == "early":
            cancel = asyncio.Event()
            asyncio.get_running_loop().call_later(0.1, cancel.set)
            reply = await s.generate(credential, cancel_when=cancel, **fields)
            assert reply.tokens == 0
            return ""  # cancelled before its first message: the client got no id
        cancel_after = 1 + plan.pause if plan.kind == "cancel" else None
        reply = await s.generate(credential, cancel_after=cancel_after, **fields)
        assert {m.request_id for m in reply.messages} == {plan.request_id}  # the client's id
        if plan.kind == "cancel":
            assert (reply.code, reply.tokens) == (grpc.StatusCode.CANCELLED, 1 + plan.pause)
            assert reply.request_id == ""  # no status, no trailer: found by its own id
            return ""
        assert (reply.code, reply.tokens) == (grpc.StatusCode.OK, plan.max_tokens)
        assert reply.final is not None
        usage = reply.final.usage
        assert (usage.prompt_tokens, usage.completion_tokens) == plan.charged
        return reply.request_id


def _metered(team: str, model: str) -> tuple[float, float]:
    labels = {"team": team, "model": model}
    return (
        METRICS.value("tandem_gateway_prompt_tokens_total", **labels),
        METRICS.value("tandem_gateway_completion_tokens_total", **labels),
    )


def test_ledger_sums_equal_what_clients_were_served(
    tmp_path: Path, issuer: Issuer, store_url: str
) -> None:
    teams = [f"ml-{uuid.uuid4().hex[:6]}", f"data-{uuid.uuid4().hex[:6]}"]  # fresh labels
    plans = _plans(random.Random(2024), teams)

    async def body() -> None:
        async with stack(tmp_path, store_url, issuer.url, workers=WORKERS) as s:
            gate = asyncio.Semaphore(IN_FLIGHT)
            ids = await asyncio.gather(*(_send(s, issuer, p, gate) for p in plans))
            settled = [p for p in plans if p.kind != "early"]
            # the cancelled ones settle after their clients are gone: wait for every row
            await harness.until(
                lambda: (
                    sum(t.requests for t in s.ledger.usage(0, 2**40, group_by=())) >= len(settled)
                ),
                timeout=15,
            )
            await asyncio.sleep(0.3)  # an early cancel admitted late would land by now

            expected: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
            for p in plans:
                prompt, completion = p.charged
                expected[p.team, p.model][0] += prompt
                expected[p.team, p.model][1] += completion
            got = {
                (dict(t.group)["team"], dict(t.group)["model"]): [
                    t.prompt_tokens,
                    t.completion_tokens,
                ]
                for t in s.ledger.usage(0, 2**40)
            }
            assert got == {k: v for k, v in expected.items() if k in got}
            assert all(v == [0, 0] for k, v in expected.items() if k not in got)
            served = [i for i in ids if i]
            completed = [p for p in plans if p.kind == "complete"]
            assert len(set(served)) == len(served) == len(completed)  # one gateway id per call
            for p, request_id in zip(plans, ids, strict=True):  # and request by request
                if p.kind == "early":
                    rows = s.ledger.find(f"user-{p.team}", p.request_id)
                    assert all((r.prompt_tokens, r.completion_tokens) == (0, 0) for r in rows)
                    continue
                if p.kind == "cancel":  # the client's own id finds the one row
                    (row,) = s.ledger.find(f"user-{p.team}", p.request_id)
                    request_id = row.request_id
                row = s.ledger.get(request_id)
                assert row is not None, p
                assert row.client_request_id == p.request_id
                assert s.ledger.find(f"user-{p.team}", p.request_id) == (row,)
                assert (row.prompt_tokens, row.completion_tokens) == p.charged, p
                assert row.outcome == ("ok" if p.kind == "complete" else "cancelled")
            for (team, model), sums in got.items():  # the counters agree with the ledger
                assert _metered(team, model) == tuple(sums)

    run(body(), timeout=90)


def test_router_retries_do_not_double_count(tmp_path: Path, issuer: Issuer) -> None:
    """d1 dies after two tokens; the router resumes on d2. One row per request, each token
    metered once."""
    workers = (
        Spec("p1", PREFILL),
        Spec("d1", DECODE, behaviour=Behaviour(die_after=2)),
        Spec("d2", DECODE),
    )

    async def body() -> None:
        store = f"sqlite:{tmp_path / 'gw.db'}"
        async with stack(tmp_path, store, issuer.url, router=ROUND_ROBIN, workers=workers) as s:
            retries, ids = [], []
            for i in range(6):
                reply = await s.generate(
                    token(issuer), prompt_token_ids=[11, 12, 13], max_tokens=8, request_id=f"x{i}"
                )
                assert (reply.code, reply.tokens) == (grpc.StatusCode.OK, 8)
                assert reply.final is not None
                retries.append(reply.final.serving.retries)
                ids.append(reply.request_id)
                row = s.ledger.get(reply.request_id)
                assert row is not None and row.client_request_id == f"x{i}"
                assert (row.prompt_tokens, row.completion_tokens) == (3, 8)
            assert retries[0] == 1 and sum(retries) >= 1  # round-robin: d1 first
            [total] = s.ledger.usage(0, 2**40, group_by=())
            assert (total.requests, total.prompt_tokens, total.completion_tokens) == (6, 18, 48)
            allows = [e for e in s.audit() if e.decision == "allow"]
            assert [e.request_id for e in allows] == ids
            assert [e.client_request_id for e in allows] == [f"x{i}" for i in range(6)]

    run(body())


def test_a_reused_client_request_id_is_still_metered(tmp_path: Path, issuer: Issuer) -> None:
    """Each served request must be metered, whatever request_id the client sends: another
    tenant (or the same one, replaying) must not be able to ride on an existing row."""
    teams = {"ann": f"ml-{uuid.uuid4().hex[:6]}", "eve": f"data-{uuid.uuid4().hex[:6]}"}

    async def body() -> None:
        store = f"sqlite:{tmp_path / 'gw.db'}"
        async with stack(tmp_path, store, issuer.url) as s:
            ids = []
            for sub in ("ann", "ann", "eve"):
                reply = await s.generate(
                    token(issuer, sub=sub, team=teams[sub]),
                    prompt_token_ids=[1, 2, 3],
                    max_tokens=4,
                    request_id="same-id",
                )
                assert (reply.code, reply.tokens) == (grpc.StatusCode.OK, 4)
                assert {m.request_id for m in reply.messages} == {"same-id"}
                ids.append(reply.request_id)
            assert len(set(ids)) == 3
            totals = {dict(t.group)["team"]: t for t in s.ledger.usage(0, 2**40, ("team",))}
            ml, data = totals[teams["ann"]], totals[teams["eve"]]
            assert (ml.requests, ml.prompt_tokens, ml.completion_tokens) == (2, 6, 8)
            assert (data.requests, data.prompt_tokens, data.completion_tokens) == (1, 3, 4)
            assert [r.request_id for r in s.ledger.find("ann", "same-id")] == ids[:2]
            assert [r.request_id for r in s.ledger.find("eve", "same-id")] == ids[2:]
            assert _metered(teams["ann"], MODEL) == (6.0, 8.0)  # the counters, twice
            assert _metered(teams["eve"], MODEL) == (3.0, 4.0)
            ok = {"team": teams["ann"], "model": MODEL, "outcome": "ok"}
            assert METRICS.value("tandem_gateway_requests_total", **ok) == 2

    run(body())


def test_tenants_sending_the_same_id_concurrently_are_metered_apart(
    tmp_path: Path, issuer: Issuer, store_url: str
) -> None:
    """Two tenants choose the same request_id at the same time: both are served in full
    (the router sees two distinct ids, so neither call is taken for the other's retry) and
    each is charged for its own."""
    teams = [f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"]
    # The decode pauses after 2 tokens until cancelled: both calls are in flight together.
    prompt = [PAUSE + 2, 7, 8, 9]

    async def one(s: Stack, team: str) -> harness.Reply:
        credential = token(issuer, sub=f"user-{team}", team=team)
        return await s.generate(
            credential, prompt_token_ids=prompt, max_tokens=8, request_id="dup", cancel_after=3
        )

    async def body() -> None:
        async with stack(tmp_path, store_url, issuer.url) as s:
            replies = await asyncio.gather(*(one(s, team) for team in teams))
            for reply in replies:
                assert (reply.code, reply.tokens) == (grpc.StatusCode.CANCELLED, 3)
                assert {m.request_id for m in reply.messages} == {"dup"}
            ids = [await s.id_of(f"user-{team}", "dup") for team in teams]
            assert ids[0] != ids[1]
            for team, request_id in zip(teams, ids, strict=True):
                row = s.ledger.get(request_id)
                assert row is not None
                assert (row.principal, row.team, row.client_request_id) == (
                    f"user-{team}",
                    team,
                    "dup",
                )
                assert (row.prompt_tokens, row.completion_tokens) == (4, 3)
                assert s.ledger.find(f"user-{team}", "dup") == (row,)
                assert _metered(team, MODEL) == (4.0, 3.0)
            decodes = s.cluster.workers["d1"].calls
            assert len({c.request.request_id for c in decodes}) == 2  # no collision upstream

    run(body())

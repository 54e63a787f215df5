"""Two gateway replicas sharing limits through one Redis: no limit is overrun under load.

Both replicas run in this process on their own ports with their own ``RedisAdmission`` (own
Redis client) and the same key prefix, in front of one router; requests alternate between
them and all are in flight at once. The admission clock is frozen at the test's start so
that no minute boundary falls inside the burst (a real boundary would legitimately admit up
to 2N, see ``limits``' header).
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import grpc
import redis

from services.gateway.limits import DAY, MINUTE, window_start
from services.gateway.limits_redis import RedisAdmission
from tests.gateway.harness import Reply, Stack, stack, token
from tests.gateway.issuer import Issuer
from tests.router.harness import run

REQUESTS = 200


def _replicas(prefix: str, now: float) -> list[RedisAdmission]:
    clients = [redis.Redis(host="127.0.0.1", port=6379, socket_timeout=5) for _ in range(2)]
    return [RedisAdmission(c, prefix=prefix, clock=lambda: now) for c in clients]


def _counter(prefix: str, key: str) -> int:
    with redis.Redis(host="127.0.0.1", port=6379) as client:
        value = client.get(prefix + key)
    return int(value) if value is not None else 0


async def _burst(s: Stack, issuer: Issuer, sizes: list[tuple[int, int]]) -> list[Reply]:
    """All requests at once, alternating replicas; each from its own user of team ml."""
    tokens = [token(issuer, sub=f"u{i}") for i in range(len(sizes))]
    return await asyncio.gather(
        *(
            s.generate(
                tokens[i],
                replica=i % 2,
                prompt_token_ids=list(range(1, prompt + 1)),
                max_tokens=max_tokens,
                request_id=f"r{i}",
                timeout=30,
            )
            for i, (prompt, max_tokens) in enumerate(sizes)
        )
    )


def test_a_request_limit_admits_exactly_n_across_replicas(
    tmp_path: Path, issuer: Issuer, prefix: str, store_url: str
) -> None:
    n = 37
    limits = f"\n[limits.team]\nrequests_per_minute = {n}\n"

    async def body() -> None:
        now = time.time()
        async with stack(
            tmp_path, store_url, issuer.url, limits=limits, replicas=2,
            admission=_replicas(prefix, now),
        ) as s:  # fmt: skip
            replies = await _burst(s, issuer, [(4, 3)] * REQUESTS)
            codes = [r.code for r in replies]
            assert codes.count(grpc.StatusCode.OK) == n
            assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == REQUESTS - n
            assert all(r.tokens == 3 for r in replies if r.code == grpc.StatusCode.OK)
            assert _counter(prefix, f"team:ml|requests|minute|{window_start(MINUTE, now)}") == n
            [total] = s.ledger.usage(0, 2**40, group_by=())
            assert (total.requests, total.prompt_tokens, total.completion_tokens) == (
                n,
                4 * n,
                3 * n,
            )
            events = s.audit()
            assert sum(e.decision == "allow" for e in events) == n
            denies = [e for e in events if e.decision == "deny"]
            assert len(denies) == REQUESTS - n
            assert all(e.reason.startswith("limit exceeded: team:ml") for e in denies)

    run(body(), timeout=60)


def test_a_daily_token_quota_is_never_exceeded_by_concurrent_streams(
    tmp_path: Path, issuer: Issuer, prefix: str, store_url: str
) -> None:
    quota = 1000
    limits = f"\n[limits.team]\ntokens_per_day = {quota}\n"
    rng = random.Random(5)
    sizes = [(rng.randint(1, 6), rng.randint(2, 12)) for _ in range(REQUESTS)]

    async def body() -> None:
        now = time.time()
        async with stack(
            tmp_path, store_url, issuer.url, limits=limits, replicas=2,
            admission=_replicas(prefix, now),
        ) as s:  # fmt: skip
            replies = await _burst(s, issuer, sizes)
            admitted = [sizes[i] for i, r in enumerate(replies) if r.code == grpc.StatusCode.OK]
            refused = [
                sizes[i]
                for i, r in enumerate(replies)
                if r.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            ]
            assert len(admitted) + len(refused) == REQUESTS
            for (_, max_tokens), r in zip(sizes, replies, strict=True):
                if r.code == grpc.StatusCode.OK:
                    assert r.tokens == max_tokens
            [total] = s.ledger.usage(0, 2**40, group_by=())
            settled = total.prompt_tokens + total.completion_tokens
            assert settled == sum(p + m for p, m in admitted)
            assert settled <= quota
            assert _counter(prefix, f"team:ml|tokens|day|{window_start(DAY, now)}") == settled
            # no false refusal: every refused request needed more than was ever left (the
            # fakes produce exactly max_tokens, so nothing was given back mid-burst)
            assert refused and min(p + m for p, m in refused) > quota - settled

    run(body(), timeout=60)

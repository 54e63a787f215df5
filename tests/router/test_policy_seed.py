"""The policy's tie-breaking seed: fresh per router process unless one is set, so replicas
that see the same tied workers spread their picks instead of all choosing alike."""

from __future__ import annotations

import asyncio

import pytest

from services.router import server
from services.router.config import RouterConfig
from services.router.policies import make_policy


def test_each_router_draws_its_own_seed_unless_one_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seeds: list[int] = []

    def recorded(name: str, seed: int = 0):
        seeds.append(seed)
        return make_policy(name, seed)

    monkeypatch.setattr(server, "make_policy", recorded)

    kept: list[int | None] = []

    async def body() -> None:
        for config in (RouterConfig(), RouterConfig(), RouterConfig(policy_seed=5)):
            router = await server.start_router(config)
            kept.append(router.config.policy_seed)  # what `tandem router` logs at start
            await router.stop(grace=0)

    asyncio.run(body())
    assert seeds[0] != seeds[1] and seeds[2] == 5
    assert kept == seeds

"""ModelCards: the router's model list, asked at most once a second whatever the outcome,
so a router that fails or hangs is not asked once per waiting request in turn."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from services.gateway import model_cards
from services.gateway.model_cards import ModelCards
from services.stubs.tandem.v1 import inference_pb2


class Router:
    """A ListModels that hangs until its deadline (``hang``) or answers with one model."""

    def __init__(self, hang: bool) -> None:
        self.hang = hang
        self.calls = 0

    async def ListModels(self, request: object, timeout: float | None = None) -> object:
        self.calls += 1
        if self.hang:
            await asyncio.sleep(timeout or 0)
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                "Deadline Exceeded",
            )
        model = inference_pb2.ModelCard(id="m", max_context_length=512)
        return inference_pb2.ListModelsResponse(models=[model])


def test_a_hung_router_is_asked_once_not_once_per_waiting_request() -> None:
    """Six chats waited for the cards behind a lock; each asked again after the one before
    timed out (the k-th waited k timeouts). One ListModels now, and all six go on."""
    router = Router(hang=True)
    cards = ModelCards(router)  # type: ignore[arg-type]

    async def body() -> list[int | None]:
        return await asyncio.gather(*(cards.context_length("m", 0.3) for _ in range(6)))

    start = time.monotonic()
    assert asyncio.run(body()) == [None] * 6
    assert router.calls == 1 and time.monotonic() - start < 0.6


def test_after_a_failure_the_router_is_asked_again_a_second_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(model_cards, "MISS_REFRESH_S", 0.2)
    router = Router(hang=True)
    cards = ModelCards(router)  # type: ignore[arg-type]

    async def body() -> list[int | None]:
        first = await cards.context_length("m", 0.05)
        router.hang = False
        soon = await cards.context_length("m", 0.05)  # within MISS_REFRESH_S: not asked
        await asyncio.sleep(0.25)
        return [first, soon, await cards.context_length("m", 0.05)]

    assert asyncio.run(body()) == [None, None, 512]
    assert router.calls == 2


def test_cached_answers_at_once_and_refreshes_in_the_background() -> None:
    router = Router(hang=False)
    cards = ModelCards(router)  # type: ignore[arg-type]

    async def body() -> list[int | None]:
        first = cards.cached("m")  # nothing known yet: a refresh starts
        for _ in range(100):
            if cards.cached("m"):
                break
            await asyncio.sleep(0.01)
        await cards.close()
        return [first, cards.cached("m")]

    assert asyncio.run(body()) == [None, 512]
    assert router.calls == 1


def test_a_router_that_keeps_failing_is_logged_once_a_minute(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Asked again every MISS_REFRESH_S while it fails (a router without ListModels): a
    warning each time filled the gateway's log, one a second."""
    monkeypatch.setattr(model_cards, "MISS_REFRESH_S", 0.0)
    cards = ModelCards(Router(hang=True))  # type: ignore[arg-type]

    async def body() -> None:
        for _ in range(5):
            await cards.context_length("m", 0.0)

    with caplog.at_level("DEBUG", logger="services.gateway.model_cards"):
        asyncio.run(body())
    levels = [r.levelname for r in caplog.records if "could not list" in r.getMessage()]
    assert levels == ["WARNING", "DEBUG", "DEBUG", "DEBUG", "DEBUG"]


def test_a_chat_arriving_during_the_first_refresh_waits_for_its_answer() -> None:
    """Marking the list asked when the ask began made a chat arriving meanwhile take "not
    stale" and go on with no context (a 16-token reply) instead of waiting for the list."""

    class Slow(Router):
        async def ListModels(self, request: object, timeout: float | None = None) -> object:
            await asyncio.sleep(0.1)
            return await super().ListModels(request, timeout)

    router = Slow(hang=False)
    cards = ModelCards(router)  # type: ignore[arg-type]

    async def body() -> list[int | None]:
        first = asyncio.ensure_future(cards.context_length("m", 1.0))
        await asyncio.sleep(0.02)  # the first ask is in flight
        return [await cards.context_length("m", 1.0), await first]

    assert asyncio.run(body()) == [512, 512]
    assert router.calls == 1

"""await_transfer: how a pull waits for its transfer on the agent thread, and every way that
wait ends (done, deadline, the caller cancelling, the thread stopping under it)."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.kv_transfer.agent_thread import AgentThread, Transfer
from services.kv_transfer.errors import KVTransferError
from services.kv_transfer.nixl_transport import await_transfer
from tests.kv_transfer.test_agent_thread import FakeAgent


async def _waiting(
    agent: FakeAgent, thread: AgentThread, handle: str
) -> tuple[Transfer, asyncio.Future[str]]:
    """A transfer posted and being checked (its script never ends it by itself), and a task
    awaiting it with a long deadline."""
    transfer = thread.transfer(lambda: handle)
    deadline = time.monotonic() + 5
    while ("check", handle) not in agent.calls and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    waiter = asyncio.ensure_future(await_transfer(transfer, 30, f"read {handle}"))
    await asyncio.sleep(0.01)
    return transfer, waiter


def test_a_finished_transfer_gives_its_state() -> None:
    agent = FakeAgent({"h1": ["PROC", "DONE"]})
    thread = AgentThread(agent, "nixl-await")

    async def body() -> str:
        return await await_transfer(thread.transfer(lambda: "h1"), 5, "read h1")

    assert asyncio.run(body()) == "DONE"
    thread.stop()


def test_a_missed_deadline_abandons_and_waits_for_the_release() -> None:
    agent = FakeAgent({"h1": ["PROC"]})
    thread = AgentThread(agent, "nixl-await")

    async def body() -> None:
        transfer = thread.transfer(lambda: "h1")
        with pytest.raises(KVTransferError, match=r"read h1 did not finish within 0\.05 s"):
            await await_transfer(transfer, 0.05, "read h1")
        assert transfer.released.done()  # nothing can write our blocks any more

    asyncio.run(body())
    thread.stop()
    assert agent.calls[-1] == ("release", "h1")


def test_the_callers_cancellation_stays_a_cancellation() -> None:
    agent = FakeAgent({"h1": ["PROC"]})
    thread = AgentThread(agent, "nixl-await")

    async def body() -> None:
        transfer, waiter = await _waiting(agent, thread, "h1")
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert transfer.released.done()

    asyncio.run(body())
    thread.stop()


def test_the_thread_stopping_under_a_transfer_is_a_transfer_error() -> None:
    """Closing the transport stops the thread, which abandons what is in flight: the pull
    gets KVTransferError, not a CancelledError that would cancel the caller's task."""
    agent = FakeAgent({"h1": ["PROC"]})
    thread = AgentThread(agent, "nixl-await")

    async def body() -> str:
        _, waiter = await _waiting(agent, thread, "h1")
        await asyncio.to_thread(thread.stop)
        with pytest.raises(KVTransferError, match="read h1: the NIXL agent thread stopped"):
            await waiter
        await asyncio.sleep(0)  # the caller's task goes on: it was not cancelled
        return "went on"

    assert asyncio.run(body()) == "went on"
    assert agent.calls[-1] == ("release", "h1")

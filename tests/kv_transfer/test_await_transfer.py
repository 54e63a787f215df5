"""await_transfer: how a pull waits for its transfer on the agent thread, and every way that
wait ends (done, deadline, the caller cancelling, the thread stopping under it)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future

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


class SlowPost(FakeAgent):
    """A post that copies for as long as ``copying`` is set, as a CPU READ copies inside
    its post: the handle can only be released after it."""

    def __init__(self, states: dict[str, list[str]]) -> None:
        super().__init__(states)
        self.copying = threading.Event()
        self.posted = threading.Event()
        self.copied = threading.Event()

    def transfer(self, handle: str) -> str:
        self.posted.set()
        self.copying.wait(10)
        self.copied.set()
        return super().transfer(handle)


def test_a_second_cancellation_does_not_end_the_wait_for_the_release() -> None:
    """A pull cancelled by its caller shortly before its own deadline is cancelled twice:
    the second cancellation cut the wait for the release short, and the pull returned while
    the READ still wrote blocks the engine freed next (a review helper counted 124 MB
    written after the return, in 15 pulls of 15)."""
    agent = SlowPost({"h1": ["DONE"]})
    thread = AgentThread(agent, "nixl-await")

    async def body() -> None:
        transfer = thread.transfer(lambda: "h1")
        await asyncio.to_thread(agent.posted.wait, 5)

        async def pull() -> str:  # as KVReader.pull bounds a pull
            async with asyncio.timeout(0.2):
                return await await_transfer(transfer, 30, "read h1")

        waiter = asyncio.ensure_future(pull())
        await asyncio.sleep(0.05)
        waiter.cancel()  # the caller; the pull's deadline cancels again at 0.2 s
        await asyncio.sleep(0.3)
        assert not waiter.done() and not agent.copied.is_set()  # still waiting on the copy
        agent.copying.set()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert transfer.released.done()  # nothing could write our blocks at the return

    asyncio.run(body())
    thread.stop()
    assert agent.calls[-1] == ("release", "h1")


def test_a_release_too_late_is_handed_to_the_blocks_owner(monkeypatch) -> None:
    """An agent thread stuck in a post past RELEASE_TIMEOUT_S: the pull gives up waiting,
    and tells ``on_unreleased`` (with the future that says when the READ can no longer write)
    instead of letting the caller free blocks the READ may still write."""
    monkeypatch.setattr("services.kv_transfer.nixl_transport.RELEASE_TIMEOUT_S", 0.1)
    agent = SlowPost({"h1": ["DONE"]})
    thread = AgentThread(agent, "nixl-await")
    told: list[Future[None]] = []

    async def body() -> None:
        transfer = thread.transfer(lambda: "h1")
        await asyncio.to_thread(agent.posted.wait, 5)
        with pytest.raises(KVTransferError, match=r"did not finish within 0\.05 s"):
            await await_transfer(transfer, 0.05, "read h1", told.append)
        assert told == [transfer.released] and not transfer.released.done()
        agent.copying.set()
        await asyncio.wrap_future(transfer.released)

    asyncio.run(body())
    thread.stop()


def test_a_release_in_time_tells_nobody() -> None:
    agent = FakeAgent({"h1": ["PROC"]})
    thread = AgentThread(agent, "nixl-await")
    told: list[Future[None]] = []

    async def body() -> None:
        with pytest.raises(KVTransferError):
            await await_transfer(thread.transfer(lambda: "h1"), 0.05, "read h1", told.append)

    asyncio.run(body())
    thread.stop()
    assert told == []

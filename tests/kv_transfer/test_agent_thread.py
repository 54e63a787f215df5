"""AgentThread with a stand-in agent: order, errors, progress ticks, transfers, stopping."""

from __future__ import annotations

import ctypes
import sys
import threading
import time

import pytest

from services.kv_transfer.agent_thread import TIMER_SLACK_NS, AgentThread


class FakeAgent:
    """Progress ticks, and transfers whose states are scripted per handle: ``states[h]``
    is what the post, then each check, reports (the last one repeats)."""

    def __init__(self, states: dict[str, list[str]] | None = None) -> None:
        self.ticks = 0
        self.threads: set[str] = set()
        self.states = states or {}
        self.calls: list[tuple[str, str]] = []

    def get_new_notifs(self) -> dict[str, list[bytes]]:
        self.ticks += 1
        self.threads.add(threading.current_thread().name)
        return {}

    def _next(self, handle: str) -> str:
        script = self.states[handle]
        state = script.pop(0) if len(script) > 1 else script[0]
        if state == "RAISE":
            raise RuntimeError(f"NIXL failed on {handle}")
        return state

    def transfer(self, handle: str) -> str:
        self.calls.append(("transfer", handle))
        return self._next(handle)

    def check_xfer_state(self, handle: str) -> str:
        self.calls.append(("check", handle))
        return self._next(handle)

    def release_xfer_handle(self, handle: str) -> None:
        self.calls.append(("release", handle))


def test_calls_run_in_order_on_the_thread() -> None:
    agent = FakeAgent()
    thread = AgentThread(agent, "nixl-test")
    seen: list[tuple[int, str]] = []
    futures = [
        thread.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
        for i in range(5)
    ]
    for f in futures:
        f.result(timeout=5)
    assert seen == [(i, "nixl-test") for i in range(5)]
    failing = thread.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=5)
    thread.stop()


def test_idle_thread_progresses_then_stops() -> None:
    agent = FakeAgent()
    thread = AgentThread(agent, "nixl-tick", progress_interval_s=0.002)
    time.sleep(0.1)
    assert agent.ticks >= 10 and agent.threads == {"nixl-tick"}
    thread.stop()
    ticks = agent.ticks
    time.sleep(0.02)
    assert agent.ticks == ticks  # stopped: no more calls into the agent
    thread.stop()  # idempotent
    with pytest.raises(RuntimeError, match="stopped"):
        thread.submit(print)


def test_a_transfer_done_at_its_post_is_released_before_its_future_resolves() -> None:
    agent = FakeAgent({"h1": ["DONE"]})
    thread = AgentThread(agent, "nixl-xfer")
    transfer = thread.transfer(lambda: "h1")
    assert transfer.state.result(timeout=5) == "DONE"
    assert transfer.released.done()  # released first, then the state was set
    assert agent.calls == [("transfer", "h1"), ("release", "h1")]
    thread.stop()


def test_a_transfer_in_flight_is_checked_until_it_ends_then_released() -> None:
    agent = FakeAgent({"h1": ["PROC", "PROC", "PROC", "DONE"], "h2": ["PROC", "ERR"]})
    thread = AgentThread(agent, "nixl-xfer")
    first, second = thread.transfer(lambda: "h1"), thread.transfer(lambda: "h2")
    assert (first.state.result(timeout=5), second.state.result(timeout=5)) == ("DONE", "ERR")
    thread.stop()
    h1 = [call for call, handle in agent.calls if handle == "h1"]
    assert h1 == ["transfer", "check", "check", "check", "release"]
    assert [call for call, handle in agent.calls if handle == "h2"] == [
        "transfer",
        "check",
        "release",
    ]


def test_an_abandoned_transfer_is_released_on_the_thread() -> None:
    agent = FakeAgent({"h1": ["PROC"]})  # never ends by itself
    thread = AgentThread(agent, "nixl-xfer")
    transfer = thread.transfer(lambda: "h1")
    deadline = time.monotonic() + 5
    while ("check", "h1") not in agent.calls and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not transfer.released.done()
    assert transfer.state.cancel()
    transfer.released.result(timeout=5)  # the owner can wait for this before reusing memory
    assert agent.calls[-1] == ("release", "h1")
    assert agent.calls.count(("release", "h1")) == 1
    thread.stop()


def test_a_transfer_cancelled_before_its_turn_is_never_made() -> None:
    agent = FakeAgent({"h1": ["DONE"]})
    thread = AgentThread(agent, "nixl-xfer")
    gate = threading.Event()
    thread.submit(gate.wait, 5)
    made: list[str] = []
    transfer = thread.transfer(lambda: made.append("h1") or "h1")
    assert transfer.state.cancel()
    gate.set()
    transfer.released.result(timeout=5)  # nothing was made, so nothing to wait for
    thread.stop()
    assert made == [] and agent.calls == []


def test_failures_reach_the_future_and_a_posted_handle_is_still_released() -> None:
    agent = FakeAgent({"h1": ["RAISE"], "h2": ["PROC", "RAISE"]})
    thread = AgentThread(agent, "nixl-xfer")

    def no_handle() -> str:
        raise ValueError("bad descriptors")

    with pytest.raises(ValueError, match="bad descriptors"):
        thread.transfer(no_handle).state.result(timeout=5)
    with pytest.raises(RuntimeError, match="NIXL failed on h1"):
        thread.transfer(lambda: "h1").state.result(timeout=5)
    with pytest.raises(RuntimeError, match="NIXL failed on h2"):
        thread.transfer(lambda: "h2").state.result(timeout=5)
    thread.stop()
    assert agent.calls.count(("release", "h1")) == 1
    assert agent.calls.count(("release", "h2")) == 1


def test_stopping_releases_transfers_still_in_flight() -> None:
    agent = FakeAgent({"h1": ["PROC"]})
    thread = AgentThread(agent, "nixl-xfer")
    transfer = thread.transfer(lambda: "h1")
    deadline = time.monotonic() + 5
    while ("check", "h1") not in agent.calls and time.monotonic() < deadline:
        time.sleep(0.001)
    thread.stop()
    assert transfer.state.cancelled() and transfer.released.done()
    assert agent.calls[-1] == ("release", "h1")


def test_the_initializer_runs_first_on_the_thread() -> None:
    agent = FakeAgent()
    ran: list[str] = []
    thread = AgentThread(
        agent, "nixl-init", initializer=lambda: ran.append(threading.current_thread().name)
    )
    thread.submit(lambda: ran.append("job")).result(timeout=5)
    thread.stop()
    assert ran == ["nixl-init", "job"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timer slack is Linux's")
def test_the_thread_waits_with_a_tight_timer_slack() -> None:
    """A watched transfer is checked every 20 µs; the kernel's default 50 µs slack would
    stretch each wait to ~80 µs."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_get_timerslack = 30
    thread = AgentThread(FakeAgent(), "nixl-slack")
    on_thread = thread.submit(libc.prctl, pr_get_timerslack, 0, 0, 0, 0).result(timeout=5)
    thread.stop()
    assert on_thread == TIMER_SLACK_NS
    assert libc.prctl(pr_get_timerslack, 0, 0, 0, 0) != TIMER_SLACK_NS  # this thread's own


class _StopDuringPut:
    """The thread's job queue, with ``stop()`` called from another thread between
    ``submit``'s check that the thread still runs and its put: the interleaving that
    queued a job behind the stop sentinel, where it never ran."""

    def __init__(self, jobs: object, thread: AgentThread) -> None:
        self._jobs = jobs
        self._thread = thread

    def put(self, item: object) -> None:
        if item is not None:
            stopper = threading.Thread(target=self._thread.stop)
            stopper.start()
            stopper.join(0.2)  # with the fix it waits for this put to finish
        self._jobs.put(item)

    def get(self, timeout: float | None = None) -> object:
        return self._jobs.get(timeout=timeout)


def test_a_job_submitted_as_the_thread_stops_runs_or_is_refused() -> None:
    """Never queued behind the stop and left unresolved: its caller (e.g. a connect, which
    waits without a deadline) would wait for ever."""
    thread = AgentThread(FakeAgent(), "nixl-race")
    thread._jobs = _StopDuringPut(thread._jobs, thread)  # type: ignore[assignment]
    try:
        future = thread.submit(lambda: "ran")
    except RuntimeError:  # refused: as good, the caller knows at once
        return
    assert future.result(timeout=2) == "ran"
    thread.stop()


def test_a_transfer_run_inline_ends_on_the_calling_thread() -> None:
    agent = FakeAgent({"h1": ["DONE"], "h2": ["PROC", "PROC", "ERR"]})
    thread = AgentThread(agent, "nixl-inline")
    assert thread.run_inline(lambda: "h1", wait_s=1.0) == "DONE"
    assert thread.run_inline(lambda: "h2", wait_s=1.0) == "ERR"
    thread.stop()
    assert agent.calls == [
        ("transfer", "h1"),
        ("release", "h1"),
        ("transfer", "h2"),
        ("check", "h2"),
        ("check", "h2"),
        ("release", "h2"),
    ]


def test_an_inline_transfer_still_in_flight_is_handed_to_the_thread() -> None:
    agent = FakeAgent({"h1": ["PROC"]})
    thread = AgentThread(agent, "nixl-inline")
    transfer = thread.run_inline(lambda: "h1", wait_s=0.001)
    assert not isinstance(transfer, str) and transfer is not None
    assert not transfer.released.done()
    agent.states["h1"] = ["DONE"]  # the copy ends: the thread's next check sees it
    assert transfer.state.result(timeout=5) == "DONE"
    assert transfer.released.done()
    assert agent.calls.count(("release", "h1")) == 1
    agent.states["h2"] = ["PROC"]  # never ends by itself
    abandoned = thread.run_inline(lambda: "h2", wait_s=0.0)
    assert abandoned is not None and not isinstance(abandoned, str)
    assert abandoned.state.cancel()
    abandoned.released.result(timeout=5)  # released on the thread
    thread.stop()
    assert agent.calls.count(("release", "h2")) == 1


def test_inline_gives_way_while_the_thread_is_busy_with_the_agent() -> None:
    """A call on the agent thread holds the agent: the inline transfer does nothing and
    says so (None), so its caller queues it there instead of waiting behind it."""
    agent = FakeAgent({"h1": ["DONE"]})
    thread = AgentThread(agent, "nixl-inline")
    entered, gate = threading.Event(), threading.Event()
    busy = thread.submit(lambda: entered.set() or gate.wait(5))
    assert entered.wait(5)
    assert thread.run_inline(lambda: "h1", wait_s=1.0) is None
    gate.set()
    busy.result(timeout=5)
    assert agent.calls == []
    assert thread.run_inline(lambda: "h1", wait_s=1.0) == "DONE"
    thread.stop()


def test_inline_failures_are_raised_and_a_posted_handle_released() -> None:
    agent = FakeAgent({"h1": ["RAISE"], "h2": ["PROC", "RAISE"]})
    thread = AgentThread(agent, "nixl-inline")

    def no_handle() -> str:
        raise ValueError("bad descriptors")

    with pytest.raises(ValueError, match="bad descriptors"):
        thread.run_inline(no_handle, wait_s=1.0)
    with pytest.raises(RuntimeError, match="NIXL failed on h1"):
        thread.run_inline(lambda: "h1", wait_s=1.0)
    with pytest.raises(RuntimeError, match="NIXL failed on h2"):
        thread.run_inline(lambda: "h2", wait_s=1.0)
    thread.stop()
    assert agent.calls.count(("release", "h1")) == 1
    assert agent.calls.count(("release", "h2")) == 1
    with pytest.raises(RuntimeError, match="stopped"):
        thread.run_inline(lambda: "h3", wait_s=1.0)
    assert ("transfer", "h3") not in agent.calls

"""AgentThread with a stand-in agent: order, errors, progress ticks, stopping."""

from __future__ import annotations

import threading
import time

import pytest

from services.kv_transfer.agent_thread import AgentThread


class FakeAgent:
    def __init__(self) -> None:
        self.ticks = 0
        self.threads: set[str] = set()
        self.pending: dict[str, list[bytes]] = {}

    def get_new_notifs(self) -> dict[str, list[bytes]]:
        self.ticks += 1
        self.threads.add(threading.current_thread().name)
        out, self.pending = self.pending, {}
        return out


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


def test_idle_thread_progresses_and_collects_notifications() -> None:
    agent = FakeAgent()
    thread = AgentThread(agent, "nixl-tick", progress_interval_s=0.002)
    agent.pending = {"peer": [b"req-1", b"req-2"]}
    time.sleep(0.1)
    assert agent.ticks >= 10 and agent.threads == {"nixl-tick"}
    assert thread.take_notifications() == [b"req-1", b"req-2"]
    assert thread.take_notifications() == []
    thread.stop()
    ticks = agent.ticks
    time.sleep(0.02)
    assert agent.ticks == ticks  # stopped: no more calls into the agent
    thread.stop()  # idempotent
    with pytest.raises(RuntimeError, match="stopped"):
        thread.submit(print)

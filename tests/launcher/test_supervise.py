"""The launcher's wait: a dead service ends it with status 1, Ctrl-C/SIGTERM with 0."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from services.launcher import supervise as sup


def test_a_service_that_exits_stops_everything_with_status_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sup, "POLL_S", 0.01)
    answers = iter(["", "", "router (status 3)"])
    stopped = []
    assert sup.supervise(lambda: next(answers), lambda: stopped.append(1)) == 1
    assert stopped == [1]
    assert "error: router (status 3) stopped unexpectedly" in capsys.readouterr().err


def test_sigterm_stops_everything_with_status_0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sup, "POLL_S", 0.01)
    previous = signal.getsignal(signal.SIGTERM)
    sup.interrupt_on_sigterm()
    stopped = []
    try:
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
        assert sup.supervise(lambda: "", lambda: stopped.append(1)) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped == [1]

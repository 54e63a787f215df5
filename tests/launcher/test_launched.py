"""die_with_launcher: a launched process set up this way goes when its launcher dies, with
no preexec_fn in the launcher (real processes; Linux)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from services.launcher.launched import LAUNCHER_PID, die_with_launcher

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

CHILD = "from services.launcher.launched import die_with_launcher as d; d(); print('up', flush=True); import time; time.sleep(60)"  # noqa: E501


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead for this purpose
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_the_child_goes_when_its_launcher_is_killed() -> None:
    launcher_code = textwrap.dedent(f"""
        import os, subprocess, sys, time
        env = dict(os.environ, {LAUNCHER_PID}=str(os.getpid()))
        child = subprocess.Popen([sys.executable, "-c", {CHILD!r}], env=env,
                                 stdout=subprocess.PIPE, start_new_session=True)
        assert child.stdout.readline().strip() == b"up"
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    launcher = subprocess.Popen(
        [sys.executable, "-c", launcher_code], stdout=subprocess.PIPE, env=dict(os.environ)
    )
    assert launcher.stdout is not None
    child_pid = int(launcher.stdout.readline())
    assert _alive(child_pid)
    launcher.kill()  # SIGKILL: the launcher cannot stop its children itself
    launcher.wait(10)
    deadline = time.monotonic() + 10
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child_pid)


def test_a_child_whose_launcher_is_already_gone_stops_at_once() -> None:
    env = dict(os.environ, **{LAUNCHER_PID: "1"})  # not its parent: its launcher is gone
    child = subprocess.run([sys.executable, "-c", CHILD], env=env, timeout=30)
    assert child.returncode == -signal.SIGTERM


def test_outside_a_launched_process_it_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LAUNCHER_PID, raising=False)
    die_with_launcher()  # no prctl, no signal: this test process goes on
    assert LAUNCHER_PID not in os.environ

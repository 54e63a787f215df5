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

from services.launcher.launched import LAUNCHER_PID

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


def _after_setup(env: dict[str, str]) -> tuple[int, bool]:
    """In a child started with ``env``, after die_with_launcher: its parent-death signal,
    and whether the launcher's variable is still there for its own children to inherit."""
    code = (
        "import ctypes, os; from services.launcher.launched import die_with_launcher as d; d(); "
        "s = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(s), 0, 0, 0); "  # GET
        f"print(s.value, {LAUNCHER_PID!r} in os.environ)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=30)
    signal_number, left = out.stdout.split()
    return int(signal_number), left == b"True"


def test_only_a_launched_process_sets_the_signal_and_it_passes_nothing_on() -> None:
    outside = {k: v for k, v in os.environ.items() if k != LAUNCHER_PID}
    assert _after_setup(outside) == (0, False)
    launched = dict(outside, **{LAUNCHER_PID: str(os.getpid())})  # this test is its parent
    assert _after_setup(launched) == (signal.SIGTERM, False)

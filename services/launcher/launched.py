"""What a process the local launcher spawned does first: tie its life to the launcher's.

The launcher used to set the child's parent-death signal in a ``preexec_fn``. That makes
``subprocess`` fork the launcher and run Python in the child before ``exec``; in a launcher
that already runs gRPC (the test process, ``tandem up``'s clients) gRPC's fork handlers then
run in that child, and now and then one aborted it ("epoll_wait error: Bad file descriptor",
status -6, nothing else in the worker's log: it never reached ``exec``). Without a
``preexec_fn`` subprocess spawns with ``vfork``, which runs no fork handlers; the child sets
the signal itself, here, as soon as it starts.
"""

from __future__ import annotations

import os
import signal
import sys

LAUNCHER_PID = "TANDEM_LAUNCHER_PID"
"""Environment variable carrying the launcher's pid to the processes it spawns."""

_PR_SET_PDEATHSIG = 1
"""prctl option (linux/prctl.h)."""


def die_with_launcher() -> None:
    """Linux: SIGTERM this process when the launcher that spawned it dies (no orphans).

    A no-op outside a launched process. The variable is removed so that this process's own
    children do not take its launcher for theirs. If the launcher died before the signal
    was set, this process is no longer its child, and it stops now.
    """
    launcher = os.environ.pop(LAUNCHER_PID, None)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(launcher):
        os.kill(os.getpid(), signal.SIGTERM)

"""How a launcher (``tandem up``, ``tandem up --ray``) waits on what it started."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable

POLL_S = 0.5
"""How often the launcher looks for a service that exited."""


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (a supervisor, ``timeout``) stop everything the way Ctrl-C does."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def supervise(dead: Callable[[], str], stop: Callable[[], None]) -> int:
    """Wait until ``dead()`` names a service that exited (exit status 1, saying so) or
    Ctrl-C / SIGTERM (0); ``stop()`` everything either way."""
    try:
        while not (gone := dead()):
            time.sleep(POLL_S)
        print(f"error: {gone} stopped unexpectedly. Stopping.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping ...", file=sys.stderr)
        return 0
    finally:
        stop()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt

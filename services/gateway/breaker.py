"""A store that just failed is not waited on again at once.

Without it, every call during an outage waits out the store's timeout, and they queue
behind the gateway's few worker threads: with Redis unresponsive, 30 concurrent calls
took 5 s to be admitted fail-open (six threads, 1 s each), and 300 would take 50 s, with
API-key checks queued behind them on the same threads.

:class:`Breaker`: after a failure, :meth:`~Breaker.allow` says no for ``cooldown_s``; then
one call is let through to probe (the others wait another cool-down), and its outcome
closes the breaker or opens it again. A probe that never reports back only costs one
cool-down: the next call after it probes in turn.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

_CLOSED = float("-inf")


class Breaker:
    """Whether to try a store, from the outcomes of the last tries (thread-safe)."""

    def __init__(self, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        """``clock``: monotonic seconds (tests pass a fake one)."""
        if not cooldown_s >= 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._skip_until = _CLOSED

    def allow(self) -> bool:
        """True to try the store (then :meth:`record` the outcome); False to skip it."""
        with self._lock:
            now = self._clock()
            if now < self._skip_until:
                return False
            if self._skip_until != _CLOSED:  # the cool-down is over: this call probes
                self._skip_until = now + self.cooldown_s
            return True

    def record(self, ok: bool) -> None:
        """The outcome of a try: a success closes the breaker, a failure opens it."""
        with self._lock:
            self._skip_until = _CLOSED if ok else self._clock() + self.cooldown_s

    @property
    def is_open(self) -> bool:
        """Whether the last try failed and none has succeeded since."""
        with self._lock:
            return self._skip_until != _CLOSED

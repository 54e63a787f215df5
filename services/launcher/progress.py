"""What a launcher says while its services start: which started, which is awaited, which
became ready and when.

A start takes from seconds (tandem-tiny on a warm cache) to minutes (a large model loading
on every worker); without a word meanwhile a user cannot tell a slow load from a hang. On a
terminal a tqdm bar counts the steps and names the one awaited, with the ready lines printed
above it; elsewhere (a log, a pipe, a test) each step is one plain line, and a step that takes
long is said again every ``STILL_WAITING_S``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from tqdm import tqdm

STILL_WAITING_S = 15.0
"""Plain lines: how often a step still awaited is said again (the bar shows its clock)."""
INDENT = "  "
"""Progress lines sit under the launcher's "starting ..." line."""


class StartProgress:
    """Progress of one start on ``stream``; ``stream=None`` says nothing (the launcher's
    default, for its callers other than ``tandem up``)."""

    def __init__(self, stream: TextIO | None, bar: bool | None = None) -> None:
        """``bar``: a tqdm bar (None: when ``stream`` is a terminal)."""
        self._stream = stream
        self._bar_wanted = _is_tty(stream) if bar is None else bar
        self._bar: tqdm | None = None
        self._began = time.monotonic()
        self._awaited = ""
        self._awaited_since = 0.0
        self._checks = 0
        self._said_at = 0.0

    def started(self, names: list[str], steps: int) -> None:
        """``names`` were launched; ``steps`` readiness steps follow (the clock starts)."""
        self._began = time.monotonic()
        self._line(f"started {', '.join(names)}")
        if self._stream is not None and self._bar_wanted:
            from tqdm import tqdm

            self._bar = tqdm(
                total=steps,
                file=self._stream,
                leave=False,  # the ready lines stay; the bar goes once everything is up
                bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}]",
                dynamic_ncols=True,
            )

    def waiting(self, what: str) -> None:
        """``what`` (a service's name, or a phrase) is awaited now. Said once it did not
        answer the first look, so a step already done reads as one "ready" line."""
        self._awaited, self._awaited_since, self._checks = what, time.monotonic(), 0
        if self._bar is not None:
            self._bar.set_description_str(f"{INDENT}waiting for {what}")

    def tick(self) -> None:
        """Called before every look at the awaited step."""
        self._checks += 1
        now = time.monotonic()
        if self._bar is not None:
            self._bar.refresh()  # its clock
        elif self._checks == 2:  # the first look found it not ready
            self._said_at = now
            self._line(f"waiting for {self._awaited} ...")
        elif self._checks > 2 and now - self._said_at >= STILL_WAITING_S:
            self._said_at = now
            self._line(f"still waiting for {self._awaited} ({now - self._awaited_since:.0f} s)")

    def ready(self, what: str, state: str = "ready") -> None:
        """``what`` is done: one line "WHAT STATE (N s)", N the time since ``started``."""
        self._line(f"{what} {state} ({time.monotonic() - self._began:.1f} s)")
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        """Remove the bar (after success or failure, before anything else is printed)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _line(self, text: str) -> None:
        if self._stream is None:
            return
        if self._bar is not None:
            self._bar.write(INDENT + text, file=self._stream)
        else:
            print(INDENT + text, file=self._stream, flush=True)


def _is_tty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream
        return False

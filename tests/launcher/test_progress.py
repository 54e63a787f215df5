"""What the launcher says while services start: one plain line per step off a terminal (a
tqdm bar on one), and nothing in the way of a start failure's one message."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from services.launcher import progress as progress_module
from services.launcher.local import ClusterConfig, LocalCluster, free_port
from services.launcher.progress import StartProgress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(stream: io.StringIO) -> list[str]:
    """The lines, times replaced by N (they vary)."""
    return [re.sub(r"\d+\.\d s|\d+ s", "N s", line) for line in stream.getvalue().splitlines()]


def test_plain_lines_say_what_started_waits_and_became_ready() -> None:
    out = io.StringIO()
    progress = StartProgress(out)
    progress.started(["router", "decode-0"], 3)
    progress.waiting("router to serve")
    progress.tick()  # the first look: serving already, so no "waiting" line
    progress.ready("router")
    progress.waiting("decode-0 to serve")
    progress.tick()
    progress.tick()  # not serving at the first look: now it is said
    progress.tick()
    progress.ready("decode-0")
    progress.ready("tandem-tiny", "registered with the router")
    progress.close()
    assert _lines(out) == [
        "  started router, decode-0",
        "  router ready (N s)",
        "  waiting for decode-0 to serve ...",
        "  decode-0 ready (N s)",
        "  tandem-tiny registered with the router (N s)",
    ]


def test_a_long_wait_is_said_again(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    progress = StartProgress(out)
    progress.started(["prefill-0"], 2)
    progress.waiting("prefill-0 to serve")
    for _ in range(4):  # at 0, 8 ("waiting for"), 16 and 24 s (said again: 16 s later)
        progress.tick()
        clock[0] += 8.0
    assert out.getvalue().splitlines()[-2:] == [
        "  waiting for prefill-0 to serve ...",
        "  still waiting for prefill-0 to serve (24 s)",
    ]


def test_on_a_terminal_a_bar_counts_the_steps_and_goes_away() -> None:
    out = _Terminal()
    progress = StartProgress(out)
    progress.started(["router"], 2)
    progress.waiting("router to serve")
    progress.tick()
    progress.tick()
    progress.ready("router")
    progress.close()
    text = out.getvalue()
    assert "  waiting for router to serve " in text and "0/2" in text  # the bar
    assert "  router ready (" in text
    assert text.endswith("\r")  # cleared: the next line starts clean
    assert "waiting for router to serve ..." not in text  # the bar says it, not a line


def test_a_child_failing_to_start_closes_the_progress_first(
    tmp_path: Path, tandem_home: Path
) -> None:
    out = io.StringIO()
    config = ClusterConfig(
        prefill=0,
        decode=1,
        port=free_port(),
        log_dir=tmp_path,
        router_args=("--no-such-flag",),  # the router exits 2 at once
        startup_timeout_s=60,
    )
    cluster = LocalCluster(config, progress=StartProgress(out, bar=True))
    with pytest.raises(RuntimeError, match="router exited with status 2 while starting"):
        cluster.start()
    text = out.getvalue()
    assert text.startswith("  started router, decode-0\n") and text.endswith("\r")
    assert "ready" not in text
    assert all(c.process.returncode is not None for c in cluster.children)

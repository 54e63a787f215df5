"""Optional torch.profiler wrapper that writes where CPU time went to a text file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TOP_ROWS = 25


@contextmanager
def cpu_profile(path: Path | None, title: str) -> Iterator[None]:
    """Profile the block (CPU activities) and write key_averages by self CPU time to ``path``.

    With ``path`` None the block runs unprofiled.
    """
    if path is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=TOP_ROWS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"{title}\nTop {TOP_ROWS} operators by self CPU time (torch.profiler, CPU activities)\n\n"
        f"{table}\n",
        encoding="utf-8",
    )

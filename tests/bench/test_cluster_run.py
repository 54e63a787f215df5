"""compare_runs: every configuration run once, in order, and the summary written and shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.bench.cluster_run import compare_runs


def test_compare_runs_runs_each_in_order_and_writes_the_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ran: list[str] = []

    def run(name: str) -> dict:
        ran.append(name)
        return {"score": len(ran)}

    def summarize(results: dict[str, dict]) -> str:
        return " | ".join(f"{name}={r['score']}" for name, r in results.items())

    out = tmp_path / "new" / "dir"
    results = compare_runs(out, ["b", "a"], run, summarize)
    assert ran == ["b", "a"] and results == {"b": {"score": 1}, "a": {"score": 2}}
    assert (out / "summary.md").read_text() == "b=1 | a=2\n"
    assert capsys.readouterr().out == "b=1 | a=2\n"

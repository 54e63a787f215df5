"""compare_runs: every configuration run once, in order, and the summary written and shown;
--device: parsed once, handed to every worker."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from services.bench.cluster_run import add_device_arg, compare_runs, device_args


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


@pytest.mark.parametrize(
    ("argv", "flags"),
    [
        ([], ()),
        (["--device", "cuda:1"], ("--device", "cuda:1")),
        (["--device", "cpu"], ("--device", "cpu")),
    ],
)
def test_device_flag_becomes_worker_flags(argv: list[str], flags: tuple[str, ...]) -> None:
    parser = argparse.ArgumentParser()
    add_device_arg(parser)
    assert device_args(parser.parse_args(argv).device) == flags

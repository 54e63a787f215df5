"""The CPU budget the engine sizes torch's thread pool to: a container's CPU limit, not the
machine's cores (16 threads on 4 CPUs' quota spent most of each period throttled)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.engine import cpu_budget, engine
from services.engine.cpu_budget import cgroup_cpu_limit, usable_cpus
from services.engine.engine import EngineConfig, LLMEngine


@pytest.fixture(autouse=True)
def _dirs(tmp_path: Path) -> None:
    for name in ("a", "b", "c", "d"):
        (tmp_path / name).mkdir()


def _v2(root: Path, text: str) -> Path:
    (root / "cpu.max").write_text(text)
    return root


def _v1(root: Path, quota: str, period: str) -> Path:
    (root / "cpu").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text(quota)
    (root / "cpu" / "cpu.cfs_period_us").write_text(period)
    return root


def test_cgroup_v2_and_v1_quotas(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(_v2(tmp_path / "a", "400000 100000\n")) == 4.0
    assert cgroup_cpu_limit(_v2(tmp_path / "b", "max 100000\n")) is None
    assert cgroup_cpu_limit(_v1(tmp_path / "c", "150000\n", "100000\n")) == 1.5
    assert cgroup_cpu_limit(_v1(tmp_path / "d", "-1\n", "100000\n")) is None
    assert cgroup_cpu_limit(tmp_path / "nothing") is None


def test_usable_cpus_is_the_affinity_capped_by_the_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_budget.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert usable_cpus(_v2(tmp_path / "a", "400000 100000")) == 4
    assert usable_cpus(_v2(tmp_path / "b", "50000 100000")) == 1  # half a CPU: one thread
    assert usable_cpus(_v2(tmp_path / "c", "250000 100000")) == 3  # rounded up
    assert usable_cpus(tmp_path / "d") == 64  # no quota: the affinity


def test_the_engine_never_runs_more_threads_than_its_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        monkeypatch.setattr(engine, "usable_cpus", lambda: 2)
        LLMEngine("tandem-tiny", EngineConfig(dtype="float32", device="cpu", num_blocks=8))
        assert torch.get_num_threads() == 2
        LLMEngine(
            "tandem-tiny",
            EngineConfig(dtype="float32", device="cpu", num_blocks=8, num_threads=3),
        )
        assert torch.get_num_threads() == 3  # an explicit --num-threads wins
    finally:
        torch.set_num_threads(before)

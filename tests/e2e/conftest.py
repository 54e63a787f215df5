"""Real multi-process clusters (router + workers on loopback) for end-to-end tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.engine.engine import EngineConfig, LLMEngine
from services.launcher.local import ClusterConfig, LocalCluster, free_port

# float32 on every worker and in the reference engine: greedy tokens must match
# exactly, and bf16 rounding could differ between batch shapes.
# TANDEM_E2E_DEVICE=cuda runs workers and the reference on the GPU (KV pools in
# device memory, so NIXL moves VRAM); the default is the CPU that CI has.
DEVICE = os.environ.get("TANDEM_E2E_DEVICE", "cpu")
WORKER_ARGS = ("--dtype", "float32", "--kv-cache-gib", "0.25", "--device", DEVICE)


@pytest.fixture(scope="session")
def tandem_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private model cache shared by this process and every cluster child."""
    home = tmp_path_factory.mktemp("tandem-home")
    old = os.environ.get("TANDEM_HOME")
    os.environ["TANDEM_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("TANDEM_HOME", None)
    else:
        os.environ["TANDEM_HOME"] = old


@pytest.fixture(scope="session")
def reference_engine(tandem_home: Path) -> LLMEngine:
    """The offline engine every served result is compared with."""
    return LLMEngine("tandem-tiny", EngineConfig(dtype="float32", device=DEVICE))


# These tests are about the prefill → decode hand-off, so the router must not
# take its shortcut of prefilling short or already-cached prompts on the decode
# worker (tests/router/test_conditional_disagg.py covers that shortcut).
ALWAYS_DISAGGREGATE = ("--local-prefill-max-tokens", "0", "--local-prefill-min-cached", "2")


def start_cluster(tmp: Path, router_args: tuple[str, ...] = (), **config: object) -> LocalCluster:
    cluster = LocalCluster(
        ClusterConfig(
            port=free_port(),
            worker_args=WORKER_ARGS,
            log_dir=tmp / "logs",
            metrics=True,
            router_args=(*ALWAYS_DISAGGREGATE, *router_args),
            **config,
        )
    )
    cluster.start()
    return cluster

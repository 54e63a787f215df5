"""Real multi-process clusters (router + workers on loopback) for end-to-end tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.engine.engine import EngineConfig, LLMEngine
from services.engine.sampling_params import SamplingParams
from services.launcher.local import ClusterConfig, LocalCluster, free_port

# float32 on every worker and in the reference engine: greedy tokens must match
# exactly, and bf16 rounding could differ between batch shapes.
# TANDEM_E2E_DEVICE=cuda runs workers and the reference on the GPU (KV pools in
# device memory, so NIXL moves VRAM); the default is the CPU that CI has.
# TANDEM_E2E_KV_LAYOUT=layer-major runs every worker with the other KV pool order.
DEVICE = os.environ.get("TANDEM_E2E_DEVICE", "cpu")
KV_LAYOUT = os.environ.get("TANDEM_E2E_KV_LAYOUT", "slot-major")
WORKER_ARGS = (
    *("--dtype", "float32", "--kv-cache-gib", "0.25"),
    *("--device", DEVICE, "--kv-layout", KV_LAYOUT),
)


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


_GREEDY: dict[tuple[object, ...], list[int]] = {}
"""The longest greedy run seen per (model, engine config, prompt), for the whole session."""


def offline_tokens(engine: LLMEngine, prompt: list[int], max_tokens: int) -> list[int]:
    """The tokens the offline engine gives ``prompt`` alone at temperature 0.

    Remembered for the session, because the long references cost seconds each on two
    cores and several tests compare with the same one. A shorter run's tokens are the
    prefix of a longer one's: one sequence, greedy, EOS ignored, so each step computes
    the same thing whatever ``max_tokens`` is."""
    key = (engine.model_id, engine.config, tuple(prompt))
    known = _GREEDY.get(key, [])
    if len(known) < max_tokens:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        (done,) = engine.generate([prompt], params)
        known = _GREEDY[key] = list(done.token_ids)
    return known[:max_tokens]


# These tests are about the prefill → decode hand-off, so the router must not
# take its shortcut of prefilling short or already-cached prompts on the decode
# worker (tests/router/test_conditional_disagg.py covers that shortcut).
ALWAYS_DISAGGREGATE = ("--local-prefill-max-tokens", "0", "--local-prefill-min-cached", "2")


def start_cluster(tmp: Path, router_args: tuple[str, ...] = (), **config: object) -> LocalCluster:
    config.setdefault("worker_args", WORKER_ARGS)
    cluster = LocalCluster(
        ClusterConfig(
            port=free_port(),
            log_dir=tmp / "logs",
            metrics=True,
            router_args=(*ALWAYS_DISAGGREGATE, *router_args),
            **config,
        )
    )
    cluster.start()
    return cluster

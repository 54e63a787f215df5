"""The engine's dtype when none is asked for: the checkpoint's, except half precision on a
CPU without kernels for it (float32 there: torch's fallback is ~80x slower)."""

from __future__ import annotations

import pytest
import torch

from services.engine.engine import EngineConfig, LLMEngine, default_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("fast", [True, False])
def test_half_precision_on_a_cpu_follows_its_kernels(
    monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: fast)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: fast)
    want = "bfloat16" if fast else "float32"
    assert default_dtype("bfloat16", CPU) == want
    assert default_dtype("float16", CPU) == ("float16" if fast else "float32")
    assert default_dtype("float32", CPU) == "float32"
    assert default_dtype("bfloat16", CUDA) == "bfloat16"  # GPUs compute in it natively


def test_the_engine_uses_it_and_an_explicit_dtype_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    config = EngineConfig(device="cpu", num_blocks=8)
    assert LLMEngine("tandem-tiny", config).dtype == torch.float32  # a bfloat16 checkpoint
    forced = EngineConfig(device="cpu", num_blocks=8, dtype="bfloat16")
    assert LLMEngine("tandem-tiny", forced).dtype == torch.bfloat16


def test_a_torch_without_the_probe_keeps_the_checkpoints_dtype(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A build without oneDNN cannot say: the checkpoint's dtype, as before."""

    class NoProbe:
        def __getattr__(self, name: str) -> object:
            raise AttributeError(name)

    monkeypatch.setattr(torch.ops, "mkldnn", NoProbe())
    assert default_dtype("bfloat16", CPU) == "bfloat16"

"""The transformers baseline: the same prompts through ``model.generate`` on the same weights.

Greedy, exactly ``max_new_tokens`` per prompt (min_new_tokens equal to it, so EOS cannot
end a row early), in batches of at most ``batch_size`` - the same cap the engine runs
under. All prompts have the same length, so batches need no padding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from services.bench.figures import Figures

NAME = "transformers"
WARMUP_NEW_TOKENS = 4


def load_transformers(model_dir: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """The checkpoint as a transformers model, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def warm_up(model: Any, prompt: list[int]) -> None:
    """One short untimed generate(): first calls pay for kernel selection and allocation."""
    _generate(model, [prompt], WARMUP_NEW_TOKENS)


def time_generate(
    model: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    on_progress: Callable[[int], None] | None = None,
) -> Figures:
    """Run every prompt, ``batch_size`` at a time, and time the whole pass."""
    output_tokens = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        output_tokens += _generate(model, batch, max_new_tokens).numel()
        if on_progress:
            on_progress(len(batch))
    wall = time.perf_counter() - start
    prompt_tokens = sum(len(p) for p in prompts)
    return Figures(NAME, len(prompts), prompt_tokens, output_tokens, wall)


@torch.inference_mode()
def _generate(model: Any, batch: list[list[int]], new_tokens: int) -> torch.Tensor:
    """The generated ids, [len(batch), new_tokens], on the CPU (which also waits for a GPU)."""
    ids = torch.tensor(batch, device=model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=_pad_id(model),
    )
    return out[:, ids.shape[1] :].cpu()


def _pad_id(model: Any) -> int | None:
    # Unused (no row ends early, no padding), but passing one keeps generate() from
    # warning on checkpoints that define none.
    config = model.generation_config
    eos = config.eos_token_id
    return config.pad_token_id if config.pad_token_id is not None else _first(eos)


def _first(value: int | list[int] | None) -> int | None:
    return value[0] if isinstance(value, list) else value

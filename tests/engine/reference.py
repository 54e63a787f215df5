"""Random Llama-family checkpoints built with transformers, and its greedy output.

transformers is the reference implementation: the engine's greedy tokens must
equal its tokens, and its fp32 logits must agree to 1e-3.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_checkpoint(
    directory: Path, tokenizer_dir: Path, arch: str, seed: int = 0, **overrides: object
) -> Path:
    """Save a small random ``arch`` (llama | qwen2 | mistral) model with the given tokenizer."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }
    config_cls, model_cls = classes[arch]
    params: dict[str, object] = {
        "vocab_size": 4096,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention
        "max_position_embeddings": 512,
        # Wider than the default 0.02 so greedy choices are not near-ties that
        # float rounding could flip.
        "initializer_range": 0.08,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    params.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**params)).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory


# TANDEM_TEST_DEVICE=cuda runs the reference and the engine on the GPU (the device check
# in bench/gpu/); CI has only the CPU.
DEVICE = os.environ.get("TANDEM_TEST_DEVICE", "cpu")


def load_reference(directory: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.to(DEVICE).eval()


@torch.inference_mode()
def greedy_tokens(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation, EOS not stopping it (the engine uses ignore_eos)."""
    ids = torch.tensor([prompt], device=DEVICE)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@torch.inference_mode()
def last_logits(model, prompt: list[int]) -> torch.Tensor:
    return model(torch.tensor([prompt], device=DEVICE)).logits[0, -1].float().cpu()

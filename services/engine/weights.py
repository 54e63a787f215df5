"""Load a Hugging Face safetensors checkpoint into ``CausalLM``.

Checkpoint names map one to one onto the module's, except q/k/v and gate/up,
which are concatenated into the fused projections. Every expected tensor must
be present with the right shape; anything missing or misshapen is a
CheckpointError naming the tensor, never a silently random weight.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from services.engine.errors import CheckpointError
from services.engine.model import CausalLM

_FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
# Tensors some checkpoints carry that the model recomputes.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in the directory, by name."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir} holds no *.safetensors weight files")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    tensors[name] = f.get_tensor(name)
        except Exception as e:  # safetensors raises several types for a corrupt file
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    return tensors


def load_weights(
    model: CausalLM, model_dir: Path, dtype: torch.dtype, device: torch.device
) -> None:
    """Give ``model``'s parameters the checkpoint's tensors, as ``dtype`` on ``device``.

    The parameters are replaced, not copied into, so ``model`` may be built on the meta
    device (no memory, no random initialisation, no second copy of the weights).
    """
    tensors = {k: v for k, v in read_checkpoint(model_dir).items() if not _IGNORED.match(k)}
    if model.config.tie_word_embeddings:
        tensors.setdefault("lm_head.weight", tensors.get("model.embed_tokens.weight"))
    used: set[str] = set()
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        source = _fetch(tensors, name, used, model_dir)
        if source.shape != param.shape:
            raise CheckpointError(
                f"{model_dir}: tensor for {name} has shape {tuple(source.shape)}, "
                f"config.json implies {tuple(param.shape)}"
            )
        state[name] = source.to(device=device, dtype=dtype)
    unused = sorted(set(tensors) - used)
    if unused:
        raise CheckpointError(
            f"{model_dir}: {len(unused)} tensors do not belong to a "
            f"{model.config.model_type} model with this config, e.g. {unused[:3]}"
        )
    model.load_state_dict(state, strict=True, assign=True)


def _fetch(
    tensors: dict[str, torch.Tensor | None], name: str, used: set[str], model_dir: Path
) -> torch.Tensor:
    for fused, parts in _FUSED.items():
        if f".{fused}." in name:
            names = [name.replace(fused, part) for part in parts]
            return torch.cat([_take(tensors, n, used, model_dir) for n in names], dim=0)
    return _take(tensors, name, used, model_dir)


def _take(
    tensors: dict[str, torch.Tensor | None], name: str, used: set[str], model_dir: Path
) -> torch.Tensor:
    tensor = tensors.get(name)
    if tensor is None:
        raise CheckpointError(f"{model_dir}: weight {name!r} is missing from the checkpoint")
    used.add(name)
    return tensor

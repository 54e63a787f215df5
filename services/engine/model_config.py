"""What the engine needs from a checkpoint's config.json, read from either layout.

Published checkpoints mostly use the older layout (``rope_theta``,
``rope_scaling``, ``torch_dtype``); transformers 5 writes ``rope_parameters``
and ``dtype``. Both are read here into one frozen record, so nothing else in the
engine looks at raw JSON. No torch import: the router reads configs too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.engine.errors import CheckpointError

SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters."""

    theta: float
    """Base of the rotary frequencies."""
    rope_type: str = "default"
    """default, linear (positions divided by factor) or llama3 (frequency-band scaling)."""
    factor: float = 1.0
    """Scaling factor for linear and llama3."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max/low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max/high_freq_factor are left alone."""
    original_max_position_embeddings: int = 8192
    """llama3: the context length the model was pre-trained with."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder."""

    model_type: str
    """llama, mistral or qwen2."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    """Fewer than num_heads means grouped-query attention."""
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    qkv_bias: bool
    """Biases on the q/k/v projections (Qwen2 always, Llama when attention_bias)."""
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    """The output projection reuses the input embedding matrix."""
    dtype: str
    """Checkpoint dtype: float32, bfloat16 or float16."""
    sliding_window: int | None = None
    """Mistral's attention window; the engine caps its context to it."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()


def load_model_config(model_dir: Path) -> ModelConfig:
    """Read and check ``model_dir/config.json``; CheckpointError names what is wrong."""
    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: a model directory needs config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return parse_model_config(raw, source=str(path))


def parse_model_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported; "
            f"Tandem runs {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )

    def need(key: str) -> Any:
        if key not in raw:
            raise CheckpointError(f"{source}: missing required field {key!r}")
        return raw[key]

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise CheckpointError(
            f"{source}: num_attention_heads ({heads}) must be a multiple of "
            f"num_key_value_heads ({kv_heads})"
        )
    dtype = str(raw.get("dtype") or raw.get("torch_dtype") or "float32")
    if dtype not in DTYPES:
        raise CheckpointError(f"{source}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    is_qwen = model_type == "qwen2"
    window = raw.get("sliding_window") if raw.get("use_sliding_window", not is_qwen) else None
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(raw.get("head_dim") or hidden // heads),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope=_parse_rope(raw, source),
        qkv_bias=is_qwen or bool(raw.get("attention_bias", False)),
        o_bias=(not is_qwen) and bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        dtype=dtype,
        sliding_window=int(window) if window else None,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_as_ids(raw.get("eos_token_id")),
    )


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
    # transformers 5: rope_parameters holds theta and scaling together.
    params = raw.get("rope_parameters")
    if params is None:
        params = dict(raw.get("rope_scaling") or {})
        params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"{source}: rope type {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return RopeConfig(
        theta=float(params.get("rope_theta", raw.get("rope_theta", 10000.0))),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return (int(value),)


def model_identity(model_dir: Path) -> str:
    """A short name that changes when the model's architecture, tokenizer or weights do.

    It goes into every block hash and the KV handshake, so two workers share
    prefix-cache entries or KV only when they serve the same model. Hashing whole
    weight files would cost seconds per GB at every start, so each shard stands in
    by a cheap fingerprint (``_shard_fingerprint``): a few MiB read per shard.
    """
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json"):
        path = model_dir / name
        if path.exists():
            h.update(name.encode() + b"\0" + path.read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        h.update(_shard_fingerprint(path))
    return f"{model_dir.name}@{h.hexdigest()[:16]}"


_FINGERPRINT_SPAN = 1 << 20
"""Bytes of tensor data hashed at each end of a shard."""
_MAX_HEADER = 16 << 20
"""Most header bytes read (real safetensors headers are KiBs to a few MiB)."""


def _shard_fingerprint(path: Path) -> bytes:
    """SHA-256 of a safetensors shard's JSON header (tensor names, dtypes, shapes,
    offsets) and of the first and last MiB of its tensor data: two checkpoints of one
    architecture (say, two fine-tunes) differ there, and it reads at most a few MiB
    whatever the shard's size. A file that is not valid safetensors is hashed the same
    way from byte 0 (loading it fails later with a clear error)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        data_start = 8 + n if 0 < n <= min(_MAX_HEADER, size - 8) else 0
        f.seek(0)
        h.update(f.read(min(data_start, _MAX_HEADER + 8)))  # the size prefix and header
        h.update(f.read(_FINGERPRINT_SPAN))  # the first MiB of tensor data
        tail = max(data_start + _FINGERPRINT_SPAN, size - _FINGERPRINT_SPAN)
        if tail < size:
            f.seek(tail)
            h.update(f.read(size - tail))  # the last MiB (what the first did not cover)
    return h.digest()

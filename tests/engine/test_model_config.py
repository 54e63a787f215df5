"""config.json in both layouts (transformers 4 and 5) reads into the same ModelConfig."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from services.engine.errors import CheckpointError
from services.engine.model_config import (
    ModelConfig,
    RopeConfig,
    load_model_config,
    model_identity,
    parse_model_config,
)

LLAMA3_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def base(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
    }
    raw.update(overrides)
    return raw


OLD_LAYOUT = base(
    rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", **LLAMA3_SCALING},
    torch_dtype="bfloat16",
)
NEW_LAYOUT = base(
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3_SCALING},
    dtype="bfloat16",
)

LLAMA31_8B = ModelConfig(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope=RopeConfig(
        theta=500000.0,
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    qkv_bias=False,
    o_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    dtype="bfloat16",
    sliding_window=None,
    bos_token_id=128000,
    eos_token_ids=(128001, 128008, 128009),
)


def test_both_layouts_parse_to_the_same_config() -> None:
    assert parse_model_config(OLD_LAYOUT) == LLAMA31_8B
    assert parse_model_config(NEW_LAYOUT) == LLAMA31_8B


def test_legacy_type_key_and_defaults() -> None:
    # Older checkpoints spell the rope type "type"; no rope fields at all means default.
    linear = parse_model_config(base(rope_scaling={"type": "linear", "factor": 2.0}))
    assert linear.rope == RopeConfig(theta=10000.0, rope_type="linear", factor=2.0)
    plain = parse_model_config(base(rope_scaling=None))
    assert plain.rope == RopeConfig(theta=10000.0)
    assert plain.dtype == "float32"
    new_default = parse_model_config(
        base(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    )
    assert new_default.rope == RopeConfig(theta=1e6)


def test_qwen2_implies_qkv_bias_and_no_window_unless_enabled() -> None:
    qwen = parse_model_config(
        base(model_type="qwen2", sliding_window=4096, use_sliding_window=False)
    )
    assert (qwen.qkv_bias, qwen.o_bias, qwen.sliding_window) == (True, False, None)
    windowed = parse_model_config(
        base(model_type="qwen2", sliding_window=4096, use_sliding_window=True)
    )
    assert windowed.sliding_window == 4096


def test_llama_attention_bias_covers_qkv_and_o() -> None:
    cfg = parse_model_config(base(attention_bias=True, mlp_bias=True))
    assert (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) == (True, True, True)


def test_mistral_sliding_window_and_explicit_head_dim() -> None:
    cfg = parse_model_config(
        base(model_type="mistral", sliding_window=4096, head_dim=96, tie_word_embeddings=True)
    )
    assert (cfg.sliding_window, cfg.head_dim, cfg.tie_word_embeddings) == (4096, 96, True)
    assert (
        parse_model_config(base(model_type="mistral", sliding_window=None)).sliding_window is None
    )


def test_missing_kv_heads_means_multi_head_attention() -> None:
    raw = base(head_dim=None)
    del raw["num_key_value_heads"]
    cfg = parse_model_config(raw)
    assert (cfg.num_kv_heads, cfg.head_dim) == (32, 128)


def test_eos_as_a_single_id_or_absent() -> None:
    assert parse_model_config(base(eos_token_id=2)).eos_token_ids == (2,)
    assert parse_model_config(base(eos_token_id=None)).eos_token_ids == ()


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (base(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn'"),
        (base(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4}), "rope type 'dynamic'"),
        (base(model_type="gpt2"), "model_type 'gpt2' is not supported"),
        ({k: v for k, v in base().items() if k != "model_type"}, "model_type None"),
        (base(dtype="float64"), "dtype 'float64'"),
        (base(num_key_value_heads=5), r"num_attention_heads \(32\).*num_key_value_heads \(5\)"),
        ({k: v for k, v in base().items() if k != "hidden_size"}, "'hidden_size'"),
        ({k: v for k, v in base().items() if k != "vocab_size"}, "'vocab_size'"),
    ],
)
def test_unsupported_or_incomplete_configs_raise(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        parse_model_config(raw, source="ckpt/config.json")
    with pytest.raises(CheckpointError, match=re.escape("ckpt/config.json: ")):
        parse_model_config(raw, source="ckpt/config.json")


def test_load_model_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    with pytest.raises(CheckpointError, match=re.escape(f"{path} is missing")):
        load_model_config(tmp_path)
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(f"{path} is not valid JSON")):
        load_model_config(tmp_path)
    path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        load_model_config(tmp_path)
    path.write_text(json.dumps(NEW_LAYOUT))
    assert load_model_config(tmp_path) == LLAMA31_8B


def test_model_identity_follows_config_tokenizer_and_weight_sizes(tmp_path: Path) -> None:
    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(NEW_LAYOUT))
    (model / "tokenizer.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\0" * 8)
    first = model_identity(model)
    assert first.startswith("llama@") and len(first) == len("llama@") + 16
    assert model_identity(model) == first
    (model / "model.safetensors").write_bytes(b"\1" * 8)  # same size, other bytes
    assert model_identity(model) != first
    (model / "model.safetensors").write_bytes(b"\0" * 9)
    second = model_identity(model)
    assert second != first
    (model / "tokenizer.json").write_text('{"x": 1}')
    third = model_identity(model)
    assert third != second
    (model / "config.json").write_text(json.dumps(OLD_LAYOUT))
    assert model_identity(model) != third

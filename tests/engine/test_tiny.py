"""The embedded tandem-tiny model, and resolving model names to directories."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import services.engine.tiny as tiny
from services.engine.errors import CheckpointError, ModelNotFoundError
from services.engine.model_source import resolve_model
from services.engine.tiny import TINY_MODEL_NAME, TINY_SPEC, ensure_tiny_model
from services.engine.tokenizer import Tokenizer

FILES = {
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}
STRINGS = [
    "Hello world",
    "",
    "The number 4096 is 2**12; def f(x): return x",
    "naïve café 日本語 中文 한국어",
    "emoji 😀👍🏽👨‍👩‍👧 🇺🇸",
    "  two  spaces\tand\nnewlines\r\n",
]


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir: Path) -> Path:
    """tandem-tiny as conftest builds it once per session (in its own models root)."""
    return tiny_model_dir


@pytest.fixture(scope="module")
def tandem_home(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """A $TANDEM_HOME whose models/ is that same root, so nothing is built twice."""
    home = tmp_path_factory.mktemp("tandem_home")
    (home / "models").symlink_to(tiny_dir.parent, target_is_directory=True)
    return home


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def _json(path: Path) -> dict[str, object]:
    return json.loads(path.read_text(encoding="utf-8"))


# --- building and caching ----------------------------------------------------------


def test_directory_holds_exactly_the_model_files(tiny_dir: Path) -> None:
    assert TINY_MODEL_NAME == "tandem-tiny"
    assert tiny_dir.name == "tandem-tiny-v1"
    assert {p.name for p in tiny_dir.iterdir()} == FILES
    # The staging directory was renamed away, not left behind.
    assert [p.name for p in tiny_dir.parent.iterdir()] == ["tandem-tiny-v1"]


def test_second_call_reuses_the_cached_directory(tandem_home: Path, tiny_dir: Path) -> None:
    before = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tandem_home / "models") == tandem_home / "models" / tiny_dir.name
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == before


def test_rebuild_elsewhere_is_byte_identical(
    tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = ensure_tiny_model(tmp_path_factory.mktemp("other_root"))
    assert other != tiny_dir
    assert _digests(other) == _digests(tiny_dir)


def test_losing_the_rename_race_uses_the_winners_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "tandem-tiny-v1"

    def racing_write(directory: Path) -> None:
        # Another process finishes its (identical) model while this one is writing.
        final.mkdir()
        (final / "config.json").write_text("winner", encoding="utf-8")
        (directory / "config.json").write_text("loser", encoding="utf-8")

    monkeypatch.setattr(tiny, "write_tiny_model", racing_write)
    assert ensure_tiny_model(tmp_path) == final
    assert (final / "config.json").read_text(encoding="utf-8") == "winner"
    assert [p.name for p in tmp_path.iterdir()] == ["tandem-tiny-v1"]


def test_failed_build_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_write(directory: Path) -> None:
        (directory / "config.json").write_text("{}", encoding="utf-8")
        raise OSError("disk full")

    monkeypatch.setattr(tiny, "write_tiny_model", failing_write)
    with pytest.raises(OSError, match="disk full"):
        ensure_tiny_model(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_default_root_follows_tandem_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))
    assert tiny.default_models_root() == tmp_path / "models"
    monkeypatch.delenv("TANDEM_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tiny.default_models_root() == tmp_path / ".cache" / "tandem" / "models"


# --- contents ----------------------------------------------------------------------


def test_config_describes_the_llama_shape(tiny_dir: Path) -> None:
    config = _json(tiny_dir / "config.json")
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 4096,
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
    }
    assert {k: config[k] for k in expected} == expected
    assert _json(tiny_dir / "generation_config.json") == {
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
    }
    tokenizer_config = _json(tiny_dir / "tokenizer_config.json")
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["add_bos_token"] is True
    assert tokenizer_config["model_max_length"] == 4096
    assert "tandem-tiny" in (tiny_dir / "README.md").read_text(encoding="utf-8")


def test_weights_have_hf_llama_names_shapes_and_bf16(tiny_dir: Path) -> None:
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    expected = {
        "model.embed_tokens.weight": (4096, 512),
        "model.norm.weight": (512,),
        "lm_head.weight": (4096, 512),
    }
    for i in range(8):
        p = f"model.layers.{i}"
        expected |= {
            f"{p}.self_attn.q_proj.weight": (512, 512),
            f"{p}.self_attn.k_proj.weight": (256, 512),
            f"{p}.self_attn.v_proj.weight": (256, 512),
            f"{p}.self_attn.o_proj.weight": (512, 512),
            f"{p}.mlp.gate_proj.weight": (1408, 512),
            f"{p}.mlp.up_proj.weight": (1408, 512),
            f"{p}.mlp.down_proj.weight": (512, 1408),
            f"{p}.input_layernorm.weight": (512,),
            f"{p}.post_attention_layernorm.weight": (512,),
        }
    assert {name: tuple(t.shape) for name, t in tensors.items()} == expected
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    for name, t in tensors.items():
        if "norm" in name:
            assert torch.equal(t, torch.ones_like(t)), name
    q = tensors["model.layers.0.self_attn.q_proj.weight"].float()
    assert q.std().item() == pytest.approx(512**-0.5, rel=0.02)


def test_tokenizer_has_exact_vocab_and_special_ids(tiny_dir: Path) -> None:
    tok = Tokenizer.from_dir(tiny_dir)
    assert tok.vocab_size == TINY_SPEC.vocab_size == 4096
    assert tok.bos_token_id == 0
    assert tok.eos_token_ids == frozenset({1})
    assert [tok.token_to_id(t) for t in ("<s>", "</s>", "<pad>")] == [0, 1, 2]


# --- against transformers ----------------------------------------------------------


def test_transformers_tokenizer_gives_the_same_ids(tiny_dir: Path) -> None:
    ours = Tokenizer.from_dir(tiny_dir)
    theirs = AutoTokenizer.from_pretrained(tiny_dir)
    assert theirs.bos_token_id == 0
    assert theirs.eos_token_id == 1
    for text in STRINGS:
        ids = ours.encode(text)
        assert ids[0] == 0
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids) == text


def test_transformers_loads_the_model_and_its_output_is_not_degenerate(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.dtype == torch.bfloat16
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([Tokenizer.from_dir(tiny_dir).encode(STRINGS[2])])
    with torch.no_grad():
        logits = model(ids).logits.float()[0]
    assert logits.shape == (ids.shape[1], 4096)
    assert torch.isfinite(logits).all()
    probs = logits.softmax(-1).max(-1).values
    # Neither uniform (1/4096) nor one-hot: greedy has margins, sampling has choices.
    assert probs.min().item() > 0.02
    assert probs.max().item() < 0.95
    # Different positions predict differently: the context matters.
    assert len(set(logits.argmax(-1).tolist())) > ids.shape[1] // 2


# --- resolve_model -----------------------------------------------------------------


def test_resolve_builtin_name(monkeypatch: pytest.MonkeyPatch, tandem_home: Path) -> None:
    monkeypatch.setenv("TANDEM_HOME", str(tandem_home))
    assert resolve_model("tandem-tiny") == tandem_home / "models" / "tandem-tiny-v1"


def test_resolve_complete_directory(tiny_dir: Path) -> None:
    assert resolve_model(str(tiny_dir)) == tiny_dir


@pytest.mark.parametrize(
    ("present", "missing"),
    [
        ((), "config.json, tokenizer.json, *.safetensors"),
        (("config.json", "tokenizer.json"), "*.safetensors"),
        (("config.json", "model-00001-of-00002.safetensors"), "tokenizer.json"),
        (("tokenizer.json", "model.safetensors"), "config.json"),
    ],
)
def test_incomplete_directory_names_missing_files(
    tmp_path: Path, present: tuple[str, ...], missing: str
) -> None:
    for name in present:
        (tmp_path / name).write_text("{}", encoding="utf-8")
    with pytest.raises(CheckpointError) as info:
        resolve_model(str(tmp_path))
    assert str(info.value) == (
        f"{tmp_path} is not a complete model directory: missing {missing}. "
        "A Hugging Face-format model directory holds config.json, tokenizer.json "
        "and its weights as one or more *.safetensors files"
    )


@pytest.mark.parametrize("name", ["llama-3-8b", "tandem-tiny-v1", "/no/such/dir"])
def test_unknown_model_is_not_found(name: str) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(name)
    assert str(info.value) == (
        f"unknown model '{name}': give a Hugging Face-format directory "
        "(config.json, *.safetensors, tokenizer.json) or 'tandem-tiny'"
    )


def test_a_file_is_not_a_model(tiny_dir: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        resolve_model(str(tiny_dir / "config.json"))

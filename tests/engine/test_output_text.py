"""The text a request streams reads as it would after its prompt.

A SentencePiece decoder (Llama 2, Mistral: Metaspace "▁" pieces, ``Strip(" ", 1, 0)``)
drops the leading space of a text's first word. Decoded alone, a completion's first token
lost its space ("Paris." for " Paris."), so prompt + completion read "...isParis.". The
engine decodes it after a few prompt tokens, as vLLM does; on a prefill/decode hand-off
both sides do, so the text is the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from services.engine.engine import EngineConfig, LLMEngine
from services.engine.sampling_params import SamplingParams
from tests.engine.reference import build_checkpoint

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _sentencepiece_style_tokenizer(directory: Path) -> Path:
    """A Llama-2-shaped tokenizer.json over 4,096 words "▁w3" … "▁w4095"."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"▁w{i}": i for i in range(3, 4096)}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "</s>", "<unk>")])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sentencepiece")
    tokenizer = _sentencepiece_style_tokenizer(root / "tokenizer")
    return build_checkpoint(root / "llama", tokenizer, "llama", seed=3)


def _engine(checkpoint: Path) -> LLMEngine:
    return LLMEngine(str(checkpoint), EngineConfig(dtype="float32", device="cpu", num_blocks=64))


def test_the_first_token_keeps_its_leading_space(checkpoint: Path) -> None:
    engine = _engine(checkpoint)
    prompt = engine.tokenizer.encode("w10 w11 w12")
    assert engine.tokenizer.decode(prompt) == "w10 w11 w12"
    (out,) = engine.generate([prompt], PARAMS)
    whole = engine.tokenizer.decode(prompt + list(out.token_ids))
    assert out.text.startswith(" w")
    assert "w10 w11 w12" + out.text == whole


def test_a_handed_off_request_streams_the_same_text(checkpoint: Path) -> None:
    prompt = list(range(10, 30))
    (whole,) = _engine(checkpoint).generate([prompt], PARAMS)
    prefill, decode = _engine(checkpoint), _engine(checkpoint)
    prefill.add_request("r", prompt, PARAMS, prefill_only=True)
    (first,) = prefill.step()
    assert first.text.startswith(" w") and whole.text.startswith(first.text)
    decode.add_transferred_request("r", prompt, first.token_ids[0], PARAMS)
    decode.transfer_done("r", ok=False)  # recompute here: only the text is under test
    rest = ""
    while decode.has_unfinished():
        rest += "".join(o.text for o in decode.step())
    assert first.text + rest == whole.text
    assert prefill.release_held("r")

"""Tokenizer loading, special ids, round-trips and streaming detokenization."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from services.engine.errors import CheckpointError
from services.engine.tiny import build_tiny_tokenizer, write_tokenizer_files
from services.engine.tokenizer import IncrementalDetokenizer, Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLES = [
    "Hello world",
    "",
    "naïve café, Ünïcödé — “quotes”",
    "日本語のテキストと中文",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇺🇸",
    "def f(x):\n\treturn x ** 2  # comment\r\n",
    "   leading and trailing spaces   ",
]
# Arbitrary text, minus surrogates (not encodable) and the special-token strings,
# which the tokenizer matches in text as transformers does and decode then skips.
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60).filter(
    lambda t: not any(s in t for s in ("<s>", "</s>", "<pad>"))
)


def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte → printable character map that ByteLevel tokens are spelled in."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


@pytest.fixture(scope="module")
def tiny_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with only tandem-tiny's tokenizer files (no weights, no model config)."""
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tokenizer_files(directory, build_tiny_tokenizer())
    return directory


@pytest.fixture(scope="module")
def tok(tiny_tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_tok_dir)


def _byte_token(tok: Tokenizer, byte: int) -> int:
    token_id = tok.token_to_id(_byte_to_char()[byte])
    assert token_id is not None
    return token_id


# --- loading and special ids -------------------------------------------------------


@pytest.mark.parametrize("special", [True, False])
def test_encoding_off_the_gil_gives_the_same_ids(tok: Tokenizer, special: bool) -> None:
    for text in ("The quick brown fox", "  spaces\n\ttabs ", "héllo wörld ✓", "x" * 5000):
        expected = tok.encode(text, add_special_tokens=special)
        assert tok.encode_releasing_gil(text, add_special_tokens=special) == expected


def test_ids_fall_back_to_tokenizer_config_strings(tok: Tokenizer) -> None:
    # Only tokenizer_config.json names the tokens here: "<s>" is 0, "</s>" is 1.
    assert tok.bos_token_id == 0
    assert tok.eos_token_ids == frozenset({1})
    assert tok.vocab_size == 4096


def test_generation_config_wins_over_config(tiny_tok_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_tok_dir, tmp_path, dirs_exist_ok=True)
    _write(tmp_path / "config.json", {"bos_token_id": 5, "eos_token_id": 6})
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == frozenset({6})
    _write(tmp_path / "generation_config.json", {"eos_token_id": [1, 7, 9]})
    loaded = Tokenizer.from_dir(tmp_path)
    # Each id falls back separately: BOS still comes from config.json.
    assert loaded.bos_token_id == 5
    assert loaded.eos_token_ids == frozenset({1, 7, 9})


def test_tokenizer_config_tokens_may_be_added_token_dicts(
    tiny_tok_dir: Path, tmp_path: Path
) -> None:
    shutil.copy(tiny_tok_dir / "tokenizer.json", tmp_path)
    _write(
        tmp_path / "tokenizer_config.json",
        {"bos_token": {"content": "<pad>", "special": True}, "eos_token": None},
    )
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.bos_token_id == 2
    assert loaded.eos_token_ids == frozenset()


def test_qwen2_style_checkpoint_has_no_bos_and_several_eos(tmp_path: Path) -> None:
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_tokens(sorted(pre_tokenizers.ByteLevel.alphabet()))
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    # As in Qwen2-7B-Instruct: config.json names one EOS, generation_config.json two.
    _write(tmp_path / "config.json", {"bos_token_id": 256, "eos_token_id": 258})
    _write(tmp_path / "generation_config.json", {"bos_token_id": 256, "eos_token_id": [258, 256]})
    _write(tmp_path / "tokenizer_config.json", {"bos_token": None, "eos_token": "<|im_end|>"})

    loaded = Tokenizer.from_dir(tmp_path)

    assert loaded.bos_token_id == 256
    assert loaded.eos_token_ids == frozenset({256, 258})
    assert loaded.vocab_size == 259
    ids = loaded.encode("hi!")
    assert len(ids) == 3  # three bytes, and no BOS: the template adds none
    assert 256 not in ids
    assert loaded.decode([*ids, 258]) == "hi!"
    assert loaded.decode([*ids, 258], skip_special_tokens=False) == "hi!<|im_end|>"


def test_missing_tokenizer_json_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is missing"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"model": 3', encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json cannot be loaded"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_config_names_the_file(tiny_tok_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_tok_dir / "tokenizer.json", tmp_path)
    (tmp_path / "generation_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"generation_config\.json is not valid JSON"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    ("eos", "message"),
    [
        (4096, r"EOS token id 4096 is outside the tokenizer's vocabulary of 4096"),
        (-1, r"EOS token id -1 is outside"),
        (True, r"config\.json: eos_token_id must be a token id .*, got True"),
        ("2", r"config\.json: eos_token_id must be a token id .*, got '2'"),
        ([], r"config\.json: eos_token_id must be a token id .*, got \[\]"),
    ],
)
def test_bad_eos_id_is_a_checkpoint_error(
    tiny_tok_dir: Path, tmp_path: Path, eos: object, message: str
) -> None:
    shutil.copy(tiny_tok_dir / "tokenizer.json", tmp_path)
    _write(tmp_path / "config.json", {"eos_token_id": eos})
    with pytest.raises(CheckpointError, match=message):
        Tokenizer.from_dir(tmp_path)


def test_unknown_token_string_is_a_checkpoint_error(tiny_tok_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_tok_dir / "tokenizer.json", tmp_path)
    _write(tmp_path / "tokenizer_config.json", {"eos_token": "<|eot_id|>"})
    with pytest.raises(CheckpointError, match=r"eos_token '<\|eot_id\|>' is not in tokenizer"):
        Tokenizer.from_dir(tmp_path)


def test_imports_without_torch() -> None:
    code = (
        "import sys, services.engine.tokenizer, services.engine.model_source;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


# --- encode / decode ---------------------------------------------------------------


def test_encode_prepends_bos_once(tok: Tokenizer) -> None:
    assert tok.encode("") == [0]
    ids = tok.encode("the world")
    assert ids[0] == 0
    assert 0 not in ids[1:]
    assert tok.decode(ids, skip_special_tokens=False) == "<s>the world"


def test_common_words_are_single_tokens(tok: Tokenizer) -> None:
    assert len(tok.encode(" the")) == 2
    assert len(tok.encode(" water")) == 2


@pytest.mark.parametrize("text", SAMPLES)
def test_samples_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(text=TEXT)
def test_any_text_round_trips(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


# --- incremental detokenizer -------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return [*deltas, detok.flush()]


def test_emoji_is_held_until_complete(tok: Tokenizer) -> None:
    ids = tok.encode("😀")  # <s> + one token per UTF-8 byte
    assert len(ids) == 5
    assert _stream(tok, ids) == ["", "", "", "", "😀", ""]


@pytest.mark.parametrize("text", SAMPLES)
def test_stream_equals_full_decode(tok: Tokenizer, text: str) -> None:
    ids = [*tok.encode(text), 1]  # with BOS in front and EOS behind, both skipped
    deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_flush_releases_a_partial_character(tok: Tokenizer) -> None:
    ids = tok.encode("a😀")[:-2]  # cut the emoji after two of its four bytes
    detok = IncrementalDetokenizer(tok)
    assert [detok.push([t]) for t in ids] == ["", "a", "", ""]
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""
    assert tok.decode(ids) == "a\ufffd"


def test_prompt_context_is_not_emitted(tok: Tokenizer) -> None:
    prompt = tok.encode("Hello")
    generated = tok.encode(" world 日本")[1:]
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    text = "".join(detok.push([t]) for t in generated) + detok.flush()
    assert text == " world 日本"
    assert detok.token_ids == prompt + generated


def test_invalid_bytes_stream_stays_bounded_and_exact(tok: Tokenizer) -> None:
    # A model can emit lone lead bytes forever; a complete 😀 follows 200 of them.
    lead = _byte_token(tok, 0xF0)
    ids = [lead] * 200 + [_byte_token(tok, b) for b in "😀".encode()] + [_byte_token(tok, 0x80)]
    counting = _CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting)
    deltas = [detok.push([t]) for t in ids] + [detok.flush()]
    assert "".join(deltas) == tok.decode(ids) == "\ufffd" * 200 + "😀\ufffd"
    assert "".join(deltas[:30]) != ""  # released along the way, not held to the flush
    # The window is at most one released chunk of context plus the held tokens.
    assert counting.longest <= 2 * (IncrementalDetokenizer.MAX_HELD_TOKENS + 2)


def test_decode_window_is_bounded(tok: Tokenizer) -> None:
    ids = tok.encode(" ".join(SAMPLES) * 30)
    assert len(ids) > 1500
    counting = _CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting)
    text = "".join(detok.push([t]) for t in ids) + detok.flush()
    assert text == tok.decode(ids)
    assert counting.longest <= 8


@settings(max_examples=150, deadline=None)
@given(text=TEXT, chunk=st.integers(min_value=1, max_value=7))
def test_stream_concatenation_equals_decode(tok: Tokenizer, text: str, chunk: int) -> None:
    ids = tok.encode(text)
    assert "".join(_stream(tok, ids, chunk)) == tok.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(min_value=0, max_value=4095), max_size=80))
def test_stream_of_any_ids_equals_decode(tok: Tokenizer, ids: list[int]) -> None:
    # Arbitrary ids include invalid UTF-8 byte runs and special tokens anywhere.
    assert "".join(_stream(tok, ids)) == tok.decode(ids)


class _CountingTokenizer(Tokenizer):
    """Delegates to a tokenizer and records the longest id list it was asked to decode."""

    def __init__(self, inner: Tokenizer) -> None:
        super().__init__(inner.backend, inner.bos_token_id, inner.eos_token_ids)
        self.longest = 0

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.longest = max(self.longest, len(ids))
        return super().decode(ids, skip_special_tokens=skip_special_tokens)


def _write(path: Path, data: dict[str, object]) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")

"""Text ↔ token ids for a Hugging Face-format model directory, and streaming decode.

Built on the ``tokenizers`` library alone (no torch, no transformers), because
the router tokenizes prompts to hash their blocks and the gateway counts tokens.
Encoding uses the tokenizer.json post-processor as transformers' fast tokenizer
does, so ids match the reference: Llama prepends BOS, Qwen2 adds nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from services.engine.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
# Where BOS/EOS ids are looked up, most authoritative first: generation_config.json
# is what transformers' generate() stops on (Llama 3 lists several EOS ids there).
_ID_SOURCES = ("generation_config.json", "config.json")
_TOKEN_SOURCE = "tokenizer_config.json"

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """A model's tokenizer plus the special ids generation needs."""

    def __init__(
        self,
        backend: HFTokenizer,
        bos_token_id: int | None,
        eos_token_ids: frozenset[int],
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        """Load ``path``/tokenizer.json and the BOS/EOS ids from the model's config files."""
        path = Path(path)
        backend = _load_backend(path / TOKENIZER_FILE)
        bos = _find_special_ids(path, backend, "bos")
        eos = _find_special_ids(path, backend, "eos")
        vocab_size = backend.get_vocab_size(with_added_tokens=True)
        for name, ids in (("BOS", bos), ("EOS", eos)):
            for token_id in ids:
                if not 0 <= token_id < vocab_size:
                    raise CheckpointError(
                        f"{path}: {name} token id {token_id} is outside the tokenizer's "
                        f"vocabulary of {vocab_size}; the config files and tokenizer.json "
                        "belong to different models"
                    )
        return cls(backend, bos[0] if bos else None, frozenset(eos))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, with the special tokens the model's post-processor adds
        unless ``add_special_tokens`` is False (text from a chat template holds its own)."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_releasing_gil(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``encode``'s ids, through the backend's batch call, which releases the GIL while
        it works (``encode`` holds it): run on a thread, a long text then leaves the event
        loop free (0.2 s of tokenizing stalled a loop 190 ms through ``encode``, 6 ms
        through this)."""
        batch = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)
        return list(batch[0].ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


def _load_backend(file: Path) -> HFTokenizer:
    if not file.is_file():
        raise CheckpointError(
            f"{file} is missing: a model directory must hold the Hugging Face fast "
            "tokenizer file tokenizer.json (save it with tokenizer.save_pretrained())"
        )
    try:
        return HFTokenizer.from_file(str(file))
    except Exception as exc:  # the Rust side raises plain Exception for any parse error
        raise CheckpointError(
            f"{file} cannot be loaded ({exc}); replace it with a valid tokenizer.json "
            "saved by the tokenizers library or transformers' save_pretrained()"
        ) from exc


def _find_special_ids(directory: Path, backend: HFTokenizer, kind: str) -> list[int]:
    """Ids of the ``kind`` ("bos" or "eos") token: the first config file that names one wins."""
    for name in _ID_SOURCES:
        value = read_json_object(directory / name).get(f"{kind}_token_id")
        if value is not None:
            return _as_id_list(value, directory / name, f"{kind}_token_id")
    token = read_json_object(directory / _TOKEN_SOURCE).get(f"{kind}_token")
    if isinstance(token, dict):  # serialized AddedToken: {"content": "<s>", ...}
        token = token.get("content")
    if not isinstance(token, str):
        return []
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise CheckpointError(
            f"{directory / _TOKEN_SOURCE}: {kind}_token {token!r} is not in tokenizer.json; "
            "the tokenizer files belong to different models"
        )
    return [token_id]


def _as_id_list(value: Any, file: Path, key: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    # bool is an int subclass; `true` as a token id is a broken file, not id 1.
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CheckpointError(
            f"{file}: {key} must be a token id or a non-empty list of token ids, got {value!r}"
        )
    return list(values)


def read_json_object(file: Path) -> dict[str, Any]:
    """The file's top-level object, or {} when the file is absent (a checkpoint's
    tokenizer_config.json, special_tokens_map.json and generation_config.json are optional)."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc}); fix or remove it") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas for streaming.

    Each push decodes only a short window: the tokens already released in the
    previous step (as context, so decoders that strip a leading space or merge
    byte tokens see the same neighbours as a full decode) plus the new ones.
    While the window's text ends in U+FFFD the last token(s) may be part of a
    multi-byte character split across tokens, so the text is held back until
    the character completes. Concatenating every push and ``flush()`` gives
    ``tokenizer.decode(pushed_ids)`` with special tokens skipped (checked for
    byte-level BPE on arbitrary ids, invalid UTF-8 runs included).
    """

    MAX_HELD_TOKENS = 16
    """A UTF-8 character spans at most 4 byte tokens, so text still incomplete after this
    many held tokens is invalid bytes from the model; it is then released up to the last
    boundary no later token can change, so the decode window stays small."""
    _BOUNDARY_SEARCH = 8
    """How many of the newest token boundaries a stuck release tries."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        """``prompt_ids``, if given, are context only: their text is never emitted."""
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids)
        # vLLM-style offsets: the text of ids[_prefix:_read] was already emitted and
        # serves as the decode window's context; the text of ids[_read:] was not.
        # A few prompt tokens of context give the first generated token its leading space.
        self._prefix = max(0, len(self._ids) - 4)
        self._read = len(self._ids)

    @property
    def token_ids(self) -> list[int]:
        """Every id pushed so far (prompt context first)."""
        return list(self._ids)

    def push(self, token_ids: Sequence[int]) -> str:
        """Append ``token_ids`` and return the text they complete (possibly "")."""
        # Counted before this push: one large push ending mid-character must not
        # look like a long run of invalid bytes.
        stuck = len(self._ids) - self._read > self.MAX_HELD_TOKENS
        self._ids.extend(token_ids)
        return self._release(stuck=stuck, final=False)

    def flush(self) -> str:
        """Return whatever is still held back; call once the sequence has ended."""
        return self._release(stuck=False, final=True)

    def _release(self, stuck: bool, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix, len(self._ids))
        # Hold while the tail may be a partial character, and while the new tokens
        # added no text (special tokens): moving the window past them would drop the
        # context that decides, e.g., a SentencePiece token's leading space.
        waiting = text.endswith(REPLACEMENT_CHAR) or len(text) <= len(prefix_text)
        if not waiting or final:
            return self._advance(len(self._ids), prefix_text, text)
        if stuck:
            return self._release_stuck(prefix_text, text)
        return ""

    def _release_stuck(self, prefix_text: str, text: str) -> str:
        """Release up to the newest boundary whose text later tokens cannot change.

        A boundary is final when decoding the two sides apart gives the same text as
        decoding them together and some text follows it: a partial character before
        it would have been completed, or turned into one more U+FFFD, by what follows.
        """
        end = len(self._ids)
        for split in range(end - 1, max(self._read, end - self._BOUNDARY_SEARCH), -1):
            head = self._decode(self._prefix, split)
            tail = self._decode(split, end)
            if tail and head + tail == text:
                return self._advance(split, prefix_text, head)
        # No provably final boundary (a decoder that rewrites across tokens): release
        # as decoded rather than let the window grow without bound.
        return self._advance(end, prefix_text, text)

    def _advance(self, end: int, prefix_text: str, text: str) -> str:
        """Emit ``text`` past ``prefix_text`` and slide the window to end at ``end``."""
        self._prefix, self._read = self._read, end
        return text[len(prefix_text) :]

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=True)

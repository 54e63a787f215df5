"""TextStream: stop strings across token boundaries, held-back text, and lossless deltas.

Token ids come from the tandem-tiny tokenizer (byte-level BPE): each piece below
is one token, so the tests say which token completes a stop string.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.engine.text_stream import TextStream
from services.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir)


def token(tokenizer: Tokenizer, piece: str) -> int:
    """The single token id of ``piece`` (the BOS the template adds is dropped)."""
    ids = tokenizer.encode(piece)
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == 2, f"{piece!r} is not one token: {ids}"
    return ids[1]


def run(
    tokenizer: Tokenizer, stop: tuple[str, ...], pieces: list[str]
) -> tuple[list[str], bool, TextStream]:
    """Push ``pieces`` one token each until a stop; returns the deltas, whether it stopped."""
    stream = TextStream(tokenizer, stop)
    deltas = []
    for piece in pieces:
        delta, stopped = stream.push(token(tokenizer, piece), check_stop=True)
        deltas.append(delta)
        assert stream.text.startswith("".join(deltas))  # nothing sent is ever retracted
        if stopped:
            return deltas, True, stream
    return deltas, False, stream


SENTENCE = [" the", " cat", " sat", " on", " the", " m", "at", "."]


def test_no_stop_strings_streams_every_token_at_once(tokenizer: Tokenizer) -> None:
    deltas, stopped, stream = run(tokenizer, (), SENTENCE)
    assert deltas == SENTENCE
    assert not stopped
    assert stream.finish() == ""


def test_text_is_held_back_while_it_could_start_a_stop_string(tokenizer: Tokenizer) -> None:
    # hold = len("zzzz") - 1 = 3 characters
    deltas, stopped, stream = run(tokenizer, ("zzzz",), SENTENCE)
    assert not stopped
    # Each delta ends 3 characters before the text does.
    assert deltas == [" ", "the ", "cat ", "sat", " on ", "th", "e ", "m"]
    assert stream.finish() == "at."
    assert stream.finish() == ""


def test_stop_string_inside_one_token(tokenizer: Tokenizer) -> None:
    deltas, stopped, stream = run(tokenizer, ("at",), SENTENCE)
    assert stopped
    assert deltas == [" th", "e c"]  # " cat" completed "at"; the text ends before it
    assert stream.text == " the c"


def test_stop_string_across_token_boundaries(tokenizer: Tokenizer) -> None:
    # "e cat s" spans " the", " cat" and " sat": the third token completes it.
    deltas, stopped, stream = run(tokenizer, ("e cat s",), SENTENCE)
    assert stopped
    assert len(deltas) == 3
    assert "".join(deltas) == stream.text == " th"


def test_the_earliest_stop_string_wins(tokenizer: Tokenizer) -> None:
    # Both complete on " sat"; "cat" starts earlier in the text than "sat".
    deltas, stopped, stream = run(tokenizer, ("sat", "cat s"), SENTENCE)
    assert stopped
    assert len(deltas) == 3
    assert "".join(deltas) == stream.text == " the "
    # The first stop to complete ends the text even if a longer one would start earlier.
    deltas, stopped, stream = run(tokenizer, ("the mat", " on"), SENTENCE)
    assert stopped
    assert len(deltas) == 4
    assert stream.text == " the cat sat"


def test_a_stop_string_equal_to_the_whole_text(tokenizer: Tokenizer) -> None:
    deltas, stopped, stream = run(tokenizer, (" the cat",), SENTENCE)
    assert stopped
    assert deltas == ["", ""]
    assert stream.text == ""


def test_a_near_miss_is_released_once_it_cannot_match(tokenizer: Tokenizer) -> None:
    # " the m" looks like the start of " the cat" until "at" arrives.
    deltas, stopped, stream = run(tokenizer, (" the cat",), [" on", " the", " m", "at"])
    assert not stopped
    assert "".join(deltas) + stream.finish() == " on the mat"


def test_check_stop_false_ignores_stop_strings(tokenizer: Tokenizer) -> None:
    stream = TextStream(tokenizer, ("cat",))
    out = [stream.push(token(tokenizer, p), check_stop=False) for p in SENTENCE[:3]]
    assert [stopped for _, stopped in out] == [False, False, False]
    assert "".join(d for d, _ in out) + stream.finish() == " the cat sat"


def test_turning_check_stop_on_never_retracts_sent_text(tokenizer: Tokenizer) -> None:
    stream = TextStream(tokenizer, ("ab",))
    sent = ""
    for piece, check in (("x", False), ("a", False), ("b", False), ("c", True)):
        delta, stopped = stream.push(token(tokenizer, piece), check_stop=check)
        sent += delta
        assert stream.text.startswith(sent)
        if stopped:
            break
    else:
        sent += stream.finish()
    assert sent == stream.text


def test_multibyte_characters_split_across_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" café é.")[1:]
    # é is split into byte tokens here: some token alone decodes to a partial character.
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids)
    stream = TextStream(tokenizer, ("é.",))
    deltas = []
    for i in ids:
        delta, stopped = stream.push(i, check_stop=True)
        assert "\ufffd" not in delta
        deltas.append(delta)
        if stopped:
            break
    assert stopped
    assert "".join(deltas) == stream.text == " café "


@pytest.mark.parametrize(
    ("text", "stop"),
    [
        (" the cat sat on the mat.", ()),
        (" the cat sat on the mat.", ("zzz", "q")),
        ("hello world 12345 déjà vu\n\tdef f(x): return x", ("never here",)),
    ],
)
def test_deltas_and_finish_equal_the_full_decode(
    tokenizer: Tokenizer, text: str, stop: tuple[str, ...]
) -> None:
    ids = tokenizer.encode(text)[1:]
    stream = TextStream(tokenizer, stop)
    deltas = [stream.push(i, check_stop=True) for i in ids]
    assert not any(stopped for _, stopped in deltas)
    streamed = "".join(d for d, _ in deltas) + stream.finish()
    assert streamed == tokenizer.decode(ids) == stream.text


def test_a_stop_string_completed_before_min_tokens_never_counts_later(
    tokenizer: Tokenizer,
) -> None:
    """ " cat" completes while stops are not checked (min_tokens), and the longer stop
    string keeps it held back: the first checked token must not find it there (it ended
    the request with " the" once min_tokens was reached)."""
    stream = TextStream(tokenizer, (" cat", " the cat sat down"))
    sent = ""
    for piece, check in ((" the", False), (" cat", False), (" sat", True), (" on", True)):
        delta, stopped = stream.push(token(tokenizer, piece), check_stop=check)
        sent += delta
        assert not stopped, piece
    assert sent + stream.finish() == " the cat sat on"

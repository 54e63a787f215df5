"""`tandem models --target`: the ListModels answer as a table or JSON."""

from __future__ import annotations

import json

import pytest

from services.cli.main import main
from tests.bench.test_serve_fake import MAX_CONTEXT, MODEL, VOCAB_SIZE, ScriptedInference, serving


def test_models_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    with serving(ScriptedInference()) as target:
        assert main(["models", "--target", target]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "MODEL        CONTEXT  VOCAB",
        f"{MODEL}  {MAX_CONTEXT}      {VOCAB_SIZE}",
    ]


def test_models_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    with serving(ScriptedInference()) as target:
        assert main(["models", "--target", target, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "models": [{"id": MODEL, "max_context_length": MAX_CONTEXT, "vocab_size": VOCAB_SIZE}]
    }


def test_nothing_listening_is_exit_1_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    from services.launcher.local import free_port

    target = f"127.0.0.1:{free_port()}"
    assert main(["models", "--target", target, "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: UNAVAILABLE: ")
    assert f"hint: nothing answered at {target}" in err

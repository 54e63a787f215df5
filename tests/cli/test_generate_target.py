"""`tandem generate --target`: one Generate call to a real (scripted) gRPC server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from services.cli.main import main
from services.launcher.local import free_port
from tests.bench.test_serve_fake import Failure, ScriptedInference, serving

REPO = Path(__file__).resolve().parents[2]


def _generate(target: str, *args: str) -> int:
    return main(["generate", "--target", target, *args])


def test_streams_text_as_it_arrives(capsys: pytest.CaptureFixture[str]) -> None:
    fake = ScriptedInference(first_token_s=0.0, token_gap_s=0.0)
    with serving(fake) as target:
        assert _generate(target, "--prompt", "a b c", "--max-tokens", "3") == 0
    assert capsys.readouterr().out == "t0 t1 t2 \n"
    [request] = fake.requests
    assert (request.model, request.prompt, request.max_tokens) == ("tandem-tiny", "a b c", 3)
    assert not request.prompt_token_ids and not request.HasField("seed")


def test_json_has_the_offline_shape_plus_serving(capsys: pytest.CaptureFixture[str]) -> None:
    fake = ScriptedInference(first_token_s=0.0, token_gap_s=0.0)
    args = ["--prompt-token-ids", "5,6,7,8", "--max-tokens", "2", "--json"]
    args += ["--temperature", "0", "--seed", "9", "--stop", "END", "--ignore-eos"]
    with serving(fake) as target:
        assert _generate(target, *args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {
        "token_ids": [100, 101],
        "text": "t0 t1 ",
        "finish_reason": "length",
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "cached_tokens": 2},
        "serving": {
            "prefill_worker": "prefill-0",
            "decode_worker": "decode-a",
            "kv_transfer_bytes": 2**40,
            "kv_transport": "nixl",
            "kv_blocks_reused": 0,
            "retries": 0,
            "placement": "",
            "policy": "",
        },
    }
    [request] = fake.requests
    assert list(request.prompt_token_ids) == [5, 6, 7, 8] and not request.prompt
    assert request.HasField("temperature") and request.temperature == 0.0
    assert (request.seed, list(request.stop), request.ignore_eos) == (9, ["END"], True)


@pytest.mark.parametrize(
    ("script", "args", "status", "message"),
    [
        ({}, ["--model", "other"], 2, "error: NOT_FOUND: model 'other' is not served"),
        ({"hi": Failure(grpc.StatusCode.INVALID_ARGUMENT)}, [], 2, "INVALID_ARGUMENT: scripted"),
        ({"hi": Failure(grpc.StatusCode.RESOURCE_EXHAUSTED)}, [], 1, "RESOURCE_EXHAUSTED"),
        ({"hi": Failure(grpc.StatusCode.UNAVAILABLE)}, [], 1, "error: UNAVAILABLE: scripted"),
    ],
)
def test_grpc_errors_become_exit_statuses(
    capsys: pytest.CaptureFixture[str],
    script: dict[str, Failure],
    args: list[str],
    status: int,
    message: str,
) -> None:
    with serving(ScriptedInference(failures=script)) as target:
        assert _generate(target, "--prompt", "hi", *args) == status
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.startswith("error: ")
    assert captured.out == "" and "Traceback" not in captured.err


def test_mid_stream_failure_keeps_what_was_sent(capsys: pytest.CaptureFixture[str]) -> None:
    fake = ScriptedInference(
        first_token_s=0.0,
        token_gap_s=0.0,
        failures={"hi": Failure(grpc.StatusCode.INTERNAL, after_tokens=2)},
    )
    with serving(fake) as target:
        assert _generate(target, "--prompt", "hi", "--max-tokens", "5") == 1
        streamed = capsys.readouterr()
        assert _generate(target, "--prompt", "hi", "--max-tokens", "5", "--json") == 1
        as_json = capsys.readouterr()
    assert streamed.out == "t0 t1 \n"
    assert streamed.err == "error: INTERNAL: scripted INTERNAL mid-stream\n"
    out = json.loads(as_json.out)
    assert (out["token_ids"], out["finish_reason"]) == ([100, 101], "error")
    assert out["usage"]["completion_tokens"] == 2


def test_deadline_and_a_stream_without_final_message_fail(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with serving(ScriptedInference(first_token_s=1.0)) as target:
        assert _generate(target, "--prompt", "hi", "--timeout", "0.05") == 1
    assert capsys.readouterr().err.startswith("error: DEADLINE_EXCEEDED: ")
    with serving(ScriptedInference(token_gap_s=0.0, send_final=False)) as target:
        assert _generate(target, "--prompt", "hi", "--max-tokens", "2") == 1
    captured = capsys.readouterr()
    assert captured.out == "t0 t1 \n"
    assert "without a final message" in captured.err


def test_unreachable_target_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens there
    assert _generate(f"127.0.0.1:{port}", "--prompt", "hi") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: UNAVAILABLE: ")
    assert f"hint: nothing answered at 127.0.0.1:{port}: start Tandem there" in err


def test_unavailable_from_a_live_server_gets_no_connect_hint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A router with no worker says UNAVAILABLE too: the target answered, so no such hint."""
    with serving(ScriptedInference(failures={"hi": Failure(grpc.StatusCode.UNAVAILABLE)})) as t:
        assert _generate(t, "--prompt", "hi") == 1
    assert "hint:" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--device", "cpu"], "error: --device: configures an in-process engine"),
        (["--max-tokens", "0"], "error: --max-tokens: must be at least 1, got 0"),
        (["--prompt-token-ids", "1,-2"], "error: --prompt-token-ids: token ids must be in"),
    ],
)
def test_bad_flags_fail_before_any_call(
    capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    fake = ScriptedInference()
    with serving(fake) as target:
        argv = ["--prompt", "hi", *args] if "--prompt-token-ids" not in args else args
        assert _generate(target, *argv) == 2
    assert capsys.readouterr().err.startswith(expected)
    assert fake.requests == []


def test_offline_still_needs_a_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.startswith("error: --model: is required without --target")


def test_target_path_imports_no_torch() -> None:
    fake = ScriptedInference(first_token_s=0.0, token_gap_s=0.0)
    code = (
        "import sys\n"
        "from services.cli.main import main\n"
        "status = main(['generate', '--target', sys.argv[1], '--prompt', 'a', '--json'])\n"
        "sys.exit(99 if 'torch' in sys.modules else status)\n"
    )
    with serving(fake) as target:
        done = subprocess.run(
            [sys.executable, "-c", code, target], cwd=REPO, capture_output=True, text=True
        )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["usage"]["completion_tokens"] == 16

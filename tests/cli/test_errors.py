"""Bad input exits 2 with `error: ...` naming the problem (a failure while running: 1), and never
a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli import arg_types
from services.cli.main import main


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return captured.err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--max-tokens", "0"], "--max-tokens: must be at least 1, got 0"),
        (["--top-p", "1.5"], "--top-p: must be in (0, 1], got 1.5"),
        (["--temperature", "-1"], "--temperature"),
        (["--min-tokens", "5", "--max-tokens", "2"], "--min-tokens"),
        (["--stop", ""], "--stop"),
        (["--max-tokens", "many"], "argument --max-tokens: invalid int value: 'many'"),
        (["--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N"),
        (["--kv-cache-gib", "0"], "argument --kv-cache-gib: must be a finite number above 0"),
        # beyond any address space (1 PiB): mapping it fails at once, whatever the
        # overcommit setting; it was a traceback ending in OSError
        (["--kv-cache-gib", str(2**20)], "does not fit in this cpu's free memory"),
        (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    ],
)
def test_bad_flag(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, args: list[str], expected: str
) -> None:
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "hi", *args]
    assert expected in _fails(capsys, argv)


def test_an_empty_prompt_is_refused_offline_as_a_service_refuses_it(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path
) -> None:
    """Offline it ran on the tokenizer's BOS alone, where --target got INVALID_ARGUMENT."""
    err = _fails(capsys, ["generate", "--model", str(tiny_model_dir), "--prompt", ""])
    assert err == "error: --prompt: is empty; give some text\n"


def test_unknown_model_name(capsys: pytest.CaptureFixture[str]) -> None:
    err = _fails(capsys, ["generate", "--model", "no-such-model", "--prompt", "hi"])
    assert err.startswith("error: unknown model 'no-such-model'")
    assert "tandem-tiny" in err


def test_malformed_model_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    err = _fails(capsys, ["generate", "--model", str(tmp_path), "--prompt", "hi"])
    assert "is not a complete model directory" in err
    assert "tokenizer.json" in err
    assert "*.safetensors" in err


def test_token_id_outside_vocabulary(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, engine_flags: list[str]
) -> None:
    argv = ["generate", "--model", str(tiny_model_dir), *engine_flags]
    err = _fails(capsys, [*argv, "--prompt-token-ids", "1,999999"])
    assert "token id 999999 is outside the vocabulary [0, 4096)" in err


def test_malformed_token_ids(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path) -> None:
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt-token-ids", "1,two,3"]
    assert "expected comma-separated integer token ids" in _fails(capsys, argv)


def test_prompt_is_required_and_exclusive(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path
) -> None:
    argv = ["generate", "--model", str(tiny_model_dir)]
    assert "one of the arguments --prompt --prompt-token-ids is required" in _fails(capsys, argv)
    both = [*argv, "--prompt", "hi", "--prompt-token-ids", "1"]
    assert "not allowed with argument" in _fails(capsys, both)


def test_missing_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert "required: COMMAND" in _fails(capsys, [])
    assert "required: BENCHMARK" in _fails(capsys, ["bench"])


@pytest.mark.parametrize("flag", ["--tls", "--metrics"])
def test_up_flags_not_yet_on_ray_are_refused(capsys: pytest.CaptureFixture[str], flag: str) -> None:
    """Refused before anything starts (no Ray needed), naming the flag."""
    err = _fails(capsys, ["up", "--ray", "127.0.0.1:1", flag])
    assert f"{flag}: is not supported with --ray yet" in err


@pytest.mark.parametrize("command", ["router", "gateway"])
def test_a_port_out_of_range_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """It passed argparse and failed later, naming a config field instead of the flag."""
    assert main([command, "--port", "70000"]) == 2
    assert "--port: must be a TCP port in [0, 65535], got 70000" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--target", "localhost", "--prompt", "hi"],  # dialed :443
        ["decode", "--router", "notahostport"],  # retried it forever
        ["gateway", "--port", "0", "--router", "router:0"],
        ["bench", "serve", "--target", "[::1]", "--num-prompts", "1", "--request-rate", "1"],
    ],
)
def test_an_address_without_a_port_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "expected HOST:PORT" in err or "port must be in [1, 65535]" in err


def test_host_port_takes_names_addresses_and_ipv6() -> None:
    for good in ("127.0.0.1:50051", "router:50051", "[::1]:50051", "dns:///router:50051"):
        assert arg_types.host_port(good) == good


def test_a_failure_while_running_exits_1_not_as_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The command is right; the store is not there (a StoreError): retrying later may work.
    argv = ["keys", "list", "--store", "postgresql://127.0.0.1:1/tandem?connect_timeout=2"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and "Traceback" not in captured.err


def test_a_mistyped_flag_is_reported_by_its_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    """It was tandem's top-level usage ("usage: tandem [-h] COMMAND ..."), which lists no flag
    of the command that was mistyped."""
    assert main(["generate", "--prompt", "hi", "--max-tokns", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: tandem generate ")
    assert err.rstrip().endswith("tandem generate: error: unrecognized arguments: --max-tokns 3")
    assert main(["keys", "list", "--store", "sqlite:x.db", "--tema", "ml"]) == 2
    assert "tandem keys list: error: unrecognized arguments: --tema ml" in capsys.readouterr().err

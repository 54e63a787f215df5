"""`tandem keys`, `tandem audit verify` and `tandem gateway --help` on a real SQLite store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from services.cli.bench import redact_api_key
from services.cli.main import build_parser, main
from services.gateway.api_keys import ApiKeys
from services.gateway.audit import AuditLog
from services.gateway.store import open_store


def test_keys_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = f"sqlite:{tmp_path / 'gateway.db'}"
    args = ["keys", "create", "--store", store, "--team", "ml", "--model", "m1", "m2"]
    assert main([*args, "--admin", "--description", "first admin"]) == 0
    out, err = capsys.readouterr()
    secret = out.strip()
    assert secret.startswith("tdm_") and "\n" not in secret  # alone on stdout
    key_id = secret.split("_")[1]
    assert key_id in err and secret not in err

    with open_store(store) as s:
        key = ApiKeys(s).authenticate(secret)
        assert key is not None and key.admin and key.models == ("m1", "m2")
        assert key.created_by.startswith("cli:") and key.description == "first admin"

    assert main(["keys", "list", "--store", store]) == 0
    out = capsys.readouterr().out
    random_part = secret.removeprefix(f"tdm_{key_id}_")  # it may hold "_" itself
    assert len(random_part) >= 40
    assert key_id in out and "first admin" in out and random_part not in out
    header, row = out.splitlines()
    # columns line up under their headings (the header was fixed text)
    assert [header.index(h) for h in ("TEAM", "MODELS", "ADMIN")] == [
        row.index(v) for v in ("ml ", "m1,m2", "yes")
    ]

    assert main(["keys", "revoke", "--store", store, key_id]) == 0
    assert f"revoked key {key_id}" in capsys.readouterr().out
    with open_store(store) as s:
        assert ApiKeys(s).authenticate(secret) is None
        reasons = [r.event.reason for r in AuditLog(s).records()]
    assert reasons[0].startswith(f"keys create: key {key_id}")
    assert reasons[1].startswith(f"keys revoke: key {key_id}")

    assert main(["keys", "revoke", "--store", store, "0123456789abcdef"]) == 2  # no match
    assert "no API key with id '0123456789abcdef'" in capsys.readouterr().err
    # a pasted secret instead of its id is not echoed (stderr may land in a CI log)
    assert main(["keys", "revoke", "--store", store, secret + "x"]) == 2
    err = capsys.readouterr().err
    assert "a key id is 16 hex digits" in err and random_part not in err


def test_audit_verify_passes_then_names_a_tampered_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gateway.db"
    store = f"sqlite:{path}"
    for team in ("a", "b", "c"):
        assert main(["keys", "create", "--store", store, "--team", team, "--model", "m"]) == 0
    capsys.readouterr()
    assert main(["audit", "verify", "--store", store]) == 0
    assert "verified 3 audit records" in capsys.readouterr().out

    with sqlite3.connect(path) as db:  # an edit that keeps the JSON valid
        db.execute("UPDATE audit_log SET body = replace(body, '\"b\"', '\"x\"') WHERE id = 2")
    assert main(["audit", "verify", "--store", store]) == 1
    err = capsys.readouterr().err
    assert "BROKEN at record 2" in err and "records 1..1 are intact" in err


def test_audit_verify_names_a_record_slipped_in_below_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gateway.db"
    store = f"sqlite:{path}"
    assert main(["keys", "create", "--store", store, "--team", "a", "--model", "m"]) == 0
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO audit_log (id, time_us, body, prev_hash, hash) "
            "SELECT 0, time_us, body, prev_hash, hash FROM audit_log WHERE id = 1"
        )
    capsys.readouterr()
    assert main(["audit", "verify", "--store", store]) == 1
    assert "a record with id 0 lies outside the chain" in capsys.readouterr().err


def test_bad_store_url_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "list", "--store", "mysql://x"]) == 2
    assert "expected sqlite:PATH or postgresql://" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", [["keys", "list"], ["keys", "revoke", "abc"], ["audit", "verify"]]
)
def test_a_store_path_that_does_not_exist_is_refused_not_created(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped path "verified 0 audit records" (exit 0) and left an empty store there."""
    typo = tmp_path / "gatway.db"
    assert main([*command, "--store", f"sqlite:{typo}"]) == 2
    assert f"error: --store: no store at {typo}" in capsys.readouterr().err
    assert not typo.exists()


def test_gateway_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gateway", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--port", "--host", "--router", "--policy", "--store", "--oidc-issuer", "--audience",
        "--allowed-client", "--redis", "--limits-on-store-failure", "--metrics-port",
    ):  # fmt: skip
        assert flag in out


@pytest.mark.parametrize(
    "given", [["--api-key", "tdm_s3cret"], ["--api-key=tdm_s3cret"], ["--api", "tdm_s3cret"],
              ["--api-k=tdm_s3cret"]],
)  # fmt: skip
def test_the_api_key_never_reaches_a_recorded_command_line(given: list[str]) -> None:
    # However argparse let the flag be spelled, the key it parsed is what is hidden.
    load = ["--num-prompts", "1", "--input-len", "8", "--output-len", "4", "--request-rate", "1"]
    argv = ["bench", "serve", "--target", "h:1", *load, *given]
    args = build_parser().parse_args(argv)
    assert args.api_key == "tdm_s3cret"
    recorded = redact_api_key(argv, args.api_key)
    assert "tdm_s3cret" not in " ".join(recorded)
    assert recorded[:-1] == argv[:-1] and "***" in recorded[-1]

"""`tandem generate --target` (and `bench serve`) say what to do when the call fails for a
reason the status shows: a refused key, a gateway whose router is down, TLS on one side
only or an untrusted CA, a host that does not resolve. One real `tandem gateway` (TLS, its
router never started) serves every case that needs a gateway."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from services.cli.main import main
from services.gateway.api_keys import ApiKeys
from services.gateway.store import open_store
from services.launcher.local import free_port
from services.rpc.health_wait import wait_serving
from services.rpc.tls import TlsConfig, channel_credentials
from services.rpc.tls_dev_ca import DevCa
from tests.bench.test_serve_fake import Failure, ScriptedInference, serving

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "deploy" / "policy.example.toml"


@dataclass(frozen=True)
class Gateway:
    target: str
    ca: Path
    router: str
    """Where the gateway looks for its router: nothing listens there."""
    key: str
    revoked_key: str


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("hint-gateway")
    ca = DevCa.create(tmp / "tls")
    cert = ca.issue("gateway")
    store = f"sqlite:{tmp / 'gateway.db'}"
    with open_store(store) as opened:
        keys = ApiKeys(opened)
        key = keys.mint("platform", ["tandem-tiny"], created_by="test").secret
        revoked = keys.mint("platform", ["tandem-tiny"], created_by="test")
        keys.revoke(revoked.key.key_id)
    port, router = free_port(), f"127.0.0.1:{free_port()}"
    with (tmp / "gateway.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "gateway", "--port", str(port),
             "--router", router, "--policy", str(POLICY), "--store", store,
             "--tls-cert", str(cert.cert), "--tls-key", str(cert.key)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _wait_serving(f"127.0.0.1:{port}", ca.cert, process)
        yield Gateway(f"127.0.0.1:{port}", ca.cert, router, key, revoked.secret)
    finally:
        process.terminate()
        process.wait(30)


def _wait_serving(target: str, ca: Path, process: subprocess.Popen) -> None:
    def alive() -> None:
        assert process.poll() is None, "the gateway exited while starting"

    credentials = channel_credentials(TlsConfig.from_files(None, None, str(ca)))
    with grpc.secure_channel(target, credentials) as channel:
        wait_serving(channel, "gateway", time.monotonic() + 60, alive)


@pytest.fixture(autouse=True)
def _no_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TANDEM_API_KEY", raising=False)


def _hint(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The hint line of a `tandem` command that fails with exit status 1."""
    assert main(list(argv)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    hints = [line for line in err.splitlines() if line.startswith("hint: ")]
    assert len(hints) == 1, err
    return hints[0]


def _generate(target: str, *args: str) -> list[str]:
    return ["generate", "--target", target, "--prompt", "hi", "--max-tokens", "2", *args]


KEY_REFUSED = (
    "hint: the gateway refused the API key from {} (unknown, revoked or mistyped): check "
    "--api-key / TANDEM_API_KEY, or mint another (tandem keys create; each tandem up prints "
    "a new admin key and revokes the last run's)"
)


def test_a_revoked_or_wrong_key_says_to_check_it(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = ("--tls-ca", str(gateway.ca))
    flag = _generate(gateway.target, "--api-key", gateway.revoked_key, *tls)
    assert _hint(capsys, *flag) == KEY_REFUSED.format("--api-key")
    monkeypatch.setenv("TANDEM_API_KEY", "tdm_0123456789abcdef_wrong")
    from_env = _hint(capsys, *_generate(gateway.target, *tls))
    assert from_env == KEY_REFUSED.format("TANDEM_API_KEY")


def test_a_gateway_whose_router_is_down_is_not_called_unreachable(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    # The gateway relays its router's "failed to connect" word for word.
    argv = _generate(gateway.target, "--api-key", gateway.key, "--tls-ca", str(gateway.ca))
    assert _hint(capsys, *argv) == (
        f"hint: {gateway.target} answered, but the service behind it at {gateway.router} did "
        "not: a gateway whose router is down or unreachable; start the router or fix the "
        "gateway's --router (tandem up: see router.log in its state directory)"
    )


def test_plaintext_to_a_tls_server_says_pass_tls(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _hint(capsys, *_generate(gateway.target, "--api-key", gateway.key)) == (
        f"hint: {gateway.target} speaks TLS: pass --tls-ca CA.pem (tandem up --tls prints its "
        "CA), or --tls for a certificate the system trusts"
    )


def test_an_untrusted_ca_says_which_to_pass(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    other = DevCa.create(tmp_path / "other").cert
    argv = _generate(gateway.target, "--api-key", gateway.key, "--tls-ca", str(other))
    assert _hint(capsys, *argv) == (
        f"hint: {gateway.target}'s certificate is not signed by a CA this client trusts: pass "
        "--tls-ca with the CA that issued it (tandem up --tls: <state dir>/tls/ca.pem)"
    )


def test_tls_to_a_plaintext_server_says_drop_it(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    with serving(ScriptedInference()) as target:
        hint = _hint(capsys, *_generate(target, "--tls-ca", str(gateway.ca)))
    assert hint == (
        f"hint: {target} does not speak TLS: drop --tls/--tls-ca, or serve TLS there "
        "(tandem up --tls)"
    )


def test_the_hint_is_not_buried_under_grpcs_own_handshake_lines(gateway: Gateway) -> None:
    """gRPC's C core logs each failed TLS handshake at INFO unless GRPC_VERBOSITY says
    otherwise, and only the process's first import of grpc reads it: the console script
    sets it first, so what a person reads is our error and hint alone."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    with serving(ScriptedInference()) as target:
        argv = _generate(target, "--tls-ca", str(gateway.ca), "--timeout", "3")
        done = subprocess.run(
            [sys.executable, "-m", "services.cli.main", *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), done.stderr
    assert "Handshake failed" not in done.stderr and len(lines) == 2, done.stderr


def test_an_unresolvable_host_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert _hint(capsys, *_generate("no-such-host.invalid:50051")) == (
        "hint: cannot resolve host no-such-host.invalid: check the host name in --target "
        "no-such-host.invalid:50051"
    )


def test_bench_serve_gives_the_same_hints(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = ["bench", "serve", "--target", gateway.target, "--num-prompts", "1"]
    bench += ["--input-len", "4", "--output-len", "2", "--request-rate", "inf"]
    bench += ["--tls-ca", str(gateway.ca)]
    hint = _hint(capsys, *bench, "--api-key", gateway.revoked_key)
    assert hint == KEY_REFUSED.format("--api-key")
    hint = _hint(capsys, *bench, "--api-key", gateway.key)
    assert hint.startswith(f"hint: {gateway.target} answered, but the service behind it at ")


def test_a_model_the_key_may_not_use_points_at_tandem_models(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _generate(gateway.target, "--api-key", gateway.key, "--tls-ca", str(gateway.ca))
    hint = _hint(capsys, *argv, "--model", "a-model-of-another-team")  # PERMISSION_DENIED
    expected = f"hint: list the models you may use there: tandem models --target {gateway.target}"
    assert hint == expected


def test_tandem_models_gives_the_same_hints(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    models = ["models", "--target", gateway.target, "--tls-ca", str(gateway.ca)]
    assert _hint(capsys, *models, "--api-key", gateway.revoked_key) == KEY_REFUSED.format(
        "--api-key"
    )
    assert _hint(capsys, *models[:3], "--api-key", gateway.key).startswith(
        f"hint: {gateway.target} speaks TLS: "
    )


def test_a_server_asking_for_a_client_certificate_says_pass_one(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An mTLS port (`--client-ca`, the router of `tandem up --tls`) closes on a TLS client
    without a certificate: it was "nothing answered at ...: start Tandem there"."""
    ca = DevCa.create(tmp_path / "tls")
    cert = ca.issue("server")
    tls = TlsConfig.from_files(cert.cert, cert.key, ca.cert, require_client_auth=True)
    with serving(ScriptedInference(), tls) as target:
        hint = _hint(capsys, *_generate(target, "--tls-ca", str(ca.cert)))
    assert hint == (
        f"hint: {target} asks for a client certificate: pass --tls-cert CERT.pem --tls-key "
        "KEY.pem signed by a CA it trusts (its --client-ca / --tls-ca)"
    )


def test_a_router_asked_for_what_only_a_gateway_serves_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`tandem usage` against `tandem up --no-gateway` (a router) was a bare UNIMPLEMENTED."""
    with serving(ScriptedInference()) as target:
        hint = _hint(capsys, "usage", "--target", target)
    assert hint.startswith(f"hint: {target} does not serve this call: keys, usage and audit")


def test_a_stream_cut_mid_way_says_what_came_and_to_send_again(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A gateway's drain cut short (a second Ctrl-C) ends a stream UNAVAILABLE with gRPC's
    own words ("Cancelling all calls"); the tokens that came are printed, and now a hint."""
    scripted = ScriptedInference(failures={"hi": Failure(grpc.StatusCode.UNAVAILABLE, 2)})
    with serving(scripted) as target:
        hint = _hint(capsys, "generate", "--target", target, "--prompt", "hi")
    assert hint == (
        "hint: the stream was cut after 2 tokens (above): the server stopped, or lost the "
        "worker it needed; send the request again"
    )

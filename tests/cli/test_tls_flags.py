"""The TLS flags: what each set of them means, and half-given sets refused before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.main import build_parser, main
from services.rpc.tls import TlsConfig


def _args(*argv: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(list(argv))


def test_a_service_with_a_ca_requires_client_certificates() -> None:
    from services.cli.router import router_config

    flags = ("--tls-cert", "r.pem", "--tls-key", "r-key.pem")
    assert router_config(_args("router", "--port", "0")).tls is None
    assert router_config(_args("router", "--port", "0", *flags)).tls == TlsConfig(
        Path("r.pem"), Path("r-key.pem")
    )
    mtls = router_config(_args("router", "--port", "0", *flags, "--tls-ca", "ca.pem")).tls
    assert mtls == TlsConfig(Path("r.pem"), Path("r-key.pem"), Path("ca.pem"), True)


def test_the_gateway_public_port_asks_client_certificates_only_with_client_ca() -> None:
    from services.cli.tls_args import gateway_tls

    base = ("gateway", "--port", "0", "--router", "r:1", "--policy", "p.toml")
    flags = ("--tls-cert", "g.pem", "--tls-key", "g-key.pem", "--tls-ca", "ca.pem")
    public, router = gateway_tls(_args(*base, *flags))
    assert public == TlsConfig(Path("g.pem"), Path("g-key.pem"))
    assert router == TlsConfig(Path("g.pem"), Path("g-key.pem"), Path("ca.pem"))
    public, _ = gateway_tls(_args(*base, *flags, "--client-ca", "clients.pem"))
    assert public == TlsConfig(Path("g.pem"), Path("g-key.pem"), Path("clients.pem"), True)
    assert gateway_tls(_args(*base)) == (None, None)


@pytest.mark.parametrize(
    "argv",
    [
        ("router", "--port", "0", "--tls-ca", "ca.pem"),
        ("prefill", "--tls-cert", "w.pem"),
        ("gateway", "--port", "0", "--router", "r:1", "--policy", "p", "--client-ca", "c.pem"),
        ("generate", "--target", "h:1", "--prompt", "x", "--tls-cert", "c.pem"),
    ],
)
def test_half_a_set_of_tls_flags_is_refused(
    argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(list(argv)) == 2
    assert "--tls-cert/--tls-key" in capsys.readouterr().err


def test_a_client_with_a_missing_ca_file_is_told_which(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "ca.pem"
    argv = ["generate", "--target", "127.0.0.1:1", "--prompt", "x", "--tls-ca", str(missing)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err


def test_service_flags_default_to_the_tandem_tls_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.cli.router import router_config

    monkeypatch.setenv("TANDEM_TLS_CERT", "/tls/router.pem")
    monkeypatch.setenv("TANDEM_TLS_KEY", "/tls/router-key.pem")
    monkeypatch.setenv("TANDEM_TLS_CA", "/tls/ca.pem")
    tls = router_config(_args("router", "--port", "0")).tls
    assert tls == TlsConfig(
        Path("/tls/router.pem"), Path("/tls/router-key.pem"), Path("/tls/ca.pem"), True
    )
    # A flag still wins over the environment.
    tls = router_config(_args("router", "--port", "0", "--tls-ca", "other.pem")).tls
    assert tls is not None and tls.ca == Path("other.pem")


def test_the_launcher_keeps_the_tls_environment_from_its_children(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.launcher.local import _child_env

    monkeypatch.setenv("TANDEM_TLS_CERT", "/tls/x.pem")
    monkeypatch.setenv("TANDEM_TLS_CA", "/tls/ca.pem")
    monkeypatch.setenv("TANDEM_HOME", "/somewhere")
    env = _child_env()
    assert "TANDEM_TLS_CERT" not in env and "TANDEM_TLS_CA" not in env
    assert env["TANDEM_HOME"] == "/somewhere" and env["PYTHONUNBUFFERED"] == "1"

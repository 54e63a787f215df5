"""The TLS flags: what each set of them means, and half-given sets refused before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.main import build_parser, main
from services.engine.errors import InvalidRequestError
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


SERVICES = {
    "router": ("router", "--port", "0"),
    "prefill": ("prefill",),
    "decode": ("decode",),
    "gateway": ("gateway", "--port", "0", "--router", "r:1", "--policy", "p.toml"),
}
"""Every command whose service serves /metrics, with the flags it requires."""


def _config(argv: tuple[str, ...]):  # type: ignore[no-untyped-def]
    """The config object the command's own flags-to-config function makes."""
    from services.cli.gateway import gateway_config
    from services.cli.router import router_config
    from services.cli.worker import worker_config

    args = _args(*argv)
    make = {"router": router_config, "gateway": gateway_config}.get(argv[0], worker_config)
    return make(args)


@pytest.mark.parametrize("command", SERVICES)
def test_the_metrics_client_ca_comes_from_its_flag_or_the_environment(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = ("--tls-cert", "s.pem", "--tls-key", "s-key.pem", "--tls-ca", "ca.pem")
    argv = (*SERVICES[command], *tls)
    assert _config(argv).metrics_client_ca is None  # unset: /metrics follows --tls-ca
    flag = _config((*argv, "--metrics-client-ca", "scrapers.pem"))
    assert flag.metrics_client_ca == Path("scrapers.pem")
    monkeypatch.setenv("TANDEM_METRICS_CLIENT_CA", "/tls/scraper-ca.pem")
    assert _config(argv).metrics_client_ca == Path("/tls/scraper-ca.pem")
    flag = _config((*argv, "--metrics-client-ca", "scrapers.pem"))  # the flag still wins
    assert flag.metrics_client_ca == Path("scrapers.pem")


@pytest.mark.parametrize("command", SERVICES)
def test_a_metrics_client_ca_without_a_certificate_is_refused(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The flags-to-config step, not main(): a service that let it through would serve.
    monkeypatch.setenv("TANDEM_METRICS_CLIENT_CA", "/tls/scraper-ca.pem")
    with pytest.raises(InvalidRequestError) as refused:
        _config(SERVICES[command])  # the environment alone, no certificate
    assert refused.value.field == "--metrics-client-ca"
    assert refused.value.description.startswith("asking scrapers for certificates needs HTTPS")


def test_the_launcher_keeps_the_tls_environment_from_its_children(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.launcher.local import _child_env

    monkeypatch.setenv("TANDEM_TLS_CERT", "/tls/x.pem")
    monkeypatch.setenv("TANDEM_TLS_CA", "/tls/ca.pem")
    monkeypatch.setenv("TANDEM_METRICS_CLIENT_CA", "/tls/scraper-ca.pem")
    monkeypatch.setenv("TANDEM_HOME", "/somewhere")
    env = _child_env()
    assert "TANDEM_TLS_CERT" not in env and "TANDEM_TLS_CA" not in env
    assert "TANDEM_METRICS_CLIENT_CA" not in env  # a plain `tandem up` child would refuse it
    assert env["TANDEM_HOME"] == "/somewhere" and env["PYTHONUNBUFFERED"] == "1"

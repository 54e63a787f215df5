"""deploy/compose.tls.yaml: every Tandem service gets its own certificate, mTLS by default;
/metrics takes the scrapers' CA, which certifies Prometheus alone."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli.main import main
from services.cli.tls_args import gateway_tls, metrics_client_ca, service_tls
from services.rpc.tls import TlsConfig
from services.rpc.tls_dev_ca import SCRAPER_CA, DevCa
from tests.deploy.conftest import DEPLOY, check_tandem_command

BASE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
OVERRIDE = yaml.safe_load((DEPLOY / "compose.tls.yaml").read_text())
TANDEM = sorted(name for name, service in BASE.items() if "build" in service)


def _init_names() -> list[str]:
    command = OVERRIDE["services"]["tls-init"]["command"]
    return [a for a in command[1:] if not a.startswith("--")]


def test_overrides_only_services_of_the_stack() -> None:
    assert set(OVERRIDE["services"]) == {*TANDEM, "prometheus", "tls-init"}
    assert "tandem-tls" in OVERRIDE["volumes"]


def test_tls_init_certifies_every_service_and_prometheus_as_a_scraper() -> None:
    command = [str(a) for a in OVERRIDE["services"]["tls-init"]["command"]]
    args = check_tandem_command(command, "compose service tls-init")
    assert sorted(args.names) == sorted(TANDEM)  # the services' CA: ca.pem
    assert args.scraper == ["prometheus"]  # the scrapers' CA: scraper-ca.pem


def test_tls_init_issues_prometheus_from_the_scrapers_ca_and_the_services_from_theirs(
    tmp_path: Path,
) -> None:
    """tls-init's command, run here into a directory standing for the volume (--owner
    left out: it needs root): every file the services and Prometheus are told to read is
    there, and signed by the CA that is meant to accept it."""
    command = OVERRIDE["services"]["tls-init"]["command"]
    argv = [a for a in command if not a.startswith(("--owner", "--dir"))]
    assert main([*argv, f"--dir={tmp_path}"]) == 0
    services, scrapers = DevCa(tmp_path), DevCa(tmp_path, SCRAPER_CA)
    for name in TANDEM:
        environment = OVERRIDE["services"][name]["environment"]
        assert _in(tmp_path, environment["TANDEM_METRICS_CLIENT_CA"]) == scrapers.cert
        assert _in(tmp_path, environment["TANDEM_TLS_CA"]) == services.cert
        leaf = _in(tmp_path, environment["TANDEM_TLS_CERT"])
        assert services.signed(leaf) and not scrapers.signed(leaf), name
    tls_config = _jobs(DEPLOY / "prometheus.tls.yml")["tandem-router"]["tls_config"]
    prometheus = _in(tmp_path, tls_config["cert_file"])
    assert scrapers.signed(prometheus) and not services.signed(prometheus)
    assert _in(tmp_path, tls_config["key_file"]).is_file()
    assert _in(tmp_path, tls_config["ca_file"]) == services.cert  # verifies the services


def _in(volume: Path, path: str) -> Path:
    """Where a /tls/... path of the stack lies in ``volume``."""
    return volume / Path(path).relative_to("/tls")


def test_keys_go_to_the_users_that_read_them() -> None:
    command = OVERRIDE["services"]["tls-init"]["command"]
    uid = re.search(r"^USER (\d+)", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert uid is not None and f"--owner={uid.group(1)}" in command  # Tandem's image user
    assert "--owner=prometheus=65534" in command  # prom/prometheus runs as nobody


@pytest.mark.parametrize("name", TANDEM)
def test_each_service_takes_its_own_certificate_after_tls_init(name: str) -> None:
    service = OVERRIDE["services"][name]
    assert service["environment"] == {
        "TANDEM_TLS_CERT": f"/tls/{name}.pem",
        "TANDEM_TLS_KEY": f"/tls/{name}-key.pem",
        "TANDEM_TLS_CA": "/tls/ca.pem",
        "TANDEM_METRICS_CLIENT_CA": "/tls/scraper-ca.pem",
    }
    assert "tandem-tls:/tls:ro" in service["volumes"]
    assert service["depends_on"]["tls-init"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("name", TANDEM)
def test_with_that_environment_the_service_runs_mtls(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in OVERRIDE["services"][name]["environment"].items():
        monkeypatch.setenv(key, value)
    args = check_tandem_command([str(a) for a in BASE[name]["command"]], name)
    cert, key, ca = Path(f"/tls/{name}.pem"), Path(f"/tls/{name}-key.pem"), Path("/tls/ca.pem")
    if args.command == "gateway":  # public port: TLS; towards the router: mTLS
        assert gateway_tls(args) == (TlsConfig(cert, key), TlsConfig(cert, key, ca))
    else:
        assert service_tls(args) == TlsConfig(cert, key, ca, require_client_auth=True)
    assert metrics_client_ca(args) == Path("/tls/scraper-ca.pem")  # /metrics: scrapers only


def _jobs(path: Path) -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in yaml.safe_load(path.read_text())["scrape_configs"]}


def test_prometheus_scrapes_the_same_targets_over_https_with_its_scraper_certificate() -> None:
    plain, tls = _jobs(DEPLOY / "prometheus.yml"), _jobs(DEPLOY / "prometheus.tls.yml")
    assert {n: j["static_configs"] for n, j in plain.items()} == {
        n: j["static_configs"] for n, j in tls.items()
    }
    files = {"ca_file": "/tls/ca.pem", "cert_file": "/tls/prometheus.pem"}
    files["key_file"] = "/tls/prometheus-key.pem"
    for name, job in tls.items():
        if name.startswith("tandem-"):
            assert job["scheme"] == "https" and job["tls_config"] == files, name
    mounts = OVERRIDE["services"]["prometheus"]["volumes"]
    assert "./prometheus.tls.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert set(yaml.safe_load((DEPLOY / "prometheus.tls.yml").read_text())) == {
        "global",
        "scrape_configs",
    }  # Prometheus refuses unknown top-level keys

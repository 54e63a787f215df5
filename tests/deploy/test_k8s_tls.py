"""deploy/k8s/overlays/tls: every Tandem pod gets a cert-manager csi-driver certificate
naming what its peers dial, reads it through TANDEM_TLS_*, and runs mTLS; probes speak TLS.

Offline: kustomize renders, the real CLI parses; nothing here has met a cluster, cert-manager
or its csi-driver (their behaviour is taken from their documentation and source)."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

import pytest
import yaml

from services.cli.tls_args import gateway_tls, service_tls
from services.rpc.tls import TlsConfig
from tests.deploy.conftest import check_tandem_command
from tests.deploy.k8s_render import (
    K8S,
    Doc,
    expand_env_refs,
    find,
    flag,
    pod_spec,
    render,
    sample_pod_name,
    tandem_container,
    tandem_workloads,
)

TARGET = "overlays/tls"
COMPONENTS = ("tls", "tls-selfsigned-ca")
DRIVER = "csi.cert-manager.io"
ATTR = f"{DRIVER}/"  # the prefix of every volume attribute csi-driver reads
TLS_ENV = ("TANDEM_TLS_CERT", "TANDEM_TLS_KEY", "TANDEM_TLS_CA")
# csi-driver's file names when the volume does not choose others (pkg/apis/defaults).
FILE_ATTRS = {
    "TANDEM_TLS_CERT": ("certificate-file", "tls.crt"),
    "TANDEM_TLS_KEY": ("privatekey-file", "tls.key"),
    "TANDEM_TLS_CA": ("ca-file", "ca.crt"),
}
SERVICES = {
    "tandem-gateway": "Deployment",
    "tandem-router": "Deployment",
    "tandem-prefill": "StatefulSet",
    "tandem-decode": "StatefulSet",
}


def _workload(name: str) -> Doc:
    return find(render(TARGET), SERVICES[name], name)


def test_the_services_are_the_tandem_workloads() -> None:
    assert {d["metadata"]["name"] for d in tandem_workloads(render(TARGET))} == set(SERVICES)


def _env(container: Doc) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _csi_volume(doc: Doc) -> Doc:
    (volume,) = [v for v in pod_spec(doc)["volumes"] if v.get("csi", {}).get("driver") == DRIVER]
    return volume


def _attrs(doc: Doc) -> dict[str, str]:
    attributes = _csi_volume(doc)["csi"]["volumeAttributes"]
    return {k.removeprefix(ATTR): v for k, v in attributes.items()}


def _cert_names(doc: Doc) -> set[str]:
    """The DNS names csi-driver puts in this pod's certificate, its ${VARS} filled in."""
    names = _attrs(doc)["dns-names"]
    names = names.replace("${POD_NAME}", sample_pod_name(doc))
    names = names.replace("${POD_NAMESPACE}", doc["metadata"]["namespace"])
    assert "$" not in names, names  # only the variables csi-driver fills
    return {n.strip() for n in names.split(",")}


def _served_by(docs: tuple[Doc, ...], service_name: str) -> Doc:
    """The workload whose pods the Service selects."""
    selector = find(docs, "Service", service_name)["spec"]["selector"].items()
    (doc,) = [
        d
        for d in tandem_workloads(docs)
        if selector <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    return doc


@pytest.mark.parametrize("name", SERVICES)
def test_tls_files_come_from_the_pods_csi_volume(name: str) -> None:
    doc = _workload(name)
    container, volume = tandem_container(doc), _csi_volume(doc)
    assert volume["csi"]["readOnly"] is True  # csi-driver refuses writable volumes
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    env, attrs = _env(container), _attrs(doc)
    for variable in TLS_ENV:
        attr, default = FILE_ATTRS[variable]
        expected = PurePosixPath(mount["mountPath"]) / attrs.get(attr, default)
        assert PurePosixPath(env[variable]) == expected, variable


@pytest.mark.parametrize("name", SERVICES)
def test_each_certificate_is_issued_for_client_and_server_and_readable_by_the_pod(
    name: str,
) -> None:
    doc, docs = _workload(name), render(TARGET)
    attrs = _attrs(doc)
    issuer = find(docs, attrs.get("issuer-kind", "Issuer"), attrs["issuer-name"])
    assert issuer["apiVersion"].startswith("cert-manager.io/")
    usages = {u.strip() for u in attrs["key-usages"].split(",")}
    assert {"server auth", "client auth"} <= usages  # every service also dials others
    # The key is written for this group; the pod runs as that group, never as root.
    assert attrs["fs-group"] == str(pod_spec(doc)["securityContext"]["runAsGroup"])


@pytest.mark.parametrize("pool", ["tandem-prefill", "tandem-decode"])
def test_a_workers_certificate_names_the_name_it_advertises(pool: str) -> None:
    doc = find(render(TARGET), "StatefulSet", pool)
    container = tandem_container(doc)
    advertised = expand_env_refs(flag(container, "advertise") or "", container, doc)
    assert "$" not in advertised, advertised
    assert advertised in _cert_names(doc)


def test_every_router_a_service_dials_is_named_in_the_routers_certificate() -> None:
    docs = render(TARGET)
    dialled = {flag(tandem_container(d), "router") for d in tandem_workloads(docs)} - {None}
    assert dialled  # the gateway and the workers dial one
    for address in dialled:
        host = str(address).rsplit(":", 1)[0]
        router = _served_by(docs, host.split(".")[0])
        assert host in _cert_names(router), host


@pytest.mark.parametrize("service", ["tandem-router", "tandem-gateway"])
def test_service_names_are_in_their_certificates(service: str) -> None:
    docs = render(TARGET)
    names = _cert_names(_served_by(docs, service))
    assert {service, f"{service}.tandem.svc"} <= names


@pytest.mark.parametrize("name", SERVICES)
def test_probes_run_tandem_health_at_a_name_the_certificate_holds(name: str) -> None:
    doc = _workload(name)
    container = tandem_container(doc)
    probes = [container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")
              if k in container]  # fmt: skip
    assert len(probes) >= 2
    for probe in probes:
        assert "grpc" not in probe  # kubelet's gRPC probe speaks no TLS
        program, target = probe["exec"]["command"]
        assert program == "tandem-health"
        host, port = target.rsplit(":", 1)
        assert host in _cert_names(doc) and port == "50051", target
        # tandem-health's own deadline is 3 s; kubelet's default of 1 s would cut it short.
        assert probe["timeoutSeconds"] >= 3


@pytest.mark.parametrize("name", SERVICES)
def test_with_that_environment_each_service_runs_mtls(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = tandem_container(_workload(name))
    env = _env(container)
    for variable in TLS_ENV:  # the flags' defaults, read when the parser is built
        monkeypatch.setenv(variable, env[variable])
    argv = [re.sub(r"\$\((\w+)\)", "value", a) for a in container["args"]]
    args = check_tandem_command(argv, f"{TARGET}: {name}")
    cert, key, ca = (env[v] for v in TLS_ENV)
    if args.command == "gateway":  # public port: TLS; towards the router: mTLS
        public, towards_router = gateway_tls(args)
        assert public == TlsConfig.from_files(cert, key)
        assert towards_router == TlsConfig.from_files(cert, key, ca)
    else:
        assert service_tls(args) == TlsConfig.from_files(cert, key, ca, require_client_auth=True)


def test_the_issuer_signs_with_a_ca_the_overlay_makes() -> None:
    docs = render(TARGET)
    secret = find(docs, "Issuer", "tandem-ca")["spec"]["ca"]["secretName"]
    (ca,) = [d for d in docs if d["kind"] == "Certificate" and d["spec"]["secretName"] == secret]
    assert ca["spec"]["isCA"] is True
    assert find(docs, "Issuer", ca["spec"]["issuerRef"]["name"])["spec"] == {"selfSigned": {}}


def test_the_components_add_tls_to_another_overlay_as_well(tmp_path: Path) -> None:
    # overlays/tls's comment says so: the gpu overlay plus the two components. (kustomize
    # takes no absolute path to a kustomization.)
    def relative(path: Path) -> str:
        return os.path.relpath(path, tmp_path)

    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [relative(K8S / "overlays" / "gpu")],
                "components": [relative(K8S / "components" / c) for c in COMPONENTS],
            }
        )
    )
    docs = render(str(tmp_path))
    for pool in ("tandem-prefill", "tandem-decode"):
        workers = find(docs, "StatefulSet", pool)
        assert tandem_container(workers)["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert _env(tandem_container(workers))["TANDEM_TLS_CA"] == "/tls/ca.crt"
        assert _attrs(workers)["issuer-name"] == "tandem-ca"
    assert find(docs, "Issuer", "tandem-ca")["metadata"]["namespace"] == "tandem"

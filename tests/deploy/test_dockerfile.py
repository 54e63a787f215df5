"""deploy/Dockerfile: COPY sources exist and survive .dockerignore; no secrets; non-root."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from tests.deploy.conftest import DEPLOY, ROOT

DOCKERFILE = DEPLOY / "Dockerfile"


def _instructions() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def _copy_sources() -> list[str]:
    sources = []
    for line in _instructions():
        words = line.split()
        if words[0].upper() != "COPY" or any(w.startswith("--from") for w in words):
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        sources += args[:-1]
    return sources


def _ignored(path: str) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins, `!` re-includes."""
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            ignored = not negate
    return ignored


def test_copy_sources_exist_and_are_in_the_build_context() -> None:
    sources = _copy_sources()
    assert sources, "no COPY found"
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _ignored(source), f"{source} is excluded by .dockerignore"


def test_dockerignore_keeps_local_state_out() -> None:
    for path in (".venv", ".git", "bench/results", "tandem.egg-info", ".whl"):
        assert _ignored(path), path


def test_runs_as_non_root_and_enters_through_tandem() -> None:
    lines = _instructions()
    users = [line.split()[1] for line in lines if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(line.startswith('ENTRYPOINT ["tandem"]') for line in lines)
    assert any(line.startswith("HEALTHCHECK") and "tandem-health" in line for line in lines)


def test_variant_picks_cpu_or_cuda_torch() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert "download.pytorch.org/whl/cpu" in text
    assert "cuda)" in text


def test_torch_pin_matches_pyproject() -> None:
    pinned = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f"ARG TORCH_VERSION={pinned}" in DOCKERFILE.read_text()


def test_no_secret_is_baked_in() -> None:
    for line in _instructions():
        if line.upper().startswith(("ENV ", "ARG ")):
            assert not re.search(r"(?i)(password|secret|token)\s*=", line), line


def test_health_probe_is_python_that_compiles() -> None:
    source = (DEPLOY / "grpc_health.py").read_text()
    compile(source, "grpc_health.py", "exec")

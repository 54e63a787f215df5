from __future__ import annotations

from pathlib import Path

import pytest

from services.engine.tiny import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tandem-tiny built once per test session in a private root (not ~/.cache)."""
    return ensure_tiny_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def engine_flags() -> list[str]:
    """A small KV pool on the CPU keeps each in-process engine cheap to build."""
    return ["--device", "cpu", "--kv-cache-gib", "0.05"]

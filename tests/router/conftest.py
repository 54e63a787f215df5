from __future__ import annotations

from pathlib import Path

import pytest

from services.engine.tiny import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tandem-tiny built once per test session in a private root (its tokenizer is used)."""
    return ensure_tiny_model(tmp_path_factory.mktemp("models"))

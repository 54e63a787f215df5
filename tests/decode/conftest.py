"""Every decode test runs real in-process workers on the tiny model."""

from __future__ import annotations

import pytest

from tests.router.inprocess import use_tiny_model


@pytest.fixture(autouse=True)
def _tiny(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    use_tiny_model(monkeypatch, tmp_path_factory)

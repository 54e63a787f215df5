"""The SQLite store's files are its owner's alone: they hold key ids, teams, usage and the
audit log's client addresses."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from services.gateway.ledger import Ledger, UsageRecord
from services.gateway.store import StoreError, open_store


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_store_and_its_journal_are_owner_only(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)  # the usual default: files 0644 unless asked otherwise
    try:
        with open_store(f"sqlite:{tmp_path / 'gateway.db'}") as store:
            Ledger(store, metrics=None).record(UsageRecord("r1", "ann", "ml", "m", 3, 4))
            files = sorted(tmp_path.iterdir())
            assert [f.name for f in files] == ["gateway.db", "gateway.db-shm", "gateway.db-wal"]
            assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
    finally:
        os.umask(old_umask)


def test_an_existing_store_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    path.touch(mode=0o640)
    path.chmod(0o640)  # an operator's choice (a group of auditors, say)
    with open_store(f"sqlite:{path}"):
        pass
    assert _mode(path) == 0o640


def test_a_store_in_a_missing_directory_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot create SQLite store"):
        open_store(f"sqlite:{tmp_path / 'nowhere' / 'gateway.db'}")

"""The model identity (in every block hash and the KV handshake) tells checkpoints with
different weights apart, even in directories of the same name with the same files and
sizes, and stays equal for a copy; it reads only a few MiB per shard."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from services.engine.model_config import model_identity
from tests.engine.reference import build_checkpoint


@pytest.fixture(scope="module")
def two_finetunes(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    root = tmp_path_factory.mktemp("finetunes")
    a = build_checkpoint(root / "a" / "model", tiny_model_dir, "llama", seed=1)
    b = build_checkpoint(root / "b" / "model", tiny_model_dir, "llama", seed=2)
    return a, b


def test_different_weights_get_different_identities(two_finetunes) -> None:
    a, b = two_finetunes
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert all((a / f).stat().st_size == (b / f).stat().st_size for f in files)
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
    assert model_identity(a) != model_identity(b)


def test_a_copy_keeps_the_identity(two_finetunes, tmp_path: Path) -> None:
    a, _ = two_finetunes
    copy = shutil.copytree(a, tmp_path / "elsewhere" / "model")
    assert model_identity(Path(copy)) == model_identity(a)


def _shard(path: Path, data: bytes) -> None:
    header = json.dumps(
        {"w": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]}}
    )
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_the_fingerprint_reads_the_header_and_both_ends(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    shard = model / "model.safetensors"
    data = bytearray(8 << 20)  # 8 MiB of tensor data
    _shard(shard, bytes(data))
    base = model_identity(model)

    def changed_at(offset: int) -> str:
        edited = bytearray(data)
        edited[offset] = 1
        _shard(shard, bytes(edited))
        return model_identity(model)

    assert changed_at(10) != base  # the first MiB
    assert changed_at(len(data) - 10) != base  # the last MiB
    assert changed_at(len(data) // 2) == base  # the middle is not read: cheap for big shards
    _shard(shard, bytes(data))
    raw = shard.read_bytes().replace(b'"U8"', b'"I8"')  # same size, another header
    shard.write_bytes(raw)
    assert model_identity(model) != base

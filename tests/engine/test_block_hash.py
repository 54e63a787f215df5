"""Golden vectors for the block hash: the router and every worker must agree byte for byte.

The digests below were computed once and pinned. If one changes, every router
index and every worker's prefix cache in a mixed-version deployment stops
matching: change the encoding only together with its version (``DOMAIN``).
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from services.engine.block_hash import DOMAIN, ROOT_PARENT, hash_block, hash_prefix_blocks

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "tandem-tiny@0123456789abcdef"

ROOT_PARENT_HEX = "191b5c7cc9693b0d32e595d3d0e116688bf8871de3433c37f045f0bf66acb2b8"
# hash_block(ROOT_PARENT, [1, 2, 3, 4], "m")
BLOCK_1234_M = "7d2a08594a834298cc3e6fcdba7f2bf454049f4f3507467e832f6f66b31631b8"
# hash_prefix_blocks(range(1, 34), 16, MODEL): two full blocks, a 1-token tail
PREFIX_1_TO_33 = (
    "6cb9e223ab9e57fa81f51a6c9067d1bb41e108378402c67428881cfb30334a65",
    "b8bf06715b48648592cfe1e4ac2a07940cdfc398c5626b71343c4f462a7525be",
)


def test_domain_and_root_parent_are_pinned() -> None:
    assert DOMAIN == b"tandem.v1.block"
    assert len(ROOT_PARENT) == 32
    assert ROOT_PARENT.hex() == ROOT_PARENT_HEX


@pytest.mark.parametrize(
    ("parent", "tokens", "model_id", "digest"),
    [
        (ROOT_PARENT, [1, 2, 3, 4], "m", BLOCK_1234_M),
        (
            ROOT_PARENT,
            [4, 3, 2, 1],
            "m",
            "8b275b2350c6633989a645d267caf2a13ba96016f0cf626a5442cb30656a00d0",
        ),
        (ROOT_PARENT, [], "m", "6e16c6567cda3ce08968adbe7f436b4df6851fdaed6b22755d77f0cdbc9a4a23"),
        (
            ROOT_PARENT,
            [0, 4095, 2**32 - 1, 7],
            MODEL,
            "8d08812a4f7eb9431eae832992ae5a4d6e06ed6886f5f7b8dcc28f5d0bb699fd",
        ),
        # model ids are UTF-8: the length prefix counts bytes, not characters
        (
            ROOT_PARENT,
            [1, 2, 3, 4],
            "modèle",
            "f3ac91c9b7e2767ae33601f3c22d63ee548214a940288329893847a1954bb67e",
        ),
        (
            bytes.fromhex(BLOCK_1234_M),
            [1, 2, 3, 4],
            "m",
            "ee023a0853159c80442840810748a10826755d7cad38415afd92e9a3c9eefa19",
        ),
    ],
)
def test_hash_block_golden_vectors(
    parent: bytes, tokens: list[int], model_id: str, digest: str
) -> None:
    assert hash_block(parent, tokens, model_id).hex() == digest


def test_hash_block_matches_the_documented_encoding() -> None:
    """SHA-256(DOMAIN ‖ parent ‖ u16 len(model) ‖ model ‖ u32 n ‖ u32 tokens), little-endian."""
    model = "modèle".encode()
    tokens = [1, 2, 3, 4]
    raw = (
        b"tandem.v1.block"
        + ROOT_PARENT
        + struct.pack("<H", len(model))
        + model
        + struct.pack("<I", len(tokens))
        + b"".join(struct.pack("<I", t) for t in tokens)
    )
    assert hash_block(ROOT_PARENT, tokens, "modèle") == hashlib.sha256(raw).digest()
    assert hashlib.sha256(b"tandem.v1.block.root").digest() == ROOT_PARENT


def test_hash_prefix_blocks_golden_vectors_and_chaining() -> None:
    tokens = list(range(1, 34))
    hashes = hash_prefix_blocks(tokens, 16, MODEL)
    assert [h.hex() for h in hashes] == list(PREFIX_1_TO_33)
    assert hashes[0] == hash_block(ROOT_PARENT, tokens[:16], MODEL)
    assert hashes[1] == hash_block(hashes[0], tokens[16:32], MODEL)


def test_partial_tail_block_gets_no_hash() -> None:
    assert hash_prefix_blocks([], 4, "m") == []
    assert hash_prefix_blocks([1, 2, 3], 4, "m") == []
    assert [h.hex() for h in hash_prefix_blocks([1, 2, 3, 4], 4, "m")] == [BLOCK_1234_M]
    # Adding tail tokens never changes the hashes of the full blocks before them.
    full = hash_prefix_blocks(list(range(8)), 4, "m")
    assert hash_prefix_blocks(list(range(11)), 4, "m") == full
    assert len(hash_prefix_blocks(list(range(12)), 4, "m")) == 3


def test_model_id_changes_the_hash() -> None:
    a = hash_block(ROOT_PARENT, [1, 2, 3, 4], "m")
    assert hash_block(ROOT_PARENT, [1, 2, 3, 4], "n") != a
    assert hash_block(ROOT_PARENT, [1, 2, 3, 4], "m ") != a
    assert hash_block(ROOT_PARENT, [1, 2, 3, 4], "") != a


def test_parent_changes_the_hash() -> None:
    a = hash_block(ROOT_PARENT, [1, 2, 3, 4], "m")
    other_parent = hash_block(ROOT_PARENT, [9, 9, 9, 9], "m")
    assert hash_block(other_parent, [1, 2, 3, 4], "m") != a
    # So the same block after different prefixes is two different cache entries.
    first = hash_prefix_blocks([5, 5, 5, 5, 1, 2, 3, 4], 4, "m")
    second = hash_prefix_blocks([6, 6, 6, 6, 1, 2, 3, 4], 4, "m")
    assert first[1] != second[1]


def test_length_prefixes_keep_fields_apart() -> None:
    """Moving bytes between the model id and the tokens must not collide."""
    assert hash_block(ROOT_PARENT, [1], "ab") != hash_block(ROOT_PARENT, [], "ab\x01\x00\x00\x00")
    assert hash_block(ROOT_PARENT, [0], "m") != hash_block(ROOT_PARENT, [], "m")


def test_token_ids_outside_u32_are_rejected() -> None:
    with pytest.raises(struct.error):
        hash_block(ROOT_PARENT, [-1], "m")
    with pytest.raises(struct.error):
        hash_block(ROOT_PARENT, [2**32], "m")


def test_fresh_interpreter_computes_the_same_digests() -> None:
    """Another process (as the router is) with a different PYTHONHASHSEED agrees byte for byte,
    and importing the module pulls in neither torch nor numpy."""
    code = (
        "import sys\n"
        "from services.engine.block_hash import ROOT_PARENT, hash_block, hash_prefix_blocks\n"
        "print(ROOT_PARENT.hex())\n"
        "print(hash_block(ROOT_PARENT, [1, 2, 3, 4], 'm').hex())\n"
        f"print(','.join(h.hex() for h in hash_prefix_blocks(list(range(1, 34)), 16, {MODEL!r})))\n"
        "print('torch' in sys.modules, 'numpy' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.splitlines() == [
        ROOT_PARENT_HEX,
        BLOCK_1234_M,
        ",".join(PREFIX_1_TO_33),
        "False False",
    ]

"""The one block-hashing function shared by every worker and the router.

A full block of ``block_size`` tokens is identified by a chained hash::

    hash(block) = SHA-256(DOMAIN ‖ parent_hash ‖ len(model_id) ‖ model_id ‖ n ‖ token_ids)

where ``parent_hash`` is the previous block's hash (``ROOT_PARENT`` for the
first block), integers are unsigned little-endian (model-id length u16, token
count u32, each token id u32) and ``model_id`` is UTF-8. Covering the parent
makes a hash name the whole prefix, not just one block, so a lookup of the
i-th hash answers "is this exact prefix cached?". Covering the model identity
keeps two models' caches apart in one router index.

The encoding is fixed and pinned by golden vectors in the tests: the router and
every worker must agree byte for byte, or prefix hits silently drop to zero.
SHA-256 rather than a fast non-cryptographic hash because a collision would
serve one tenant's KV to another's prompt (vLLM moved to SHA-256 for that
reason). This module imports nothing heavy: the router uses it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import NewType

BlockHash = NewType("BlockHash", bytes)
"""32 bytes naming a block and, through its parent, the whole prefix before it."""

DOMAIN = b"tandem.v1.block"
ROOT_PARENT = BlockHash(hashlib.sha256(b"tandem.v1.block.root").digest())
"""The fixed parent of every sequence's first block."""


def hash_block(parent: BlockHash, token_ids: Sequence[int], model_id: str) -> BlockHash:
    """Hash one block of token ids under its parent's hash and the model identity."""
    model = model_id.encode("utf-8")
    h = hashlib.sha256()
    h.update(DOMAIN)
    h.update(parent)
    h.update(struct.pack("<H", len(model)))
    h.update(model)
    h.update(struct.pack("<I", len(token_ids)))
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return BlockHash(h.digest())


def hash_prefix_blocks(token_ids: Sequence[int], block_size: int, model_id: str) -> list[BlockHash]:
    """Chained hashes of every *full* block of ``token_ids`` (a partial tail has none)."""
    hashes: list[BlockHash] = []
    parent = ROOT_PARENT
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], model_id)
        hashes.append(parent)
    return hashes

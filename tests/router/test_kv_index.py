"""KVIndex: event semantics, chained prefix matching, sequence gaps and snapshots.

The golden tests share the engine's pinned vectors (tests/engine/test_block_hash.py)
and feed the index with events from a real BlockPool, so the router and the
engine are checked against the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.engine.block_hash import BlockHash, hash_prefix_blocks
from services.engine.block_pool import BlockPool
from services.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from services.router.kv_index import KVIndex, NeedsSnapshot, block_key
from tests.engine.test_block_hash import MODEL, PREFIX_1_TO_33

REPO_ROOT = Path(__file__).resolve().parents[2]
BS = 16


def chain(name: str, n: int) -> list[BlockHash]:
    """n distinct fake chained hashes (only their identity matters to the index)."""
    return [BlockHash(hashlib.sha256(f"{name}/{i}".encode()).digest()) for i in range(n)]


def stored(seq: int, hashes: list[BlockHash], parent: BlockHash | None = None) -> BlockStored:
    return BlockStored(seq, parent, tuple(hashes), BS)


class Stream:
    """Hands out consecutive seq numbers for one worker's events."""

    def __init__(self, index: KVIndex, worker_id: str) -> None:
        self.index, self.worker_id, self.seq = index, worker_id, 0

    def store(self, hashes: list[BlockHash]) -> None:
        self.index.apply(self.worker_id, stored(self.seq, hashes))
        self.seq += 1

    def remove(self, hashes: list[BlockHash]) -> None:
        self.index.apply(self.worker_id, BlockRemoved(self.seq, tuple(hashes)))
        self.seq += 1

    def clear(self) -> None:
        self.index.apply(self.worker_id, AllBlocksCleared(self.seq))
        self.seq += 1


def test_stored_removed_cleared_semantics() -> None:
    index = KVIndex(block_size=BS)
    h = chain("p", 6)
    w = Stream(index, "w")
    w.store(h[:4])
    assert index.longest_prefix(h) == {"w": 4}
    assert (index.num_entries, index.num_workers, index.num_pairs) == (4, 1, 4)
    w.store(h[2:6])  # overlapping store: already-held blocks are no-ops
    assert index.longest_prefix(h) == {"w": 6}
    assert index.num_pairs == 6
    w.remove([h[3]])  # a hole ends the run even though later blocks are held
    assert index.longest_prefix(h) == {"w": 3}
    assert index.longest_prefix(h[:2]) == {"w": 2}
    w.remove([h[0]])
    assert index.longest_prefix(h) == {}
    w.remove([h[0], *chain("never-stored", 2)])  # removing what it lacks: no-op
    assert index.num_entries == 4
    w.clear()
    assert index.longest_prefix(h) == {}
    assert (index.num_entries, index.num_pairs, index.num_workers) == (0, 0, 1)
    assert index.next_seq("w") == 6
    assert index.longest_prefix([]) == {}


def test_chained_prefix_across_three_workers_with_different_depths() -> None:
    index = KVIndex()
    h = chain("sys-prompt", 10)
    other = chain("other", 3)
    Stream(index, "a").store(h[:10])
    Stream(index, "b").store(h[:7])
    c = Stream(index, "c")
    c.store(h[:2])
    c.store(other)
    assert index.longest_prefix(h) == {"a": 10, "b": 7, "c": 2}
    assert index.longest_prefix(h[:5]) == {"a": 5, "b": 5, "c": 2}
    assert index.longest_prefix(h[:1]) == {"a": 1, "b": 1, "c": 1}
    assert index.longest_prefix(other) == {"c": 3}
    assert index.longest_prefix(chain("cold", 4)) == {}
    assert index.holders(h[5]) == {"a", "b"}
    # Shared blocks are one entry each, with several holders.
    assert index.num_entries == 13
    assert index.num_pairs == 10 + 7 + 2 + 3


def test_gap_needs_a_snapshot_and_the_snapshot_replaces_the_worker() -> None:
    index = KVIndex()
    h = chain("p", 8)
    index.apply("w", stored(0, h[:3]))
    with pytest.raises(NeedsSnapshot) as gap:
        index.apply("w", stored(2, h[3:5]))  # seq 1 was lost
    assert (gap.value.worker_id, gap.value.expected_seq, gap.value.got_seq) == ("w", 1, 2)
    assert "gap: expected seq 1, got 2" in str(gap.value)
    # Nothing of the rejected event was applied; old entries stay until the snapshot.
    assert index.longest_prefix(h) == {"w": 3}
    with pytest.raises(NeedsSnapshot):
        index.apply("w", stored(3, h[5:6]))
    # The snapshot says the worker now holds h[0..5) and h[0] was evicted meanwhile.
    index.replace_worker("w", h[1:5], next_seq=4)
    assert index.longest_prefix(h) == {}
    assert index.longest_prefix(h[1:]) == {"w": 4}
    index.apply("w", BlockStored(4, None, (h[0],), BS))
    assert index.longest_prefix(h) == {"w": 5}
    assert index.num_pairs == 5


def test_unknown_worker_mid_stream_and_seq_regression_need_a_snapshot() -> None:
    index = KVIndex()
    h = chain("p", 3)
    with pytest.raises(NeedsSnapshot) as first:
        index.apply("late", stored(41, h))
    assert first.value.expected_seq is None and "not 0" in str(first.value)
    assert index.num_workers == 0 and index.num_entries == 0
    # A fresh stream (seq 0) or a clear needs no snapshot: the state is then known.
    index.apply("fresh", stored(0, h))
    index.apply("cleared", AllBlocksCleared(17))
    assert index.next_seq("cleared") == 18 and index.next_seq("late") is None
    index.apply("fresh", BlockRemoved(1, (h[2],)))
    with pytest.raises(NeedsSnapshot) as back:
        index.apply("fresh", stored(0, h))  # restarted worker: its log starts over
    assert "went back" in str(back.value)
    assert index.longest_prefix(h) == {"fresh": 2}


def test_block_size_mismatch_is_refused() -> None:
    index = KVIndex(block_size=16)
    with pytest.raises(ValueError, match="blocks of 32 tokens"):
        index.apply("w", BlockStored(0, None, tuple(chain("p", 1)), 32))
    assert index.num_entries == 0 and index.next_seq("w") is None


def test_remove_worker_drops_all_its_entries_and_reuses_its_slot() -> None:
    index = KVIndex()
    h = chain("p", 50)
    Stream(index, "a").store(h)
    Stream(index, "b").store(h[:20])
    index.remove_worker("a")
    assert index.longest_prefix(h) == {"b": 20}
    assert (index.num_entries, index.num_workers, index.num_pairs) == (20, 1, 20)
    assert index.next_seq("a") is None
    index.remove_worker("a")  # idempotent
    index.remove_worker("never-seen")
    # A restarted "a" starts from an empty cache and gets the freed slot back.
    Stream(index, "a").store(h[:5])
    assert index.longest_prefix(h) == {"a": 5, "b": 20}
    index.remove_worker("b")
    index.remove_worker("a")
    assert (index.num_entries, index.num_workers, index.num_pairs) == (0, 0, 0)


def test_block_key_is_the_first_8_bytes_big_endian() -> None:
    h = bytes.fromhex(PREFIX_1_TO_33[0])
    assert block_key(h) == 0x6CB9E223AB9E57FA
    assert block_key(bytes.fromhex(PREFIX_1_TO_33[1])) == 0xB8BF06715B486485


def test_approx_bytes_counts_entries() -> None:
    index = KVIndex()
    empty = index.approx_bytes()
    Stream(index, "a").store(chain("p", 100))
    grown = index.approx_bytes() - empty
    assert 100 * 8 < grown < 100 * 400


def _cache_prompt(pool: BlockPool, tokens: list[int]) -> int:
    """Allocate and cache a prompt's full blocks as the engine does; returns how many."""
    hashes = hash_prefix_blocks(tokens, pool.block_size, MODEL)
    ids = pool.allocate(len(hashes))
    bs = pool.block_size
    pool.cache_full_blocks(
        None,
        [
            (b, h, tokens[i * bs : (i + 1) * bs])
            for i, (b, h) in enumerate(zip(ids, hashes, strict=True))
        ],
    )
    return len(hashes)


def test_golden_engine_events_feed_the_index() -> None:
    tokens = list(range(1, 34))  # the pinned vector: two full blocks and a 1-token tail
    pool = BlockPool(num_blocks=8, block_size=BS)
    assert _cache_prompt(pool, tokens) == 2
    events = pool.events.drain()
    assert [h.hex() for e in events if isinstance(e, BlockStored) for h in e.hashes] == list(
        PREFIX_1_TO_33
    )
    index = KVIndex(block_size=BS)
    for event in events:
        index.apply("prefill-0", event)
    request = hash_prefix_blocks([*tokens, 34, 35], BS, MODEL)
    assert (
        index.longest_prefix(request) == {"prefill-0": pool.num_cached_blocks} == {"prefill-0": 2}
    )
    assert index.next_seq("prefill-0") == pool.events.next_seq


def test_engine_events_with_eviction_and_two_pools() -> None:
    long_prompt = [(7 * i) % 5000 for i in range(5 * BS + 3)]  # 5 full blocks
    a = BlockPool(num_blocks=6, block_size=BS)
    b = BlockPool(num_blocks=6, block_size=BS)
    _cache_prompt(a, long_prompt)
    _cache_prompt(b, long_prompt[: 3 * BS])
    index = KVIndex(block_size=BS)
    for name, pool in (("a", a), ("b", b)):
        for event in pool.events.drain():
            index.apply(name, event)
    request = hash_prefix_blocks(long_prompt, BS, MODEL)
    assert index.longest_prefix(request) == {"a": 5, "b": 3}
    # Pool a frees its blocks (tail first) and must evict two of them for a new prompt.
    blocks = [long_prompt[i * BS : (i + 1) * BS] for i in range(len(request))]
    ids = [a.lookup(h, blk) for h, blk in zip(request, blocks, strict=True)]
    a.release(list(reversed(ids)))
    a.allocate(3)  # 1 free block + 2 evictions, least recently released first
    events = a.events.drain()
    assert [type(e) for e in events] == [BlockRemoved]
    for event in events:
        index.apply("a", event)
    held = [a.lookup(h, blk) is not None for h, blk in zip(request, blocks, strict=True)]
    assert held == [True, True, True, False, False]
    assert index.longest_prefix(request) == {"a": 3, "b": 3}


def test_importing_the_index_loads_no_torch() -> None:
    code = (
        "import sys\n"
        "import services.router.kv_index\n"
        "bad = [m for m in ('torch', 'numpy') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "torch" not in out.stdout.strip().split(",")

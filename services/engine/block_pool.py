"""Block ids, reference counts and the prefix cache of one worker's KV pool.

No tensors live here: the pool decides *which* block ids hold what, the KV cache
holds the bytes. That keeps every rule below testable on CPU in microseconds.

Rules
- A block is *in use* (ref > 0), *free and cached* (ref == 0, holds a prefix
  hash, waits in the LRU for reuse), or *free* (ref == 0, no hash).
- Only full blocks are cached, keyed by the chained hash of ``block_hash``; the
  token ids are kept beside the hash and compared on a hit.
- Allocation takes free blocks first and evicts free cached blocks only when it
  must, least recently released first; every eviction is a ``BlockRemoved``
  event.
- Allocation prefers contiguous block ids: continuing right after a sequence's
  last block, or starting a run where the sequence has room to grow (its
  expected length is ``reserve`` blocks past what it asks for now). Contiguous
  blocks are contiguous slots in every layer of the KV tensor, so attention
  reads a sequence's K/V as a view instead of gathering it every step — on CPU
  that gather costs more than the attention math (../shared/FIELD.md §6).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.engine.block_hash import BlockHash
from services.engine.kv_events import KVEventLog


@dataclass(frozen=True)
class CachedBlock:
    """A full block whose KV may be reused by any sequence with the same prefix."""

    block_id: int
    block_hash: BlockHash
    token_ids: tuple[int, ...]


class BlockPool:
    """Owns ``num_blocks`` block ids of ``block_size`` token slots each."""

    def __init__(self, num_blocks: int, block_size: int, events: KVEventLog | None = None) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks, block_size ≥ 1; got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.events = events if events is not None else KVEventLog()
        self._ref = [0] * num_blocks
        self._free = np.ones(num_blocks, dtype=bool)  # free and holding no cache entry
        self._num_free = num_blocks
        self._lru: OrderedDict[int, None] = OrderedDict()  # free cached blocks, oldest first
        self._cached: dict[int, CachedBlock] = {}  # block id -> its cache entry
        self._by_hash: dict[BlockHash, int] = {}
        self._reserve: dict[int, int] = {}  # a run's last block -> blocks its owner expects next

    # ----------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now, evicting cached ones if it must."""
        return self._num_free + len(self._lru)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def lookup(self, block_hash: BlockHash, token_ids: Sequence[int]) -> int | None:
        """The block caching this exact prefix block, or None. Side-effect free."""
        block_id = self._by_hash.get(block_hash)
        if block_id is None or self._cached[block_id].token_ids != tuple(token_ids):
            return None
        return block_id

    def cached_hashes(self) -> list[BlockHash]:
        """Every hash the prefix cache holds (in use or free), for a KV snapshot."""
        return list(self._by_hash)

    def lru_order(self) -> list[int]:
        """Free cached block ids in eviction order (next to go first)."""
        return list(self._lru)

    # --------------------------------------------------------------- mutations
    def acquire(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks found by ``lookup`` (a prefix hit)."""
        for b in block_ids:
            if self._ref[b] == 0:
                if b not in self._lru:
                    raise RuntimeError(f"block {b} is free and uncached: nothing to acquire")
                del self._lru[b]
            self._ref[b] += 1

    def allocate(self, n: int, *, after: int | None = None, reserve: int = 0) -> list[int]:
        """Take ``n`` blocks (ref = 1), preferring ids right after ``after``.

        ``reserve`` is how many more blocks the owner expects to append after
        these; later allocations for others avoid that room when they can.
        Raises RuntimeError when fewer than ``n`` blocks are free: the scheduler
        checks ``num_free_blocks`` first, so that is a bug, not bad input.
        """
        if n > self.num_free_blocks:
            raise RuntimeError(f"asked for {n} blocks with {self.num_free_blocks} free")
        if n == 0:
            return []
        if self._num_free < n:
            self._evict(n - self._num_free)
        taken: list[int] = []
        if after is not None:
            self._reserve.pop(after, None)
            b = after + 1
            while len(taken) < n and b < self.num_blocks and self._free[b]:
                taken.append(b)
                b += 1
            self._take(taken)
        if len(taken) < n:
            rest = self._pick_runs(n - len(taken), reserve)
            self._take(rest)
            taken += rest
        if reserve > 0:
            self._reserve[taken[-1]] = reserve
        return taken

    def _take(self, block_ids: list[int]) -> None:
        for b in block_ids:
            self._free[b] = False
            self._ref[b] = 1
        self._num_free -= len(block_ids)

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block, in the order given.

        Cached blocks reaching zero join the LRU's recent end, so callers pass a
        sequence's blocks tail first: its last blocks are then evicted before its
        first ones, which more prompts share.
        """
        for b in block_ids:
            if self._ref[b] <= 0:
                raise RuntimeError(f"block {b} released more often than taken")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._reserve.pop(b, None)
                if b in self._cached:
                    self._lru[b] = None
                else:
                    self._free[b] = True
                    self._num_free += 1

    def cache_full_blocks(
        self, parent: BlockHash | None, blocks: Sequence[tuple[int, BlockHash, Sequence[int]]]
    ) -> None:
        """Register newly computed full blocks (id, hash, token ids) as prefix-cache entries.

        Called once per block, after its KV is written. A hash that another block
        already caches stays with that block (this one remains a private copy).
        """
        group: list[BlockHash] = []  # consecutive new entries, reported as one event
        group_parent = parent
        prev = parent
        for block_id, block_hash, token_ids in blocks:
            if len(token_ids) != self.block_size:
                raise RuntimeError(f"block {block_id} is not full ({len(token_ids)} tokens)")
            if block_hash in self._by_hash or block_id in self._cached:
                self.events.stored(group_parent, group, self.block_size)
                group, group_parent = [], block_hash
            else:
                self._cached[block_id] = CachedBlock(block_id, block_hash, tuple(token_ids))
                self._by_hash[block_hash] = block_id
                if not group:
                    group_parent = prev
                group.append(block_hash)
            prev = block_hash
        self.events.stored(group_parent, group, self.block_size)

    def clear_cache(self) -> int:
        """Evict every free cached block; returns how many were evicted."""
        n = len(self._lru)
        if n:
            self._evict_ids(list(self._lru))
        if not self._cached:
            self.events.cleared()
        return n

    # ---------------------------------------------------------------- internals
    def _evict(self, n: int) -> None:
        self._evict_ids(list(self._lru)[:n])

    def _evict_ids(self, block_ids: list[int]) -> None:
        removed = []
        for b in block_ids:
            del self._lru[b]
            entry = self._cached.pop(b)
            del self._by_hash[entry.block_hash]
            removed.append(entry.block_hash)
            self._free[b] = True
            self._num_free += 1
        self.events.removed(removed)

    def _pick_runs(self, n: int, reserve: int) -> list[int]:
        """Free block ids for a new run: best fit for n + reserve, else the largest runs."""
        starts, lengths = self._free_runs()
        # Room another sequence reserved right after its last block is used last.
        usable_starts = starts.copy()
        for i, s in enumerate(starts):
            held = self._reserve.get(int(s) - 1, 0)
            usable_starts[i] = s + min(held, lengths[i])
        usable = starts + lengths - usable_starts
        want = n + reserve
        fits = np.nonzero(usable >= want)[0]
        if fits.size:  # best fit: leaves the larger runs to others
            i = fits[np.argmin(usable[fits])]
            return list(range(int(usable_starts[i]), int(usable_starts[i]) + n))
        fits = np.nonzero(usable >= n)[0]
        if fits.size:  # no room to grow anywhere: take the most there is
            i = fits[np.argmax(usable[fits])]
            return list(range(int(usable_starts[i]), int(usable_starts[i]) + n))
        taken: list[int] = []
        for i in np.argsort(-usable, kind="stable"):
            if usable[i] > 0 and len(taken) < n:
                take = min(n - len(taken), int(usable[i]))
                taken += range(int(usable_starts[i]), int(usable_starts[i]) + take)
        if len(taken) == n:
            return taken
        # Only room others reserved is left: take it, first come first served.
        chosen = set(taken)
        rest = [int(b) for b in np.nonzero(self._free)[0] if int(b) not in chosen]
        return taken + rest[: n - len(taken)]

    def _free_runs(self) -> tuple[np.ndarray, np.ndarray]:
        padded = np.concatenate(([False], self._free, [False])).astype(np.int8)
        edges = np.diff(padded)
        starts = np.nonzero(edges == 1)[0]
        ends = np.nonzero(edges == -1)[0]
        return starts, ends - starts

    def check_integrity(self) -> None:
        """Raise RuntimeError if the bookkeeping contradicts itself (tests call this)."""
        free_ids = set(np.nonzero(self._free)[0].tolist())
        if len(free_ids) != self._num_free:
            raise RuntimeError("free count drifted from the free map")
        for b in range(self.num_blocks):
            states = [b in free_ids, b in self._lru, self._ref[b] > 0]
            if sum(states) != 1:
                raise RuntimeError(f"block {b} is in {sum(states)} states (free, lru, used)")
            if b in self._lru and b not in self._cached:
                raise RuntimeError(f"block {b} waits in the LRU without a cache entry")
        if len(self._by_hash) != len(self._cached):
            raise RuntimeError("hash map and cache entries disagree")

"""The router's global prefix index: which workers hold which KV blocks.

Fed by every worker's KV events (``services.engine.kv_events``), asked one
question per request: for the request's chained block hashes (computed with
``services.engine.block_hash.hash_prefix_blocks``, the one function the engines
use), how many leading blocks does each worker already hold?

Contract
- Keys. A block is keyed by the first 8 bytes of its 32-byte SHA-256 chained
  hash, read as an unsigned big-endian int (``block_key``). A 64-bit key keeps
  an entry small (an int object instead of a 33-byte bytes object plus its own
  hash computation). Collisions: with n indexed blocks the chance that any two
  share a key is about n²/2⁶⁵, ≈ 3·10⁻⁸ at n = 10⁶. A collision can only make
  the router *estimate* placement wrongly (a false hit: the chosen worker
  misses its cache and prefills more, a slower request) or, if one worker held
  both colliding blocks and evicts one, a false miss. Output is never wrong:
  the worker looks blocks up by the full hash and compares token ids
  (``BlockPool.lookup``). The router's index is advice, not truth.
- Holders. Worker id strings are interned to small ints (the lowest free one,
  reused after ``remove_worker``) and each key maps to an int *bitset* of the
  workers holding it. Against frozensets of worker ints the bitset is several
  times smaller for widely shared blocks and as small for single holders, and a
  prefix walk is one ``&`` per block (bench/router_index/README.md has the
  measurement). Each worker also keeps the set of its keys, so dropping a
  worker costs its own entries, not a scan of the index.
- Sequence numbers. Each worker's events must arrive with ``seq`` equal to the
  previous one + 1. ``apply`` raises ``NeedsSnapshot`` when they do not: a gap
  (events lost), a regression (a restarted worker's fresh log, or a replay), or
  a worker never seen before whose first event is not seq 0. The caller then
  fetches a snapshot of that worker's cached hashes and calls
  ``replace_worker(worker_id, hashes, next_seq)``. Until then the worker's old
  entries stay (stale advice beats none; a false hit costs only time) and every
  further event of it raises again. An unknown worker starting at seq 0, or
  sending ``AllBlocksCleared`` (its whole state is then known: empty), is
  accepted without a snapshot. A worker that restarts or dies should be dropped
  with ``remove_worker`` as soon as the registry knows it.
- ``BlockStored.parent`` is not needed: a chained hash already names its whole
  prefix. Storing a block a worker already holds, or removing one it does not
  hold, is a no-op (events are applied as sets, per worker).
- ``longest_prefix`` returns, for each worker holding at least the first block,
  the number of leading blocks it holds; a worker's run stops at its first
  missing block. Walking the chain from the start and intersecting holder sets
  is exact because block i's hash covers blocks 0..i-1. The walk stops as soon
  as no worker remains, so a miss costs one dict lookup.
- Counters: ``num_entries`` (distinct keys), ``num_workers`` (workers with an
  event stream or a snapshot), ``num_pairs`` (worker, block) and
  ``approx_bytes()``: a ``sys.getsizeof`` walk over every container and object
  the index owns, each object counted once (by id). It is O(size): a
  diagnostic, not a per-request call.

Imports nothing but the standard library and the torch-free engine modules:
the router never loads torch.
"""

from __future__ import annotations

import heapq
import sys
from collections.abc import Iterable, Sequence

from services.engine.block_hash import BlockHash
from services.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

KEY_BYTES = 8
"""How many leading bytes of a block hash form its index key."""


def block_key(block_hash: BlockHash | bytes) -> int:
    """The index key of a block hash: its first 8 bytes as an unsigned big-endian int."""
    return int.from_bytes(block_hash[:KEY_BYTES], "big")


class NeedsSnapshot(Exception):
    """A worker's event stream cannot be applied; fetch its snapshot and ``replace_worker``."""

    def __init__(self, worker_id: str, expected_seq: int | None, got_seq: int) -> None:
        self.worker_id = worker_id
        self.expected_seq = expected_seq
        self.got_seq = got_seq
        if expected_seq is None:
            why = f"first event seen from it has seq {got_seq}, not 0"
        elif got_seq > expected_seq:
            why = f"gap: expected seq {expected_seq}, got {got_seq}"
        else:
            why = f"seq went back: expected {expected_seq}, got {got_seq} (restart or replay)"
        super().__init__(f"worker {worker_id!r} needs a KV snapshot: {why}")


class KVIndex:
    """Block key → bitset of workers holding it, plus each worker's own keys."""

    def __init__(self, block_size: int | None = None) -> None:
        """``block_size``, when given, is enforced on every ``BlockStored`` (ValueError)."""
        self.block_size = block_size
        self._holders: dict[int, int] = {}  # key -> bitset of worker slots
        self._slot: dict[str, int] = {}  # worker id -> slot (bit position)
        self._worker_at: dict[int, str] = {}  # slot -> worker id
        self._free_slots: list[int] = []  # heap of released slots, reused lowest first
        self._next_slot = 0
        self._keys: dict[str, set[int]] = {}  # worker id -> its keys
        self._next_seq: dict[str, int] = {}  # worker id -> seq its next event must carry

    # ----------------------------------------------------------------- queries
    @property
    def num_entries(self) -> int:
        return len(self._holders)

    @property
    def num_workers(self) -> int:
        return len(self._slot)

    @property
    def num_pairs(self) -> int:
        return sum(len(keys) for keys in self._keys.values())

    def workers(self) -> list[str]:
        return list(self._slot)

    def next_seq(self, worker_id: str) -> int | None:
        """The seq the worker's next event must carry; None for an unknown worker."""
        return self._next_seq.get(worker_id)

    def holders(self, block_hash: BlockHash | bytes) -> set[str]:
        """Workers holding this block (any position in their chains)."""
        return self._decode(self._holders.get(block_key(block_hash), 0))

    def longest_prefix(self, hashes: Sequence[BlockHash | bytes]) -> dict[str, int]:
        """For each worker holding ``hashes[0]``: how many leading blocks it holds."""
        holders = self._holders
        worker_at = self._worker_at
        result: dict[str, int] = {}
        if not hashes:
            return result
        alive = holders.get(int.from_bytes(hashes[0][:KEY_BYTES], "big"), 0)
        if not alive:
            return result
        for depth in range(1, len(hashes)):
            nxt = alive & holders.get(int.from_bytes(hashes[depth][:KEY_BYTES], "big"), 0)
            gone = alive ^ nxt  # nxt ⊆ alive: the workers whose run ends at this depth
            while gone:
                low = gone & -gone
                result[worker_at[low.bit_length() - 1]] = depth
                gone ^= low
            if not nxt:
                return result
            alive = nxt
        depth = len(hashes)
        while alive:
            low = alive & -alive
            result[worker_at[low.bit_length() - 1]] = depth
            alive ^= low
        return result

    def approx_bytes(self) -> int:
        """Bytes of every object the index owns, by a ``sys.getsizeof`` walk (O(size))."""
        seen: set[int] = set()
        total = 0

        def add(obj: object) -> None:
            nonlocal total
            if id(obj) not in seen:
                seen.add(id(obj))
                total += sys.getsizeof(obj)

        for container in (self._holders, self._slot, self._worker_at, self._keys):
            add(container)
        add(self._free_slots)
        add(self._next_seq)
        for key, bits in self._holders.items():
            add(key)
            add(bits)
        for worker_id, keys in self._keys.items():
            add(worker_id)
            add(keys)
            for key in keys:
                add(key)
        return total

    # --------------------------------------------------------------- mutations
    def apply(self, worker_id: str, event: KVEvent) -> None:
        """Apply one event of ``worker_id``; raises ``NeedsSnapshot`` out of sequence."""
        expected = self._next_seq.get(worker_id)
        if event.seq != (0 if expected is None else expected) and not (
            expected is None and isinstance(event, AllBlocksCleared)
        ):
            raise NeedsSnapshot(worker_id, expected, event.seq)
        if isinstance(event, BlockStored):
            if self.block_size is not None and event.block_size != self.block_size:
                raise ValueError(
                    f"worker {worker_id!r} stores blocks of {event.block_size} tokens; "
                    f"this index hashes blocks of {self.block_size}"
                )
            self._store(worker_id, event.hashes)
        elif isinstance(event, BlockRemoved):
            self._remove(worker_id, event.hashes)
        elif isinstance(event, AllBlocksCleared):
            self._clear(worker_id)
        else:
            raise TypeError(f"not a KV event: {event!r}")
        self._next_seq[worker_id] = event.seq + 1

    def replace_worker(
        self, worker_id: str, hashes: Iterable[BlockHash | bytes], next_seq: int
    ) -> None:
        """Install a snapshot: the worker holds exactly ``hashes``, next event ``next_seq``."""
        self._clear(worker_id)
        self._store(worker_id, hashes)
        self._next_seq[worker_id] = next_seq

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker (death or restart): its entries, its slot and its sequence."""
        self._next_seq.pop(worker_id, None)
        if worker_id not in self._slot:
            return
        self._clear(worker_id)
        del self._keys[worker_id]
        slot = self._slot.pop(worker_id)
        del self._worker_at[slot]
        heapq.heappush(self._free_slots, slot)

    # ---------------------------------------------------------------- internals
    def _bit(self, worker_id: str) -> int:
        slot = self._slot.get(worker_id)
        if slot is None:
            if self._free_slots:
                slot = heapq.heappop(self._free_slots)
            else:
                slot = self._next_slot
                self._next_slot += 1
            self._slot[worker_id] = slot
            self._worker_at[slot] = worker_id
            self._keys[worker_id] = set()
        return 1 << slot

    def _store(self, worker_id: str, hashes: Iterable[BlockHash | bytes]) -> None:
        bit = self._bit(worker_id)
        keys = self._keys[worker_id]
        holders = self._holders
        for h in hashes:
            key = int.from_bytes(h[:KEY_BYTES], "big")
            if key not in keys:
                keys.add(key)
                holders[key] = holders.get(key, 0) | bit

    def _remove(self, worker_id: str, hashes: Iterable[BlockHash | bytes]) -> None:
        keys = self._keys.get(worker_id)
        if not keys:
            return
        bit = 1 << self._slot[worker_id]
        holders = self._holders
        for h in hashes:
            key = int.from_bytes(h[:KEY_BYTES], "big")
            if key in keys:
                keys.discard(key)
                self._drop(holders, key, bit)

    def _clear(self, worker_id: str) -> None:
        keys = self._keys.get(worker_id)
        if keys is None:
            self._bit(worker_id)  # a known (empty) worker from now on
            return
        bit = 1 << self._slot[worker_id]
        holders = self._holders
        for key in keys:
            self._drop(holders, key, bit)
        keys.clear()

    @staticmethod
    def _drop(holders: dict[int, int], key: int, bit: int) -> None:
        rest = holders[key] ^ bit
        if rest:
            holders[key] = rest
        else:
            del holders[key]

    def _decode(self, bits: int) -> set[str]:
        out = set()
        while bits:
            low = bits & -bits
            out.add(self._worker_at[low.bit_length() - 1])
            bits ^= low
        return out

"""BlockPool scenarios with exact block ids, LRU order and KV event sequence numbers.

In the style of vLLM's tests/v1/core/test_prefix_caching.py: every scenario
states which ids it expects, and the pool's own ``check_integrity`` runs after
each one. A hypothesis state machine then drives random operation sequences.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from services.engine.block_hash import BlockHash, hash_prefix_blocks
from services.engine.block_pool import BlockPool
from services.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventLog

BS = 2
MODEL = "m"


def blocks_of(tokens: list[int]) -> list[tuple[BlockHash, list[int]]]:
    """(hash, token ids) of every full block of ``tokens``."""
    hashes = hash_prefix_blocks(tokens, BS, MODEL)
    return [(h, tokens[i * BS : (i + 1) * BS]) for i, h in enumerate(hashes)]


def cache(pool: BlockPool, block_ids: list[int], tokens: list[int]) -> list[BlockHash]:
    """Register ``block_ids`` as the full blocks of ``tokens``, a sequence from its start."""
    full = blocks_of(tokens)
    pool.cache_full_blocks(None, [(b, h, t) for b, (h, t) in zip(block_ids, full, strict=True)])
    return [h for h, _ in full]


@pytest.fixture
def pool() -> Iterator[BlockPool]:
    p = BlockPool(num_blocks=10, block_size=BS)
    yield p
    p.check_integrity()


# ------------------------------------------------------------------ allocation ids
def test_fresh_allocations_are_contiguous_in_id_order(pool: BlockPool) -> None:
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert pool.allocate(0) == []
    assert [pool.ref_count(b) for b in range(6)] == [1, 1, 1, 1, 1, 0]
    assert pool.num_free_blocks == 5


def test_after_continues_right_behind_the_last_block(pool: BlockPool) -> None:
    a = pool.allocate(2, reserve=3)
    assert a == [0, 1]
    # Someone else avoids the 3 blocks reserved behind block 1 ...
    assert pool.allocate(2) == [5, 6]
    # ... so the owner grows contiguously into them.
    assert pool.allocate(1, after=1) == [2]
    assert pool.allocate(2, after=2) == [3, 4]
    # Block 7 is free behind B's block 6: B continues there.
    assert pool.allocate(1, after=6) == [7]


def test_after_falls_back_to_a_new_run_when_the_next_block_is_taken(pool: BlockPool) -> None:
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(1) == [2]
    # Block 2 is taken, so nothing is free behind block 1; the blocks start a new run.
    assert pool.allocate(2, after=1) == [3, 4]


def test_after_with_a_short_free_run_behind_never_repeats_a_block() -> None:
    pool = BlockPool(num_blocks=10, block_size=BS)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(1) == [2]
    assert pool.allocate(2) == [3, 4]
    assert pool.allocate(1) == [5]
    pool.release([3, 4])
    # 3 and 4 are free behind block 2, 5 is taken: the third block comes from the 6-9 run.
    assert pool.allocate(3, after=2) == [3, 4, 6]
    pool.check_integrity()
    assert pool.num_free_blocks == 3


def test_best_fit_picks_the_smallest_run_that_holds_the_request(pool: BlockPool) -> None:
    ids = pool.allocate(10)
    assert ids == list(range(10))
    pool.release([1, 2])  # run of 2 at 1
    pool.release([4, 5, 6, 7, 8])  # run of 5 at 4
    assert pool.allocate(2) == [1, 2]
    pool.release([1, 2])
    assert pool.allocate(3) == [4, 5, 6]
    # Nothing holds 4 contiguous blocks any more: the largest runs, equal ones in id order.
    assert pool.allocate(4) == [1, 2, 7, 8]


def test_best_fit_counts_the_reserve(pool: BlockPool) -> None:
    pool.allocate(10)
    pool.release([1, 2])  # run of 2
    pool.release([4, 5, 6, 7])  # run of 4
    # 1 block now, 2 more expected later: the run of 2 is too small for 3.
    assert pool.allocate(1, reserve=2) == [4]
    # The next one avoids blocks 5 and 6 reserved behind block 4.
    assert pool.allocate(1) == [7]


def test_reserved_room_is_used_last() -> None:
    pool = BlockPool(num_blocks=10, block_size=BS)
    # num_blocks=10: A takes 0-1 and reserves 2-5; 6-9 are free and unreserved.
    assert pool.allocate(2, reserve=4) == [0, 1]
    # B wants 1 block now and 4 later; no unreserved run holds 5, but 6-9 hold its block.
    b = pool.allocate(1, reserve=4)
    assert b[0] >= 6
    assert pool.allocate(1, after=1) == [2]


def test_reserved_room_is_taken_when_nothing_else_is_free(pool: BlockPool) -> None:
    assert pool.allocate(2, reserve=8) == [0, 1]
    # Everything left is A's reserve: first come first served.
    assert pool.allocate(3) == [2, 3, 4]
    assert pool.allocate(1, after=1) == [5]


# ---------------------------------------------------------------- release and LRU
def test_release_tail_first_orders_the_lru(pool: BlockPool) -> None:
    a = pool.allocate(4)
    cache(pool, a, [10, 11, 12, 13, 14, 15, 16, 17])
    assert pool.num_cached_blocks == 4
    pool.release(list(reversed(a)))
    # Tail first: the last block is evicted first, the shared first block last.
    assert pool.lru_order() == [3, 2, 1, 0]
    assert pool.num_free_blocks == 10
    assert [pool.ref_count(b) for b in a] == [0, 0, 0, 0]


def test_uncached_blocks_go_back_to_the_free_map_not_the_lru(pool: BlockPool) -> None:
    a = pool.allocate(3)
    cache(pool, a[:2], [1, 2, 3, 4])  # the third block is a partial tail
    pool.release(list(reversed(a)))
    assert pool.lru_order() == [1, 0]
    # Free uncached blocks are taken before any cached one is evicted.
    assert pool.allocate(8) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert pool.lru_order() == [1, 0]
    assert pool.events.drain() == [
        BlockStored(0, None, tuple(h for h, _ in blocks_of([1, 2, 3, 4])), BS)
    ]


def test_eviction_is_lru_and_emits_block_removed(pool: BlockPool) -> None:
    first = pool.allocate(3)
    second = pool.allocate(3)
    h1 = cache(pool, first, [1, 1, 2, 2, 3, 3])
    h2 = cache(pool, second, [7, 7, 8, 8, 9, 9])
    pool.release(list(reversed(second)))  # LRU: 5 4 3
    pool.release(list(reversed(first)))  # LRU: 5 4 3 2 1 0
    assert pool.lru_order() == [5, 4, 3, 2, 1, 0]
    pool.events.drain()
    # 4 blocks are free and uncached (6-9); asking for 6 evicts the 2 oldest: 5 then 4.
    assert pool.allocate(6) == [4, 5, 6, 7, 8, 9]
    assert pool.lru_order() == [3, 2, 1, 0]
    assert pool.events.drain() == [BlockRemoved(2, (h2[2], h2[1]))]
    assert pool.lookup(h2[2], [9, 9]) is None
    assert pool.lookup(h2[0], [7, 7]) == 3
    # One more evicts 3; the first sequence's blocks survive longest.
    assert pool.allocate(1) == [3]
    assert pool.events.drain() == [BlockRemoved(3, (h2[0],))]
    assert pool.lookup(h1[0], [1, 1]) == 0
    assert pool.num_cached_blocks == 3


def test_acquire_of_a_free_cached_block_takes_it_out_of_the_lru(pool: BlockPool) -> None:
    a = pool.allocate(3)
    hashes = cache(pool, a, [1, 2, 3, 4, 5, 6])
    pool.release(list(reversed(a)))
    hit = [pool.lookup(h, t) for h, t in blocks_of([1, 2, 3, 4])]
    assert hit == [0, 1]
    pool.acquire(hit)
    assert pool.lru_order() == [2]
    assert [pool.ref_count(b) for b in a] == [1, 1, 0]
    assert pool.num_free_blocks == 8
    # A block in use can be shared: acquiring again only counts a reference.
    pool.acquire([0])
    assert pool.ref_count(0) == 2
    # Allocation now evicts block 2 only (blocks 0 and 1 are held), then takes the run 2-9.
    assert pool.allocate(8) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert pool.events.drain()[-1] == BlockRemoved(1, (hashes[2],))
    pool.release([1, 0, 0])
    assert pool.lru_order() == [1, 0]


def test_acquire_of_a_free_uncached_block_raises(pool: BlockPool) -> None:
    with pytest.raises(RuntimeError, match="block 4 is free and uncached"):
        pool.acquire([4])


# -------------------------------------------------------------- lookup and dedup
def test_lookup_compares_token_ids_not_just_the_hash(pool: BlockPool) -> None:
    a = pool.allocate(1)
    (h,) = cache(pool, a, [5, 6])
    assert pool.lookup(h, [5, 6]) == 0
    assert pool.lookup(h, (5, 6)) == 0
    # Same hash, different tokens (a collision, or a caller bug): a miss, never wrong KV.
    assert pool.lookup(h, [6, 5]) is None
    assert pool.lookup(h, [5]) is None
    (other,) = hash_prefix_blocks([5, 6], BS, "other-model")
    assert pool.lookup(other, [5, 6]) is None


def test_an_already_cached_hash_stays_with_its_first_block(pool: BlockPool) -> None:
    tokens = [1, 2, 3, 4, 5, 6]
    first = pool.allocate(3)
    hashes = cache(pool, first, tokens)
    # A second sequence computed the same prefix into its own blocks (admitted together).
    second = pool.allocate(3)
    assert second == [3, 4, 5]
    cache(pool, second, tokens)
    assert pool.num_cached_blocks == 3
    assert [pool.lookup(h, t) for h, t in blocks_of(tokens)] == [0, 1, 2]
    # Only the first registration is an event; the duplicates are private copies.
    assert pool.events.drain() == [BlockStored(0, None, tuple(hashes), BS)]
    pool.release(list(reversed(second)))
    assert pool.lru_order() == []
    assert pool.num_free_blocks == 7


def test_dedup_in_the_middle_splits_the_stored_event(pool: BlockPool) -> None:
    # Block hashes of the prefix [1 2 | 3 4 | 5 6]; another block already caches [3 4].
    full = blocks_of([1, 2, 3, 4, 5, 6])
    (h0, t0), (h1, t1), (h2, t2) = full
    other = pool.allocate(1)
    pool.cache_full_blocks(h0, [(other[0], h1, t1)])
    seq = pool.allocate(3)
    assert seq == [1, 2, 3]
    pool.cache_full_blocks(None, [(1, h0, t0), (2, h1, t1), (3, h2, t2)])
    assert pool.events.drain() == [
        BlockStored(0, h0, (h1,), BS),
        BlockStored(1, None, (h0,), BS),
        BlockStored(2, h1, (h2,), BS),
    ]
    assert [pool.lookup(h, t) for h, t in full] == [1, 0, 3]


def test_cache_full_blocks_rejects_a_partial_block(pool: BlockPool) -> None:
    a = pool.allocate(1)
    (h,) = hash_prefix_blocks([1, 2], BS, MODEL)
    with pytest.raises(RuntimeError, match="block 0 is not full"):
        pool.cache_full_blocks(None, [(a[0], h, [1])])


# ---------------------------------------------------------------------- events
def test_event_sequence_numbers_increase_by_one_without_gaps(pool: BlockPool) -> None:
    a = pool.allocate(5)
    cache(pool, a[:2], [1, 2, 3, 4])  # stored #0
    cache(pool, a[2:4], [9, 9, 8, 8])  # stored #1
    pool.release(list(reversed(a)))
    pool.allocate(7)  # 6 free: evicts the oldest cached block (3), removed #2
    assert pool.clear_cache() == 3  # removed #3, then cleared #4
    assert pool.clear_cache() == 0  # cleared #5 (nothing cached)
    events = pool.events.drain()
    assert [e.seq for e in events] == [0, 1, 2, 3, 4, 5]
    assert [type(e) for e in events] == [
        BlockStored,
        BlockStored,
        BlockRemoved,
        BlockRemoved,
        AllBlocksCleared,
        AllBlocksCleared,
    ]
    assert events[2].hashes == (blocks_of([9, 9, 8, 8])[1][0],)
    assert pool.events.next_seq == 6
    assert pool.events.drain() == []


def test_clear_cache_keeps_blocks_in_use_and_reports_only_what_it_dropped(
    pool: BlockPool,
) -> None:
    a = pool.allocate(2)
    b = pool.allocate(2)
    ha = cache(pool, a, [1, 1, 2, 2])
    hb = cache(pool, b, [3, 3, 4, 4])
    pool.release(list(reversed(b)))
    pool.events.drain()
    assert pool.clear_cache() == 2
    # Blocks 0 and 1 are still cached (in use), so this is no AllBlocksCleared.
    assert pool.events.drain() == [BlockRemoved(2, (hb[1], hb[0]))]
    assert pool.num_cached_blocks == 2
    assert pool.lookup(ha[0], [1, 1]) == 0
    pool.release(list(reversed(a)))
    assert pool.clear_cache() == 2
    assert pool.events.drain() == [BlockRemoved(3, (ha[1], ha[0])), AllBlocksCleared(4)]
    assert pool.num_cached_blocks == 0
    assert pool.num_free_blocks == 10


def test_event_log_capacity_drops_the_oldest_and_keeps_numbering() -> None:
    log = KVEventLog(capacity=3)
    for _ in range(5):
        log.cleared()
    assert [e.seq for e in log.drain()] == [2, 3, 4]
    log.removed([])  # nothing removed: no event, no sequence number
    log.stored(None, [], 4)
    assert log.next_seq == 5
    log.cleared()
    assert log.drain() == [AllBlocksCleared(5)]


# ---------------------------------------------------------------------- misuse
def test_over_release_raises(pool: BlockPool) -> None:
    a = pool.allocate(1)
    pool.release(a)
    with pytest.raises(RuntimeError, match="block 0 released more often than taken"):
        pool.release(a)
    with pytest.raises(RuntimeError, match="block 7 released more often than taken"):
        pool.release([7])


def test_allocating_more_than_is_free_raises(pool: BlockPool) -> None:
    pool.allocate(8)
    with pytest.raises(RuntimeError, match="asked for 3 blocks with 2 free"):
        pool.allocate(3)
    assert pool.num_free_blocks == 2


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 4), (4, 0), (-1, 4)])
def test_pool_needs_at_least_one_block_of_one_token(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError, match="num_blocks, block_size"):
        BlockPool(num_blocks, block_size)


# ------------------------------------------------------------- random sequences
class PoolMachine(RuleBasedStateMachine):
    """Random allocate / grow / release / cache / hit / clear, against a simple model."""

    MAX_GROW = 3
    """Most blocks one ``allocate(after=...)`` asks for."""

    @initialize(num_blocks=st.integers(1, 12))
    def setup(self, num_blocks: int) -> None:
        self.pool = BlockPool(num_blocks, BS)
        self.owners: list[list[int]] = []  # each holds one reference on its blocks
        self.tokens: dict[int, list[int]] = {}  # owner index -> token ids of its full blocks
        self.next_token = 0
        self.events_seen = 0

    def _in_use(self) -> int:
        return len({b for owner in self.owners for b in owner})

    @rule(n=st.integers(0, 4), reserve=st.integers(0, 4))
    def allocate(self, n: int, reserve: int) -> None:
        if n > self.pool.num_free_blocks:
            with pytest.raises(RuntimeError):
                self.pool.allocate(n, reserve=reserve)
            return
        before = {b for owner in self.owners for b in owner}
        ids = self.pool.allocate(n, reserve=reserve)
        assert len(ids) == n == len(set(ids))
        assert not before & set(ids)
        assert all(self.pool.ref_count(b) == 1 for b in ids)
        self.owners.append(ids)

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def grow(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(self.owners))
        n = data.draw(st.integers(1, self.MAX_GROW))
        if not owner or n > self.pool.num_free_blocks:
            return
        ids = self.pool.allocate(n, after=owner[-1])
        assert len(set(ids)) == n
        assert not set(ids) & {b for o in self.owners for b in o}
        owner += ids

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.owners) - 1))
        owner = self.owners.pop(i)
        self.tokens.pop(id(owner), None)
        self.pool.release(list(reversed(owner)))

    @precondition(lambda self: self.owners)
    @rule(data=st.data(), shared=st.booleans())
    def cache_owner(self, data: st.DataObject, shared: bool) -> None:
        owner = data.draw(st.sampled_from(self.owners))
        if id(owner) in self.tokens or not owner:
            return
        # Shared content makes later owners collide with cached hashes (dedup path).
        if shared:
            tokens = [0] * (BS * len(owner))
        else:
            tokens = list(range(self.next_token, self.next_token + BS * len(owner)))
            self.next_token += len(tokens)
        cache(self.pool, owner, tokens)
        self.tokens[id(owner)] = tokens

    @rule(length=st.integers(1, 6))
    def prefix_hit(self, length: int) -> None:
        hit = []
        for h, t in blocks_of([0] * (BS * length)):
            b = self.pool.lookup(h, t)
            if b is None:
                break
            hit.append(b)
        if hit:
            self.pool.acquire(hit)
            self.owners.append(hit)

    @rule()
    def clear(self) -> None:
        lru = self.pool.lru_order()
        assert self.pool.clear_cache() == len(lru)

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "pool"):
            return
        self.pool.check_integrity()
        assert self.pool.num_free_blocks == self.pool.num_blocks - self._in_use()
        for b in range(self.pool.num_blocks):
            held = sum(owner.count(b) for owner in self.owners)
            assert self.pool.ref_count(b) == held
        events = self.pool.events.drain()
        assert [e.seq for e in events] == list(
            range(self.events_seen, self.events_seen + len(events))
        )
        self.events_seen += len(events)

    def teardown(self) -> None:
        if not hasattr(self, "pool"):
            return
        for owner in self.owners:
            self.pool.release(list(reversed(owner)))
        self.pool.check_integrity()
        assert self.pool.num_free_blocks == self.pool.num_blocks
        self.pool.clear_cache()
        assert self.pool.num_cached_blocks == 0


PoolMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None, derandomize=True
)
test_random_operations_keep_the_pool_consistent = PoolMachine.TestCase

"""Scheduler scenarios without a model: exact chunk sizes, block ids and queue order.

Each test drives ``Scheduler`` and ``BlockPool`` directly and plays the model's
part itself: after ``schedule()`` it calls ``postprocess()``, appends one
token to every sequence whose chunk samples and finishes those that reached
max_tokens, as the engine does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import pytest

from services.engine.block_pool import BlockPool
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from services.engine.sequence import SeqStatus, Sequence

BS = 4
MODEL = "m"


class Harness:
    def __init__(self, num_blocks: int = 64, **config: object) -> None:
        self.pool = BlockPool(num_blocks, BS)
        self.sched = Scheduler(self.pool, SchedulerConfig(**config), MODEL)
        self.arrivals = 0
        self.next_token = 1000

    def add(self, rid: str, prompt: list[int] | int, max_tokens: int = 16) -> Sequence:
        """Queue a request; an int prompt is that many tokens no other request shares."""
        if isinstance(prompt, int):
            tokens = list(
                range(10_000 * (self.arrivals + 1), 10_000 * (self.arrivals + 1) + prompt)
            )
        else:
            tokens = list(prompt)
        seq = Sequence(
            request_id=rid,
            token_ids=tokens,
            params=SamplingParams(max_tokens=max_tokens),
            max_total_tokens=len(tokens) + max_tokens,
            arrival=self.arrivals,
        )
        self.arrivals += 1
        self.sched.add(seq)
        return seq

    def step(self) -> list[tuple[str, int]]:
        """One engine step; returns (request id, chunk size) in schedule order."""
        chunks = self.sched.schedule()
        sampling = [c.seq for c in chunks if c.samples]
        self.sched.postprocess(chunks)
        for seq in sampling:
            seq.token_ids.append(self.next_token)
            self.next_token += 1
            if (
                seq.num_output_tokens >= seq.params.max_tokens
                or len(seq.token_ids) >= seq.max_total_tokens
            ):
                self.sched.finish(seq)
        self.pool.check_integrity()
        return [(c.seq.request_id, c.num_tokens) for c in chunks]

    def finish(self, seq: Sequence) -> None:
        self.sched.finish(seq)
        self.pool.check_integrity()

    def waiting(self) -> list[str]:
        return [s.request_id for s in self.sched.waiting]

    def running(self) -> list[str]:
        return [s.request_id for s in self.sched.running]


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness(max_num_batched_tokens=10)
    yield harness
    harness.pool.check_integrity()


# ------------------------------------------------------------------- token budget
def test_budget_goes_to_decodes_first_then_prefill_chunks(h: Harness) -> None:
    a = h.add("a", 6)
    assert h.step() == [("a", 6)]
    b = h.add("b", 20)
    # a decodes one token; b's prefill gets the other 9 of the budget of 10.
    assert h.step() == [("a", 1), ("b", 9)]
    c = h.add("c", 5)
    # b (running, still prefilling) takes what a left; c waits for the budget.
    assert h.step() == [("a", 1), ("b", 9)]
    assert h.waiting() == ["c"]
    assert h.step() == [("a", 1), ("b", 2), ("c", 5)]
    assert h.step() == [("a", 1), ("b", 1), ("c", 1)]
    assert [a.num_computed_tokens, b.num_computed_tokens, c.num_computed_tokens] == [10, 21, 6]
    assert [len(a.token_ids), len(b.token_ids), len(c.token_ids)] == [11, 22, 7]


def test_chunked_prefill_chunk_sizes_and_blocks(h: Harness) -> None:
    seq = h.add("a", 30, max_tokens=4)  # 34 tokens at most: 9 blocks expected
    sizes = []
    tables = []
    while seq.num_computed_tokens < 30:
        chunks = h.sched.schedule()
        assert [c.samples for c in chunks] == [seq.num_computed_tokens + 10 >= 30]
        sizes.append(chunks[0].num_tokens)
        tables.append(list(seq.block_table))
        h.sched.postprocess(chunks)
    assert sizes == [10, 10, 10]
    # Blocks are allocated as the chunks need them, contiguously.
    assert tables == [[0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]]
    assert seq.num_committed_blocks == 7  # 30 computed tokens: 7 full blocks
    assert h.pool.num_cached_blocks == 7


def test_a_chunk_smaller_than_the_budget_when_the_prompt_ends(h: Harness) -> None:
    h.add("a", 23)
    assert h.step() == [("a", 10)]
    assert h.step() == [("a", 10)]
    assert h.step() == [("a", 3)]
    assert h.step() == [("a", 1)]


def test_max_num_seqs_caps_the_running_set() -> None:
    h = Harness(max_num_seqs=2, max_num_batched_tokens=100)
    a, _b, _c = h.add("a", 3), h.add("b", 3), h.add("c", 3)
    assert h.step() == [("a", 3), ("b", 3)]
    assert h.waiting() == ["c"]
    assert h.step() == [("a", 1), ("b", 1)]
    h.finish(a)
    assert a.status == SeqStatus.FINISHED
    assert h.step() == [("b", 1), ("c", 3)]
    assert h.running() == ["b", "c"]


def test_waiting_queue_is_first_come_first_served() -> None:
    # a needs 3 blocks but only 2 are free: b (1 block) must not overtake it.
    h = Harness(num_blocks=4, max_num_batched_tokens=100)
    h.add("x", 7)  # holds 2 blocks
    assert h.step() == [("x", 7)]
    h.add("a", 9)
    h.add("b", 2)
    assert h.step() == [("x", 1)]
    assert h.waiting() == ["a", "b"]


# -------------------------------------------------------------------- prefix cache
def test_prefix_hit_never_covers_the_whole_prompt() -> None:
    h = Harness(max_num_batched_tokens=100)
    prompt = list(range(100, 108))  # exactly 2 full blocks
    first = h.add("first", prompt)
    assert h.step() == [("first", 8)]
    assert first.block_table == [0, 1]
    h.finish(first)
    assert h.pool.lru_order() == [1, 0]

    # The same 8 tokens: block 1 would cover the last token, so only block 0 is reused.
    again = h.add("again", prompt)
    assert h.step() == [("again", 4)]
    assert again.block_table == [0, 2]
    assert again.num_cached_tokens == 4
    assert h.pool.ref_count(0) == 1

    # One more token: both blocks hit (block 1 comes out of the LRU), 1 token computed.
    # Its new block skips 4-6, the room "again" (24 tokens = 6 blocks expected) reserved
    # behind its block 3.
    longer = h.add("longer", [*prompt, 5])
    assert h.step() == [("again", 1), ("longer", 1)]
    assert again.block_table == [0, 2, 3]
    assert longer.block_table == [0, 1, 7]
    assert longer.num_cached_tokens == 8
    assert h.pool.ref_count(0) == 2
    assert h.pool.lru_order() == []


def test_queued_prefill_leaves_out_what_the_cache_held_when_queued() -> None:
    """The load a worker reports: waiting prompts count without their cached prefix (the
    cache lookup the scheduler makes when it admits them), running prefills their rest."""
    h = Harness(max_num_batched_tokens=6)
    shared = list(range(100, 108))  # 2 full blocks
    h.add("first", [*shared, 1])
    assert h.sched.queued_prefill() == 9  # nothing cached yet
    assert h.step() == [("first", 6)]
    assert h.sched.queued_prefill() == 3  # its rest
    assert h.step() == [("first", 3)]  # computed (and cached) whole; decoding now
    assert h.sched.queued_prefill() == 0
    for i in range(4):
        h.add(f"r{i}", [*shared, 2, 3, 4, 5, i])  # 13 tokens, the first 8 cached
    assert [s.num_cached_when_queued for s in h.sched.waiting] == [8, 8, 8, 8]
    assert h.sched.queued_prefill() == 4 * 5  # was 4 * 13
    assert h.step() == [("first", 1), ("r0", 5)]
    assert h.sched.queued_prefill() == 3 * 5


def test_prefix_hit_stops_at_the_first_different_block() -> None:
    h = Harness(max_num_batched_tokens=100)
    a = h.add("a", list(range(12)))
    h.step()
    h.finish(a)
    # Block 2 equals a's block 2 token for token, but its prefix differs: no hit.
    b = h.add("b", [0, 1, 2, 3, 9, 9, 9, 9, 8, 9, 10, 11, 12])
    assert h.step() == [("b", 9)]
    assert b.num_cached_tokens == 4
    assert b.block_table[0] == 0


def test_prefix_caching_disabled_never_hits() -> None:
    h = Harness(max_num_batched_tokens=100, enable_prefix_caching=False)
    a = h.add("a", list(range(9)))
    h.step()
    h.finish(a)
    assert h.pool.num_cached_blocks == 0
    assert h.pool.lru_order() == []
    b = h.add("b", list(range(9)))
    assert h.step() == [("b", 9)]
    assert b.num_cached_tokens == 0


def test_a_hit_on_a_block_in_use_shares_it() -> None:
    h = Harness(max_num_batched_tokens=100)
    prompt = list(range(9))
    a = h.add("a", prompt)
    b = h.add("b", prompt)
    # Admitted in the same step: b cannot hit blocks a has not computed yet.
    assert h.step() == [("a", 9), ("b", 9)]
    assert b.num_cached_tokens == 0
    assert h.pool.num_cached_blocks == 2  # b's equal blocks stay private copies
    c = h.add("c", prompt)
    assert h.step() == [("a", 1), ("b", 1), ("c", 1)]
    assert c.num_cached_tokens == 8
    assert c.block_table[:2] == a.block_table[:2]
    assert [h.pool.ref_count(x) for x in a.block_table[:2]] == [2, 2]


# ---------------------------------------------------------------------- preemption
def test_preemption_picks_the_newest_running_sequence() -> None:
    # 4 blocks of 4 tokens; a and b each start with 2 blocks and then need a third.
    h = Harness(num_blocks=4, max_num_batched_tokens=100)
    a = h.add("a", 7, max_tokens=9)
    b = h.add("b", 7, max_tokens=9)
    assert h.step() == [("a", 7), ("b", 7)]
    assert (a.block_table, b.block_table) == ([0, 1], [2, 3])
    assert h.step() == [("a", 1), ("b", 1)]  # 8 tokens each: both blocks full
    # a needs a third block, none is free: b (admitted last) is preempted.
    assert h.step() == [("a", 1)]
    assert h.sched.num_preemptions == 1
    assert b.status == SeqStatus.WAITING
    assert b.num_preemptions == 1
    assert (b.block_table, b.num_computed_tokens) == ([], 0)
    assert h.waiting() == ["b"]
    assert h.running() == ["a"]
    # b released tail first, so its last block went first: a continues in block 3.
    assert a.block_table == [0, 1, 3]
    assert h.pool.lru_order() == [2]


def test_a_preempted_sequence_goes_to_the_front_and_is_recomputed() -> None:
    h = Harness(num_blocks=4, max_num_batched_tokens=100)
    a = h.add("a", 7, max_tokens=9)
    b = h.add("b", 7, max_tokens=9)
    h.step()
    h.step()
    h.add("c", 2)
    assert h.step() == [("a", 1)]  # b preempted; c queues behind it
    assert h.waiting() == ["b", "c"]
    # Queued again, both its full blocks were still cached: the load it reports leaves
    # them out (an estimate: one is evicted before b runs again, below).
    assert b.num_cached_when_queued == 8
    b_tokens = list(b.token_ids)
    assert len(b_tokens) == 9  # 7 prompt + 2 generated: all of it is prefilled again
    h.finish(a)
    # b's first block (2) is still cached: recompute skips it, never the last token.
    assert h.step() == [("b", 5), ("c", 2)]
    assert b.token_ids[:9] == b_tokens
    assert b.block_table[0] == 2
    assert b.num_cached_tokens == 0  # usage counts the first admission only
    assert b.num_computed_tokens == 9
    assert b.num_output_tokens == 3


def test_a_prefix_hit_followed_by_a_short_free_run_gets_distinct_blocks() -> None:
    h = Harness(num_blocks=8, max_num_batched_tokens=100)
    warm_prompt = list(range(300, 305))
    warm = h.add("warm", warm_prompt, max_tokens=3)
    assert h.step() == [("warm", 5)]
    y = h.add("y", 4, max_tokens=4)
    assert h.step() == [("warm", 1), ("y", 4)]
    assert (warm.block_table, y.block_table) == ([0, 1], [2])
    h.finish(warm)  # block 0 cached in the LRU, partial block 1 free, block 2 held by y
    a = h.add("a", warm_prompt[:4] + list(range(900, 906)), max_tokens=2)
    chunks = h.sched.schedule()
    assert [(c.seq.request_id, c.num_tokens) for c in chunks] == [("y", 1), ("a", 6)]
    # y's decode took block 3 first; a continues in 1, then starts a new run at 4.
    assert (y.block_table, a.block_table) == ([2, 3], [0, 1, 4])
    h.pool.check_integrity()


def test_cached_tokens_are_recorded_at_first_admission_only() -> None:
    h = Harness(num_blocks=5, max_num_batched_tokens=100)
    prompt = list(range(500, 509))
    warm = h.add("warm", prompt[:5])
    assert h.step() == [("warm", 5)]
    h.finish(warm)
    assert h.pool.lru_order() == [0]  # prompt[:4]
    x = h.add("x", 4, max_tokens=8)
    assert h.step() == [("x", 4)]
    # a hits 1 block at its first admission; x's reserve (block 3) is used last.
    a = h.add("a", prompt, max_tokens=6)
    assert h.step() == [("x", 1), ("a", 5)]
    assert (x.block_table, a.block_table) == ([1, 2], [0, 4, 3])
    assert a.num_cached_tokens == 4
    for _ in range(3):
        assert h.step() == [("x", 1), ("a", 1)]
    # x needs a third block: a (newest) is preempted, and x evicts a's tail block 3.
    assert h.step() == [("x", 1)]
    assert (a.status, a.num_preemptions) == (SeqStatus.WAITING, 1)
    assert x.block_table == [1, 2, 3]
    assert h.pool.lru_order() == [4, 0]
    assert h.step() == [("x", 1)]
    assert h.step() == [("x", 1)]  # x's 8th token: it finishes
    assert x.status == SeqStatus.FINISHED
    # Back in: 2 blocks (8 tokens) hit this time, but usage keeps the first admission's 4.
    assert h.step() == [("a", 5)]
    assert a.block_table == [0, 4, 2, 3]
    assert a.num_cached_tokens == 4


def test_a_sequence_preempts_itself_when_it_is_the_newest() -> None:
    h = Harness(num_blocks=4, max_num_batched_tokens=100)
    other = h.add("other", 4, max_tokens=4)
    assert h.step() == [("other", 4)]
    assert other.block_table == [0]
    a = h.add("a", 7, max_tokens=5)
    assert h.step() == [("other", 1), ("a", 7)]
    assert (other.block_table, a.block_table) == ([0, 1], [2, 3])
    assert h.step() == [("other", 1), ("a", 1)]
    # a needs a third block and is itself the newest: it goes back, other keeps its step
    # (and finishes with its 4th token).
    assert h.step() == [("other", 1)]
    assert (a.status, a.num_preemptions) == (SeqStatus.WAITING, 1)
    assert other.status == SeqStatus.FINISHED
    assert (h.waiting(), h.running()) == (["a"], [])
    # a released tail first, then other its one full block (block 1 was partial).
    assert h.pool.lru_order() == [3, 2, 0]
    # Both of a's full blocks are still cached: only its 9th token is computed again.
    # Its third block is the uncached free block 1; cached block 0 is not evicted.
    assert h.step() == [("a", 1)]
    assert a.block_table == [2, 3, 1]
    assert h.pool.lru_order() == [0]
    assert a.num_cached_tokens == 0


# ------------------------------------------------------------------------- finish
def test_finish_releases_every_block() -> None:
    h = Harness(num_blocks=16, max_num_batched_tokens=8)
    seqs = [h.add(f"r{i}", 5 + 3 * i, max_tokens=6) for i in range(5)]
    assert [h.step() for _ in range(4)] == [
        [("r0", 5), ("r1", 3)],
        [("r0", 1), ("r1", 5), ("r2", 2)],
        [("r0", 1), ("r1", 1), ("r2", 6)],
        [("r0", 1), ("r1", 1), ("r2", 3), ("r3", 3)],  # r3 mid-prefill
    ]
    assert [s.status for s in seqs] == [SeqStatus.RUNNING] * 4 + [SeqStatus.WAITING]
    assert h.pool.num_free_blocks == 16 - 2 - 3 - 3 - 1
    for seq in reversed(seqs):
        h.finish(seq)
        assert (seq.status, seq.block_table) == (SeqStatus.FINISHED, [])
    assert not h.sched.has_work()
    assert h.pool.num_free_blocks == 16
    assert all(h.pool.ref_count(b) == 0 for b in range(16))
    # 2 full blocks each of r0, r1 and r2 stay cached for later prompts, all free.
    assert len(h.pool.lru_order()) == h.pool.num_cached_blocks == 6
    assert h.pool.clear_cache() == 6


def test_finish_of_a_waiting_sequence_removes_it_from_the_queue(h: Harness) -> None:
    a = h.add("a", 3)
    h.finish(a)
    assert h.waiting() == []
    assert a.status == SeqStatus.FINISHED
    assert h.step() == []


def test_scheduled_chunk_samples_only_when_it_reaches_the_last_token(h: Harness) -> None:
    seq = h.add("a", 12)
    chunk = ScheduledChunk(seq, 10)
    assert not chunk.samples
    assert ScheduledChunk(seq, 12).samples


# ------------------------------------------------------- transfers waiting for room
def _prefilled_elsewhere(h: Harness, rid: str, prompt_len: int) -> Sequence:
    """A sequence whose prompt (unshared tokens) and first token came from a prefill worker."""
    base = 10_000 * (h.arrivals + 1)
    seq = Sequence(
        request_id=rid,
        token_ids=[*range(base, base + prompt_len), 7],
        params=SamplingParams(max_tokens=4),
        max_total_tokens=prompt_len + 4,
        arrival=h.arrivals,
        num_prompt_tokens=prompt_len,
    )
    h.arrivals += 1
    return seq


def test_transfers_wait_for_room_first_come_first_served() -> None:
    h = Harness(num_blocks=8, max_num_batched_tokens=16)
    run = h.add("run", 8, max_tokens=4)
    assert h.step() == [("run", 8)] and run.block_table == [0, 1]
    big, small = _prefilled_elsewhere(h, "big", 24), _prefilled_elsewhere(h, "small", 4)
    # big needs 6 blocks and leaves one per running sequence: 7 > the 6 free.
    assert h.sched.reserve_for_transfer(big, 24, wait=True) is None
    # small would fit, but big came first.
    assert h.sched.reserve_for_transfer(small, 4, wait=True) is None
    assert [s.status for s in (big, small)] == [SeqStatus.AWAITING_ROOM] * 2
    assert h.sched.admit_awaiting() == [] and h.pool.num_free_blocks == 6
    while h.running():
        h.step()
    # run finished: its blocks 0 and 1 are free but cached, so big takes the 6 never used
    # and small evicts one of run's, block 1 (its last block, the least valuable prefix).
    assert h.sched.admit_awaiting() == [(big, 0), (small, 0)]
    assert big.block_table == [2, 3, 4, 5, 6, 7] and small.block_table == [1]
    assert [s.status for s in (big, small)] == [SeqStatus.AWAITING_KV] * 2
    assert h.sched.awaiting_room == deque()


def test_waiting_transfer_given_up_or_finished_leaves_the_queue() -> None:
    h = Harness(num_blocks=8)
    h.add("run", 8, max_tokens=4)
    h.step()
    a, b = _prefilled_elsewhere(h, "a", 24), _prefilled_elsewhere(h, "b", 24)
    h.sched.reserve_for_transfer(a, 24, wait=True)
    h.sched.reserve_for_transfer(b, 24, wait=True)
    h.sched.give_up_awaiting(a)  # to be prefilled here, behind what was queued
    h.finish(b)  # aborted while waiting: holds nothing
    assert a.status == SeqStatus.WAITING and h.waiting() == ["a"]
    assert b.status == SeqStatus.FINISHED and h.sched.awaiting_room == deque()
    assert h.pool.num_free_blocks == 6


def test_without_wait_a_transfer_that_does_not_fit_takes_nothing() -> None:
    h = Harness(num_blocks=8)
    h.add("run", 8, max_tokens=4)
    h.step()
    seq = _prefilled_elsewhere(h, "x", 28)  # 7 blocks: more than the 6 free
    assert h.sched.reserve_for_transfer(seq, 28) is None
    assert seq.status == SeqStatus.WAITING and h.sched.awaiting_room == deque()
    # 24 tokens fit exactly without waiting: no headroom is asked of the old path.
    fits = _prefilled_elsewhere(h, "y", 24)
    assert h.sched.reserve_for_transfer(fits, 24) == 0 and h.pool.num_free_blocks == 0
    h.finish(fits)


def test_sequences_still_receiving_count_against_the_batch() -> None:
    h = Harness(num_blocks=64, max_num_seqs=2)
    run = h.add("run", 8, max_tokens=4)
    h.step()
    a, b = _prefilled_elsewhere(h, "a", 8), _prefilled_elsewhere(h, "b", 8)
    assert h.sched.reserve_for_transfer(a, 8, wait=True) == 0 and h.sched.num_receiving == 1
    # run and a (receiving, not yet running) fill the batch of 2
    assert h.sched.reserve_for_transfer(b, 8, wait=True) is None
    h.sched.transfer_done(a, 8, ok=True)
    assert h.running() == ["run", "a"] and h.sched.num_receiving == 0
    assert h.sched.admit_awaiting() == []
    h.finish(run)
    assert h.sched.admit_awaiting() == [(b, 0)] and h.sched.num_receiving == 1
    h.finish(b)  # aborted while its KV was being copied in
    assert h.sched.num_receiving == 0
    h.finish(a)
    assert h.pool.num_free_blocks == 64

"""Continuous batching with chunked prefill under a per-step token budget.

Policy (one step):
1. Running sequences first, oldest first: a decoding sequence takes 1 token of
   the budget, a sequence still prefilling takes a chunk of what remains. Serving
   them first keeps inter-token latency steady while new prompts arrive.
2. If a running sequence needs a block and none is free, the most recently
   admitted running sequence is preempted: its blocks are released and it
   returns to the front of the queue, to be recomputed (its full blocks usually
   still hit the prefix cache).
3. Then queued sequences, first come first served, while budget, blocks and
   ``max_num_seqs`` allow. A queued sequence first takes the longest cached
   prefix of its tokens (never the whole prompt: the last token is always
   computed, to produce logits), then a chunk of the rest.

No tensors here: the scheduler decides which tokens run, the runner runs them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from services.engine.block_pool import BlockPool
from services.engine.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    """Most sequences running at once."""
    max_num_batched_tokens: int = 2048
    """Token budget per step: decode tokens plus prefill chunks."""
    enable_prefix_caching: bool = True
    """Reuse cached full blocks across requests."""


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute ``num_tokens`` tokens of ``seq`` starting at its first uncomputed one."""

    seq: Sequence
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when the chunk reaches the last known token, so a new one is sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == len(self.seq.token_ids)


class SchedulingError(Exception):
    """Scheduling ``seq`` raised. The engine fails that request alone: left where it was,
    it would raise again on every later pass and stall everything queued behind it."""

    def __init__(self, seq: Sequence) -> None:
        super().__init__(f"scheduling request {seq.request_id!r} failed")
        self.seq = seq


@contextmanager
def _blamed_on(seq: Sequence) -> Iterator[None]:
    try:
        yield
    except SchedulingError:
        raise
    except Exception as e:
        raise SchedulingError(seq) from e


class Scheduler:
    def __init__(self, pool: BlockPool, config: SchedulerConfig, model_id: str) -> None:
        self.pool = pool
        self.config = config
        self.model_id = model_id
        self.block_size = pool.block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.awaiting_room: deque[tuple[Sequence, int]] = deque()
        """Sequences prefilled elsewhere, with their KV's token count, waiting first come
        first served for blocks to receive it (``reserve_for_transfer(wait=True)``)."""
        self.num_receiving = 0
        """Sequences holding blocks while their KV is copied in (AWAITING_KV): they join
        ``running`` when it has arrived, so they count against its limits already."""
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self._note_cached(seq)
        self.waiting.append(seq)

    def queued_prefill(self) -> int:
        """Prompt tokens still to compute: the rest of the running prefills, and each
        waiting prompt after the prefix the cache held when it was queued (a load figure:
        reporting whole prompts, a worker holding a hot prefix looked several times busier
        than it was, and a prefix-aware router sent that prefix's requests elsewhere)."""
        queued = sum(
            s.num_uncomputed_tokens
            for s in self.running
            if s.num_computed_tokens < s.num_prompt_tokens
        )
        return queued + sum(
            s.num_uncomputed_tokens - s.num_cached_when_queued for s in self.waiting
        )

    def _note_cached(self, seq: Sequence) -> None:
        # Once per queueing, not per report: a lookup per block of the prompt.
        seq.num_cached_when_queued = len(self._cached_prefix(seq)) * self.block_size

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted = False
        preemptions_before = self.num_preemptions
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            with _blamed_on(seq):
                if not self._make_room(seq, self._blocks_needed(seq, n)):
                    preempted = True
                    break
                self._grow(seq, n)
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
            i += 1
        # Admitting right after preempting would only thrash: wait a step.
        preempted = preempted or self.num_preemptions != preemptions_before
        while not preempted and self.waiting and budget > 0:
            # Sequences receiving KV join ``running`` when it arrives: they hold their slot.
            if len(self.running) + self.num_receiving >= self.config.max_num_seqs:
                break
            with _blamed_on(self.waiting[0]):
                chunk = self._admit(self.waiting[0], budget)
            if chunk is None:
                break
            chunks.append(chunk)
            budget -= chunk.num_tokens
        return chunks

    def postprocess(self, chunks: list[ScheduledChunk]) -> None:
        """Record computed tokens and cache newly full blocks (after the forward pass)."""
        for chunk in chunks:
            seq = chunk.seq
            seq.num_computed_tokens += chunk.num_tokens
            if self.config.enable_prefix_caching:
                self._commit_full_blocks(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's blocks, wherever it is."""
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        elif seq.status == SeqStatus.AWAITING_ROOM:
            self._drop_awaiting(seq)
        elif seq.status == SeqStatus.AWAITING_KV:
            self.num_receiving -= 1
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def hold(self, seq: Sequence) -> None:
        """Take a running sequence out of the batch, keeping its blocks pinned."""
        self.running.remove(seq)
        seq.status = SeqStatus.HELD

    def reserve_for_transfer(
        self, seq: Sequence, num_tokens: int, wait: bool = False
    ) -> int | None:
        """Give a new sequence blocks for ``num_tokens`` tokens of KV arriving from elsewhere.

        Its own prefix cache counts: cached blocks are taken, not copied. Returns
        how many leading blocks were cache hits, or None (nothing taken) when the
        pool cannot hold the rest now or the batch has no slot for it (``max_num_seqs``,
        sequences still receiving included). With ``wait``, such a sequence joins
        ``awaiting_room`` (``admit_awaiting`` reserves for it later), and it also waits
        behind sequences already there (see ``_fitting_hits``).
        """
        hits = None if wait and self.awaiting_room else self._fitting_hits(seq, num_tokens, wait)
        if hits is not None:
            return self._take_for_transfer(seq, num_tokens, hits)
        if wait:
            seq.status = SeqStatus.AWAITING_ROOM
            self.awaiting_room.append((seq, num_tokens))
        return None

    def admit_awaiting(self) -> list[tuple[Sequence, int]]:
        """Reserve blocks for the sequences at the head of ``awaiting_room`` while they fit;
        returns each admitted one with its cache hits, first come first served."""
        admitted: list[tuple[Sequence, int]] = []
        while self.awaiting_room:
            seq, num_tokens = self.awaiting_room[0]
            hits = self._fitting_hits(seq, num_tokens, batch_room=True)
            if hits is None:
                break
            self.awaiting_room.popleft()
            admitted.append((seq, self._take_for_transfer(seq, num_tokens, hits)))
        return admitted

    def give_up_awaiting(self, seq: Sequence) -> None:
        """Stop waiting for room to receive ``seq``'s KV: queue it to be prefilled here."""
        self._drop_awaiting(seq)
        seq.status = SeqStatus.WAITING
        self.add(seq)

    def _drop_awaiting(self, seq: Sequence) -> None:
        self.awaiting_room = deque(e for e in self.awaiting_room if e[0] is not seq)

    def _fitting_hits(self, seq: Sequence, num_tokens: int, batch_room: bool) -> list[int] | None:
        """The cached blocks ``seq`` can take if ``num_tokens`` of KV arriving for it fit the
        pool now (idle cached blocks count as free, and taking one uses that room up) and the
        batch has a slot for it (sequences still receiving count: each joins the batch when
        its KV arrives, so ``max_num_seqs`` is never exceeded), else None. With
        ``batch_room`` it must also leave one free block per sequence in the batch, so that
        admitting it does not make the next step preempt one of them to let it grow."""
        if len(self.running) + self.num_receiving >= self.config.max_num_seqs:
            return None
        batch = len(self.running) + self.num_receiving if batch_room else 0
        hits = self._cached_prefix(seq)[: num_tokens // self.block_size]
        idle_hits = sum(1 for b in hits if self.pool.ref_count(b) == 0)
        needed = -(-num_tokens // self.block_size) - len(hits) + idle_hits
        return hits if needed + batch <= self.pool.num_free_blocks else None

    def _take_for_transfer(self, seq: Sequence, num_tokens: int, hits: list[int]) -> int:
        """Give ``seq`` its cached ``hits`` and fresh blocks for the rest; AWAITING_KV."""
        self.pool.acquire(hits)
        seq.block_table = list(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_committed_blocks = len(hits)
        seq.num_cached_tokens = len(hits) * self.block_size
        self._grow(seq, num_tokens - seq.num_computed_tokens)
        seq.status = SeqStatus.AWAITING_KV
        self.num_receiving += 1
        return len(hits)

    def transfer_done(self, seq: Sequence, num_tokens: int, ok: bool) -> None:
        """KV for ``num_tokens`` arrived (join the batch) or failed (recompute locally)."""
        self.num_receiving -= 1
        if ok:
            seq.num_computed_tokens = num_tokens
            if self.config.enable_prefix_caching:
                self._commit_full_blocks(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
        else:
            self._release(seq)
            seq.block_table = []
            seq.num_computed_tokens = 0
            seq.num_committed_blocks = 0
            seq.status = SeqStatus.WAITING
            self.add(seq)

    # ---------------------------------------------------------------- internals
    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        total = -(-(seq.num_computed_tokens + n) // self.block_size)
        return max(0, total - len(seq.block_table))

    def _make_room(self, seq: Sequence, needed: int) -> bool:
        """Preempt the newest running sequences until ``needed`` blocks are free.

        Returns False when ``seq`` itself had to be preempted.
        """
        while needed > self.pool.num_free_blocks:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.reset_for_recompute()
        self._note_cached(seq)  # its full blocks stay cached, free, until evicted
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _grow(self, seq: Sequence, n: int) -> None:
        needed = self._blocks_needed(seq, n)
        if needed:
            after = seq.block_table[-1] if seq.block_table else None
            seq.block_table += self.pool.allocate(
                needed, after=after, reserve=self._reserve(seq, needed)
            )

    def _reserve(self, seq: Sequence, adding: int) -> int:
        expected = -(-seq.max_total_tokens // self.block_size)
        return max(0, expected - len(seq.block_table) - adding)

    def _admit(self, seq: Sequence, budget: int) -> ScheduledChunk | None:
        """Start ``seq``, the head of ``waiting``, with a chunk of at most ``budget`` tokens;
        None (and nothing changed) when the pool cannot hold that chunk now."""
        hits = self._cached_prefix(seq)
        # Cached blocks nobody holds count as free; taking them uses that room up.
        idle_hits = sum(1 for b in hits if self.pool.ref_count(b) == 0)
        computed = len(hits) * self.block_size
        n = min(len(seq.token_ids) - computed, budget)
        total = -(-(computed + n) // self.block_size)
        if total - len(hits) + idle_hits > self.pool.num_free_blocks:
            return None
        # Out of ``waiting`` before it joins ``running``: a failure below must not leave
        # it in both, where failing it would still leave it queued.
        self.waiting.popleft()
        self.pool.acquire(hits)
        seq.block_table = list(hits)
        seq.num_computed_tokens = computed
        seq.num_committed_blocks = len(hits)
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = computed
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        self._grow(seq, n)
        return ScheduledChunk(seq, n)

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        if not self.config.enable_prefix_caching:
            return []
        max_blocks = (len(seq.token_ids) - 1) // self.block_size
        hashes = seq.block_hashes(max_blocks, self.block_size, self.model_id)
        hits: list[int] = []
        for i, h in enumerate(hashes):
            tokens = seq.token_ids[i * self.block_size : (i + 1) * self.block_size]
            block = self.pool.lookup(h, tokens)
            if block is None:
                break
            hits.append(block)
        return hits

    def _commit_full_blocks(self, seq: Sequence) -> None:
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_committed_blocks:
            return
        hashes = seq.block_hashes(full, self.block_size, self.model_id)
        start = seq.num_committed_blocks
        parent = hashes[start - 1] if start else None
        bs = self.block_size
        self.pool.cache_full_blocks(
            parent,
            [
                (seq.block_table[i], hashes[i], seq.token_ids[i * bs : (i + 1) * bs])
                for i in range(start, full)
            ],
        )
        seq.num_committed_blocks = full

    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.pool.release(list(reversed(seq.block_table)))
        seq.block_table = []

"""KV-cache events: which block hashes a worker stores and drops, in order.

A router subscribes to these to keep a global prefix index. Every event carries
a per-worker sequence number that increases by exactly one, so a consumer that
sees a gap knows it missed something and asks for a snapshot instead of
trusting a stale index (the shape follows vLLM's ``kv_events.py``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from services.engine.block_hash import BlockHash


@dataclass(frozen=True)
class BlockStored:
    """Full blocks became reusable prefix-cache entries."""

    seq: int
    parent: BlockHash | None
    """Hash of the block before the first one here; None when it starts a sequence."""
    hashes: tuple[BlockHash, ...]
    """Consecutive chained block hashes, parent first."""
    block_size: int


@dataclass(frozen=True)
class BlockRemoved:
    """Blocks were evicted; their hashes no longer hit on this worker."""

    seq: int
    hashes: tuple[BlockHash, ...]


@dataclass(frozen=True)
class AllBlocksCleared:
    """The worker dropped its whole prefix cache (for example after a restart)."""

    seq: int


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventLog:
    """A bounded, ordered buffer of events with gap-free sequence numbers.

    The engine appends; a publisher drains. When nobody drains, the oldest events
    fall off (the consumer detects the gap through ``seq`` and resyncs), so an
    unsubscribed worker never grows without bound.
    """

    def __init__(self, capacity: int = 65536) -> None:
        self._events: deque[KVEvent] = deque(maxlen=capacity)
        self._next_seq = 0

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def stored(self, parent: BlockHash | None, hashes: list[BlockHash], block_size: int) -> None:
        if hashes:
            self._append(BlockStored(self._take_seq(), parent, tuple(hashes), block_size))

    def removed(self, hashes: list[BlockHash]) -> None:
        if hashes:
            self._append(BlockRemoved(self._take_seq(), tuple(hashes)))

    def cleared(self) -> None:
        self._append(AllBlocksCleared(self._take_seq()))

    def drain(self) -> list[KVEvent]:
        """Remove and return every buffered event, oldest first."""
        events = list(self._events)
        self._events.clear()
        return events

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def _append(self, event: KVEvent) -> None:
        self._events.append(event)

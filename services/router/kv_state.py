"""The router's live KV state: one prefix index per model, fed by workers' event streams.

Each worker streams ``Registry.PublishKVEvents``: a snapshot first, then its
events in seq order (``services.engine.kv_events``). ``RouterKVState.apply``
installs one message of such a stream into the index of the worker's model:

- A snapshot replaces the worker's entries (``KVIndex.replace_worker``).
- Events are converted back to the engine's dataclasses and applied; a gap or
  a seq that went back raises ``NeedsSnapshot``, and the servicer then ends
  the stream with FAILED_PRECONDITION so the worker reconnects with a fresh
  snapshot. Until then its old entries stay (stale advice beats none).
- ``forget(worker_id)`` drops a worker's entries at once. The server calls it
  from the registry's remove listener, which fires on expiry and on a
  re-registration: a restarted worker's cache is empty, so its stale blocks
  must stop attracting requests immediately, not when its first event arrives.

One ``KVIndex`` per model name, because block hashes of different models never
match. Its block size comes from the first worker of that model to publish; the
registry refuses a worker whose block size differs from the live ones', and an
index left with no workers takes the next worker's block size.

``tandem_router_indexed_blocks{worker}`` (a RouterMetrics gauge) counts each
worker's indexed blocks; a forgotten worker's label is removed.

All methods run on the event loop thread; none blocks.
"""

from __future__ import annotations

import contextlib
import logging

from prometheus_client import Gauge

from services.engine.block_hash import BlockHash
from services.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from services.router.kv_index import KVIndex, NeedsSnapshot
from services.router.registry import WorkerState
from services.stubs.tandem.v1 import worker_pb2 as wpb

log = logging.getLogger(__name__)

__all__ = ["NeedsSnapshot", "RouterKVState", "event_from_proto"]


class RouterKVState:
    """Prefix indices by model name, and which model each publishing worker serves."""

    def __init__(self, indexed_blocks: Gauge | None = None) -> None:
        """``indexed_blocks``: a gauge with a ``worker`` label (RouterMetrics.indexed_blocks)."""
        self._indices: dict[str, KVIndex] = {}
        self._model_of: dict[str, str] = {}  # worker id -> model whose index holds it
        self._gauge = indexed_blocks

    def index(self, model: str) -> KVIndex | None:
        """The prefix index of ``model``; None until one of its workers publishes."""
        return self._indices.get(model)

    def indexed_blocks(self, worker_id: str) -> int:
        """How many blocks the index holds for ``worker_id`` (0 when unknown)."""
        model = self._model_of.get(worker_id)
        index = self._indices.get(model) if model is not None else None
        if index is None:
            return 0
        return len(index._keys.get(worker_id, ()))  # KVIndex has no public count

    def apply(self, worker: WorkerState, batch: wpb.KVEventBatch) -> None:
        """Install one stream message of ``worker`` (its snapshot, then its events).

        Raises ``NeedsSnapshot`` on a gap or a seq that went back, and ValueError
        when the worker's block size differs from its model's index.
        """
        try:
            index = self._index_for(worker)
            if batch.HasField("snapshot"):
                snap = batch.snapshot
                if snap.block_size and snap.block_size != index.block_size:
                    raise ValueError(
                        f"worker {worker.worker_id!r} caches blocks of {snap.block_size} "
                        f"tokens; the index of model {worker.model!r} uses {index.block_size}"
                    )
                index.replace_worker(worker.worker_id, snap.block_hashes, snap.next_seq)
            for message in batch.events:
                index.apply(worker.worker_id, event_from_proto(message))
        finally:
            self._update_gauge(worker.worker_id)

    def forget(self, worker_id: str) -> None:
        """Drop every entry of ``worker_id`` (it died, or restarted with an empty cache)."""
        model = self._model_of.pop(worker_id, None)
        index = self._indices.get(model) if model is not None else None
        if index is not None:
            index.remove_worker(worker_id)
            log.info("dropped the KV index entries of worker %s", worker_id)
        if self._gauge is not None:
            with contextlib.suppress(KeyError):  # never published, or forgotten already
                self._gauge.remove(worker_id)

    def on_worker_removed(self, worker: WorkerState) -> None:
        """A WorkerRegistry remove listener (expiry or re-registration)."""
        self.forget(worker.worker_id)

    # --------------------------------------------------------------- internals
    def _index_for(self, worker: WorkerState) -> KVIndex:
        block_size = worker.layout.block_size
        index = self._indices.get(worker.model)
        if index is None or (index.num_workers == 0 and index.block_size != block_size):
            index = self._indices[worker.model] = KVIndex(block_size)
        previous = self._model_of.get(worker.worker_id)
        if previous is not None and previous != worker.model:
            self.forget(worker.worker_id)  # it now serves another model
        self._model_of[worker.worker_id] = worker.model
        return index

    def _update_gauge(self, worker_id: str) -> None:
        if self._gauge is not None and worker_id in self._model_of:
            self._gauge.labels(worker_id).set(self.indexed_blocks(worker_id))


def event_from_proto(message: wpb.KVEvent) -> KVEvent:
    """The engine's event dataclass for one ``KVEvent`` message; ValueError when empty."""
    kind = message.WhichOneof("kind")
    if kind == "stored":
        stored = message.stored
        return BlockStored(
            seq=message.seq,
            parent=BlockHash(stored.parent) if stored.parent else None,
            hashes=tuple(BlockHash(h) for h in stored.block_hashes),
            block_size=stored.block_size,
        )
    if kind == "removed":
        return BlockRemoved(
            seq=message.seq, hashes=tuple(BlockHash(h) for h in message.removed.block_hashes)
        )
    if kind == "cleared":
        return AllBlocksCleared(seq=message.seq)
    raise ValueError(f"KV event {message.seq} has no kind (stored, removed or cleared)")

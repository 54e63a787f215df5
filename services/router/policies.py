"""Placement policies: given the live workers of one pool, pick one for a request.

A policy sees only what the registry knows (registration, reported load, the
router's in-flight counts) and the request's routing facts, including how many
leading blocks of the prompt each worker holds (from the router's prefix
index, fed by the workers' KV events). It is called on the
event loop for every placement, so it must be cheap and must not block. The
orchestrator calls it once per pool (prefill, then decode) per attempt, with
the workers that already failed this request left out.

Adding a policy is one class and one line in POLICIES.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from services.router.registry import PREFILL, WorkerState


@dataclass(frozen=True)
class RoutingRequest:
    """What a policy may know about the request being placed."""

    request_id: str
    model: str
    role: int
    """The pool being picked from: worker_pb2.WORKER_ROLE_PREFILL or WORKER_ROLE_DECODE."""
    prompt_token_ids: tuple[int, ...]
    """The tokens the chosen worker will prefill (prompt, plus tokens already sent on a
    resume)."""
    cached_blocks: Mapping[str, int] = field(default_factory=dict)
    """Worker id → how many leading blocks of ``prompt_token_ids`` it already holds
    (the prefix index's longest_prefix; hashed once at admission). A worker absent
    here holds none; empty when the router has no index for the model."""
    block_size: int = 0
    """Tokens per block of the model's workers (0: unknown, then nothing is cached)."""

    def cached_tokens(self, worker_id: str) -> int:
        """Prompt tokens ``worker_id`` can take from its cache: the blocks it holds, up to
        the last full block before the prompt's last token, which the engine always
        computes (it needs that token's logits). Counting that block too, a prompt of whole
        blocks cost nothing on its holder, and a burst of it all went there."""
        usable = (len(self.prompt_token_ids) - 1) // self.block_size if self.block_size else 0
        return min(self.cached_blocks.get(worker_id, 0), max(usable, 0)) * self.block_size

    def uncached_tokens(self, worker_id: str) -> int:
        """Prompt tokens ``worker_id`` would have to compute: the prompt after its prefix."""
        return len(self.prompt_token_ids) - self.cached_tokens(worker_id)

    def cached_fraction(self, worker_id: str) -> float:
        """The share of the prompt ``worker_id`` holds, in [0, 1]."""
        n = len(self.prompt_token_ids)
        return self.cached_tokens(worker_id) / n if n else 0.0


def prefill_work(worker: WorkerState, request: RoutingRequest) -> int:
    """Prompt tokens ``worker`` computes before ``request``'s first token: its uncached part,
    the prefill the worker reports queued, and the router's prefills in flight to it (on a
    decode worker: its local prefills whose first token has not arrived)."""
    return (
        request.uncached_tokens(worker.worker_id)
        + worker.load.queued_prefill_tokens
        + worker.in_flight_prefill_tokens
    )


class Policy(ABC):
    """Picks one worker from a non-empty list of candidates."""

    name: str
    prefix_aware: bool = False
    """Whether the policy routes by cached prefix. Only then does the orchestrator
    skip the prefill pool for short or already-cached prompts (conditional
    disaggregation); the others always disaggregate, as the baselines."""

    @abstractmethod
    def pick(self, candidates: Sequence[WorkerState], request: RoutingRequest) -> WorkerState:
        """Return one of ``candidates`` (non-empty, ordered by worker id).

        May update the policy's own state (a rotation); never changes the workers.
        Raises ValueError when ``candidates`` is empty.
        """


# Round-robin
#   Rule: per (model, pool), take the first candidate whose id sorts after the id
#   picked last time, wrapping around. Keyed on ids rather than on a position, a
#   worker joining or leaving (or one excluded after a failure) does not make the
#   rotation skip or repeat the others.
#   Parameters: none. Ignores load: the baseline the other policies are measured against.
class RoundRobin(Policy):
    name = "round-robin"

    def __init__(self, seed: int = 0) -> None:
        del seed  # deterministic; the parameter keeps every policy constructible alike
        self._last: dict[tuple[str, int], str] = {}

    def pick(self, candidates: Sequence[WorkerState], request: RoutingRequest) -> WorkerState:
        _require(candidates)
        key = (request.model, request.role)
        last = self._last.get(key)
        chosen = next((w for w in candidates if last is None or w.worker_id > last), None)
        chosen = chosen or candidates[0]
        self._last[key] = chosen.worker_id
        return chosen


# Least-loaded
#   Rule: pick the candidate with the smallest load =
#       in_flight (router's own count, exact and immediate)
#     + running + waiting (the worker's last heartbeat, up to one interval old).
#   The two overlap for requests already reported; counting both errs towards
#   spreading while reports lag, which is the failure to avoid (piling onto one
#   worker between heartbeats).
#   Ties: broken uniformly at random by a seeded random.Random, so equal workers
#   share the load and runs are reproducible.
#   Parameters: seed (tie-breaking).
class LeastLoaded(Policy):
    name = "least-loaded"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def pick(self, candidates: Sequence[WorkerState], request: RoutingRequest) -> WorkerState:
        _require(candidates)
        lowest = min(load_of(w) for w in candidates)
        tied = [w for w in candidates if load_of(w) == lowest]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


def load_of(worker: WorkerState) -> int:
    """Least-loaded's measure: router in-flight + reported running + reported waiting."""
    return worker.in_flight + worker.load.running + worker.load.waiting


# KV-aware (the default)
#   Rule: pick the candidate of least estimated cost; the cost depends on the pool.
#   Prefill pool, in prompt tokens of work ahead of this request's first token:
#       prefill_cost = uncached          prompt_len − cached_blocks × block_size, the
#                                        part of the prompt its prefix cache lacks
#                    + queued            load.queued_prefill_tokens (last heartbeat)
#                    + in_flight_tokens  worker.in_flight_prefill_tokens: the uncached
#                                        tokens of the Prefill calls the router sent
#                                        it and has not yet seen answered
#     Heartbeats and KV events lag; the router's own count does not, so a burst of
#     requests arriving between two heartbeats spreads instead of piling onto the
#     worker with the longest prefix. A request already in the queue is counted
#     twice (queued and in flight) until it is answered; as in least-loaded, that
#     errs towards spreading. A cached prefix wins exactly when the tokens it saves
#     exceed the extra queue in front of it.
#   The same sum (policies.prefill_work) is a decode worker's prefill work ahead, which
#   the orchestrator's local-prefill rule compares with the least busy prefill worker's.
#   There, queued is the engine's uncomputed prompt tokens: waiting prompts past their
#   cached prefix and the rest of running prefills, so local prefills only (KV read from
#   a prefill worker is not computed; a failed read's fallback prefill shows only here).
#   in_flight_tokens is the uncached tokens of the Decode calls the router sent without
#   KV, from the placement until the stream's first token (or its end on any other path:
#   error, cancel, retry elsewhere). The two overlap only while a local prefill is both
#   unfinished and already in a heartbeat: the router's part ends at the first token, the
#   worker's at its next heartbeat after the prefill, so neither outlives the prefill by
#   more than one interval, and both pools double count alike, keeping the comparison
#   fair. Counting the router's part until the stream ended instead would have charged
#   every decoding request as prefill and kept a decode worker with long generations
#   looking busy for as long as they ran; counting only the heartbeat let a burst within
#   one interval all go local to one decode worker.
#   Decode pool, in running sequences:
#       decode_cost = in_flight + running + waiting        as least-loaded counts them
#                   + occupancy_weight × (1 − free_blocks / total_blocks)
#                   − overlap_weight × cached_fraction
#     where cached_fraction = cached_blocks × block_size / prompt_len ∈ [0, 1] is the
#     share of the prompt the worker already holds (it then reads fewer blocks from
#     the prefill worker, or prefills locally: see conditional disaggregation in the
#     orchestrator). The occupancy term is 0 before the first heartbeat
#     (total_blocks 0).
#   Ties: broken uniformly at random by a seeded random.Random (equal workers share
#   the load; runs are reproducible).
#   Parameters:
#     seed              tie-breaking (RouterConfig.policy_seed).
#     overlap_weight    1.0: holding the whole prompt is worth one running sequence
#                       less; enough to break a tie towards the cache, never enough to
#                       pile a second sequence onto a busier worker for it.
#     occupancy_weight  1.0: a full KV cache counts as one more running sequence, so
#                       among equally busy workers the one with room is chosen.
#     block_size        from the request (the model's workers' KVLayout.block_size).
#   Without a prefix index every cached_blocks is 0: prefill then reduces to the
#   least queued work and decode to least-loaded with the occupancy term.
class KVAware(Policy):
    name = "kv-aware"
    prefix_aware = True

    def __init__(
        self, seed: int = 0, overlap_weight: float = 1.0, occupancy_weight: float = 1.0
    ) -> None:
        self._rng = random.Random(seed)
        self.overlap_weight = overlap_weight
        self.occupancy_weight = occupancy_weight

    def pick(self, candidates: Sequence[WorkerState], request: RoutingRequest) -> WorkerState:
        _require(candidates)
        cost = self.prefill_cost if request.role == PREFILL else self.decode_cost
        costs = [cost(w, request) for w in candidates]
        lowest = min(costs)
        tied = [w for w, c in zip(candidates, costs, strict=True) if c == lowest]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)

    def prefill_cost(self, worker: WorkerState, request: RoutingRequest) -> float:
        """Prompt tokens of work ahead of the request's first token on ``worker``."""
        return prefill_work(worker, request)

    def decode_cost(self, worker: WorkerState, request: RoutingRequest) -> float:
        """Load in running sequences, plus fullness, minus credit for the held prefix."""
        load = worker.load
        used = 1.0 - load.free_blocks / load.total_blocks if load.total_blocks else 0.0
        return (
            load_of(worker)
            + self.occupancy_weight * used
            - self.overlap_weight * request.cached_fraction(worker.worker_id)
        )


POLICIES: dict[str, Callable[[int], Policy]] = {
    RoundRobin.name: RoundRobin,
    LeastLoaded.name: LeastLoaded,
    KVAware.name: KVAware,
}
"""Policy name (the --policy flag) → constructor taking the tie-breaking seed."""


def make_policy(name: str, seed: int = 0) -> Policy:
    """The policy called ``name``; ValueError listing the known names otherwise."""
    factory = POLICIES.get(name)
    if factory is None:
        known = ", ".join(sorted(POLICIES))
        raise ValueError(f"unknown routing policy {name!r}; choose one of: {known}")
    return factory(seed)


def _require(candidates: Sequence[WorkerState]) -> None:
    if not candidates:
        raise ValueError("a policy needs at least one candidate worker")

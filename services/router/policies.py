"""Placement policies: given the live workers of one pool, pick one for a request.

A policy sees only what the registry knows (registration, reported load, the
router's in-flight count) and the request's routing facts. It is called on the
event loop for every placement, so it must be cheap and must not block. The
orchestrator calls it once per pool (prefill, then decode) per attempt, with
the workers that already failed this request left out.

Adding a policy is one class and one line in POLICIES.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.router.registry import WorkerState


@dataclass(frozen=True)
class RoutingRequest:
    """What a policy may know about the request being placed."""

    request_id: str
    model: str
    role: int
    """The pool being picked from: worker_pb2.WORKER_ROLE_PREFILL or WORKER_ROLE_DECODE."""
    prompt_token_ids: tuple[int, ...]
    """The tokens the chosen worker will prefill (prompt, plus tokens already sent on a
    resume); a KV-aware policy hashes them into blocks."""


class Policy(ABC):
    """Picks one worker from a non-empty list of candidates."""

    name: str

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


POLICIES: dict[str, Callable[[int], Policy]] = {
    RoundRobin.name: RoundRobin,
    LeastLoaded.name: LeastLoaded,
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

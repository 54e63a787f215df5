"""Placement policies: exact round-robin order, least-loaded choice and tie-breaking."""

from __future__ import annotations

from collections import Counter

import pytest

from services.router.policies import (
    POLICIES,
    LeastLoaded,
    RoundRobin,
    RoutingRequest,
    load_of,
    make_policy,
)
from services.router.registry import DECODE, PREFILL, WorkerState
from services.stubs.tandem.v1 import worker_pb2


def worker(
    worker_id: str, *, in_flight: int = 0, running: int = 0, waiting: int = 0
) -> WorkerState:
    return WorkerState(
        worker_id=worker_id,
        role=DECODE,
        address="127.0.0.1:1",
        model="m",
        layout=worker_pb2.KVLayout(block_size=16, model_id="m"),
        max_context_length=512,
        vocab_size=4096,
        last_heartbeat=0.0,
        load=worker_pb2.WorkerLoad(running=running, waiting=waiting),
        in_flight=in_flight,
    )


def routing(role: int = DECODE, model: str = "m") -> RoutingRequest:
    return RoutingRequest(request_id="r", model=model, role=role, prompt_token_ids=(1, 2))


def test_round_robin_rotates_in_id_order() -> None:
    policy = RoundRobin()
    pool = [worker("a"), worker("b"), worker("c")]
    picks = [policy.pick(pool, routing()).worker_id for _ in range(7)]
    assert picks == ["a", "b", "c", "a", "b", "c", "a"]


def test_round_robin_keeps_one_rotation_per_pool() -> None:
    policy = RoundRobin()
    pool = [worker("a"), worker("b")]
    assert policy.pick(pool, routing(DECODE)).worker_id == "a"
    assert policy.pick(pool, routing(PREFILL)).worker_id == "a"
    assert policy.pick(pool, routing(DECODE, model="other")).worker_id == "a"
    assert policy.pick(pool, routing(DECODE)).worker_id == "b"


def test_round_robin_neither_skips_nor_repeats_when_membership_changes() -> None:
    policy = RoundRobin()
    a, b, c, d = worker("a"), worker("b"), worker("c"), worker("d")
    assert policy.pick([a, b, c], routing()).worker_id == "a"
    assert policy.pick([a, c], routing()).worker_id == "c"  # b left: next after a
    assert policy.pick([a, b, c, d], routing()).worker_id == "d"  # d joined after c
    assert policy.pick([a, b, c, d], routing()).worker_id == "a"


def test_least_loaded_counts_in_flight_running_and_waiting() -> None:
    policy = LeastLoaded()
    busy = worker("a", in_flight=1, running=2, waiting=1)
    queued = worker("b", waiting=3)
    idle_but_dispatched = worker("c", in_flight=2)
    assert [load_of(w) for w in (busy, queued, idle_but_dispatched)] == [4, 3, 2]
    assert policy.pick([busy, queued, idle_but_dispatched], routing()).worker_id == "c"
    idle_but_dispatched.in_flight = 5
    assert policy.pick([busy, queued, idle_but_dispatched], routing()).worker_id == "b"


def test_least_loaded_breaks_ties_at_random_reproducibly() -> None:
    pool = [worker("a"), worker("b"), worker("c", running=1)]
    first = [LeastLoaded(seed=7).pick(pool, routing()).worker_id for _ in range(200)]
    policy_a, policy_b = LeastLoaded(seed=7), LeastLoaded(seed=7)
    seq_a = [policy_a.pick(pool, routing()).worker_id for _ in range(200)]
    seq_b = [policy_b.pick(pool, routing()).worker_id for _ in range(200)]
    assert seq_a == seq_b  # same seed, same choices
    assert len(set(first)) == 1  # a fresh policy with that seed always starts alike
    counts = Counter(seq_a)
    assert set(counts) == {"a", "b"} and min(counts.values()) > 60  # c is busier: never


def test_make_policy_knows_every_registered_name_and_refuses_others() -> None:
    assert isinstance(make_policy("round-robin"), RoundRobin)
    assert isinstance(make_policy("least-loaded", seed=3), LeastLoaded)
    assert set(POLICIES) == {"round-robin", "least-loaded", "kv-aware"}
    with pytest.raises(ValueError, match=r"'kv-magic'.*kv-aware, least-loaded, round-robin"):
        make_policy("kv-magic")


def test_a_policy_needs_candidates() -> None:
    with pytest.raises(ValueError, match="at least one candidate"):
        RoundRobin().pick([], routing())

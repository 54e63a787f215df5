"""Breaker: skip a store for a cool-down after it fails, then let one call probe it."""

from __future__ import annotations

import pytest

from services.gateway.breaker import Breaker


class Clock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


def test_a_failure_skips_the_store_for_the_cool_down_then_one_call_probes() -> None:
    clock = Clock()
    breaker = Breaker(2.0, clock=clock)
    assert [breaker.allow() for _ in range(3)] == [True, True, True] and not breaker.is_open
    breaker.record(False)
    clock.t += 1.999
    assert breaker.allow() is False and breaker.is_open
    clock.t += 0.001
    assert [breaker.allow() for _ in range(3)] == [True, False, False]  # one probe
    breaker.record(True)
    assert breaker.allow() and breaker.allow() and not breaker.is_open


def test_a_failed_probe_opens_it_again_and_a_lost_one_costs_one_cool_down() -> None:
    clock = Clock()
    breaker = Breaker(1.0, clock=clock)
    breaker.record(False)
    clock.t += 1.0
    assert breaker.allow()
    breaker.record(False)  # the probe failed: another full cool-down from now
    clock.t += 0.5
    assert not breaker.allow()
    clock.t += 0.5
    assert breaker.allow()  # probe; it never reports back (its caller died, say)
    clock.t += 0.99
    assert not breaker.allow()
    clock.t += 0.01
    assert breaker.allow()  # the next call probes in its place


def test_a_zero_cool_down_always_tries_and_a_negative_one_is_refused() -> None:
    breaker = Breaker(0.0)
    breaker.record(False)
    assert breaker.allow() and breaker.allow()
    with pytest.raises(ValueError, match="cooldown_s"):
        Breaker(-1.0)

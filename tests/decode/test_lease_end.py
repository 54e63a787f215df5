"""_lease_end: how long a decode worker may take to read a prefill's blocks."""

from __future__ import annotations

import math

from services.decode.service import LEASE_MARGIN_S, _lease_end
from services.stubs.tandem.v1 import worker_pb2 as wpb


def test_a_long_lease_keeps_the_fixed_margin() -> None:
    assert _lease_end(wpb.KVHandle(lease_ms=30_000), 100.0) == 100.0 + 30.0 - LEASE_MARGIN_S


def test_a_short_lease_keeps_a_quarter_of_itself() -> None:
    assert _lease_end(wpb.KVHandle(lease_ms=1_000), 100.0) == 100.75


def test_a_handle_without_a_lease_sets_no_bound() -> None:
    assert math.isinf(_lease_end(wpb.KVHandle(), 100.0))

"""A decode worker does not wait past its KV timeout for the prefill's answer to the
release after a read (a prefill worker answers ReleaseKV between engine steps, so late
when a step is long). Before, it waited the release's own 5 s: with kv_timeout_ms=500 a
request started decoding 5.07 s after it arrived. Unanswered by the deadline, the read is
not trusted (the blocks may have been reused): the prompt is prefilled locally."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from tests.decode.helpers import (
    DECODE,
    MAX_TOKENS,
    PREFILL,
    PROMPT,
    decode,
    prefill,
    slow_release,
    until_idle,
)
from tests.router.harness import run
from tests.router.inprocess import reference_tokens, worker

KV_TIMEOUT_MS = 300
RELEASE_DELAY_S = 1.5


def test_a_slow_release_answer_does_not_hold_the_request_past_its_kv_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The read is dropped for a local prefill (the reference's tokens, no transfer
    reported), the stream ends well before the release answers, and the release still
    lands: both pools idle."""
    expected = reference_tokens(PROMPT, MAX_TOKENS)
    slow_release(monkeypatch, RELEASE_DELAY_S)

    async def body() -> None:
        async with (
            worker(PREFILL, "p0", kv_transport="grpc") as p,
            worker(DECODE, "d0", kv_transport="grpc") as d,
        ):
            first = await prefill(p, "p")
            start = time.monotonic()
            stream = await decode(d, "d", first, kv_timeout_ms=KV_TIMEOUT_MS)
            took = time.monotonic() - start
            assert stream.code == grpc.StatusCode.OK, stream.details
            assert [first.first_token_id, *stream.tokens] == expected
            serving = stream.messages[-1].serving
            assert (serving.kv_transfer_bytes, serving.kv_transport) == (0, "")  # not trusted
            assert took < RELEASE_DELAY_S - 0.5, took
            await asyncio.sleep(RELEASE_DELAY_S - took)
            await until_idle(p, d)

    run(body(), timeout=60)


def test_the_transfer_time_is_the_read_and_the_release_wait_is_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tandem_kv_transfer_seconds timed the read and the wait for the release's answer
    together: on a busy prefill worker, 99 % of it was that wait (a review helper's
    cluster: 689 ms mean for a ~10 ms read)."""
    delay_s = 0.6
    slow_release(monkeypatch, delay_s)

    async def body() -> None:
        async with (
            worker(PREFILL, "p0", kv_transport="grpc") as p,
            worker(DECODE, "d0", kv_transport="grpc") as d,
        ):
            first = await prefill(p, "p")
            stream = await decode(d, "d", first, kv_timeout_ms=10_000)
            assert stream.messages[-1].serving.kv_transfer_bytes > 0  # read and trusted
            sample = d.metrics.registry.get_sample_value
            assert sample("tandem_kv_transfer_seconds_count") == 1
            assert sample("tandem_kv_transfer_seconds_sum") < delay_s / 2
            assert sample("tandem_kv_release_seconds_sum") >= delay_s
            await until_idle(p, d)

    run(body(), timeout=60)

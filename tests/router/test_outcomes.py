"""tandem_requests_finished_total's outcome when a request ends by raising: the client's own
deadline or cancel is "cancelled" whichever side noticed it first, anything else "failed"."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.router.errors import RouteError
from services.router.metrics import RouterMetrics
from services.stubs.tandem.v1 import inference_pb2 as pb


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        # the worker call's timeout (the client's time left) fired before gRPC cancelled us
        (grpc.StatusCode.DEADLINE_EXCEEDED, "cancelled"),
        (grpc.StatusCode.CANCELLED, "cancelled"),
        (grpc.StatusCode.UNAVAILABLE, "failed"),
    ],
)
def test_a_raised_status_picks_the_outcome(code: grpc.StatusCode, outcome: str) -> None:
    metrics = RouterMetrics()

    async def generate():
        yield pb.GenerateResponse(token_ids=[5])
        raise RouteError(code, "ended")

    async def body() -> None:
        with pytest.raises(RouteError):
            async for _ in metrics.observe(generate()):
                pass

    asyncio.run(body())
    count = metrics.registry.get_sample_value
    assert count("tandem_requests_finished_total", {"outcome": outcome}) == 1
    other = "failed" if outcome == "cancelled" else "cancelled"
    assert count("tandem_requests_finished_total", {"outcome": other}) is None


def test_a_message_whose_write_was_cut_is_not_counted_as_streamed() -> None:
    """The handler is resumed after each write; closed instead (the client left during the
    final message's write), that message's tokens and finish reason were never delivered:
    counted before the write, they were."""
    metrics = RouterMetrics()

    async def generate():
        yield pb.GenerateResponse(token_ids=[5, 6])
        yield pb.GenerateResponse(token_ids=[7], finish_reason=pb.FINISH_REASON_LENGTH)

    async def body() -> None:
        observed = metrics.observe(generate())
        await anext(observed)
        await anext(observed)  # the final message, handed to gRPC to write...
        await observed.aclose()  # ...and the call cancelled before the write completed

    asyncio.run(body())
    count = metrics.registry.get_sample_value
    assert count("tandem_completion_tokens_total", {}) == 2
    assert count("tandem_requests_finished_total", {"outcome": "cancelled"}) == 1
    assert count("tandem_requests_finished_total", {"outcome": "length"}) is None

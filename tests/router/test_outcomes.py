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

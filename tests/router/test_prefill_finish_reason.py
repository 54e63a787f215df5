"""A prefill that ends the request must say STOP or LENGTH; other reasons are failures.

A prefill worker that answers OK with FINISH_REASON_ERROR or CANCELLED has no first token
to give (its first_token_id is a placeholder 0). The router must not send that token to the
client as a finished request: ERROR ends the request with INTERNAL, as a Decode stream's
ERROR does; CANCELLED (the worker aborted it, shutting down) moves it to another worker.
"""

from __future__ import annotations

import grpc

from services.router.config import RouterConfig
from services.stubs.tandem.v1 import inference_pb2, worker_pb2
from tests.router.fakes import expected_completion
from tests.router.harness import DECODE, PREFILL, run
from tests.router.harness import cluster as start_cluster
from tests.router.scripted_prefill import Edit, add_scripted_prefill

PROMPT = [11, 12, 13]
ROUND_ROBIN = RouterConfig(
    policy="round-robin", heartbeat_interval_s=0.1, heartbeat_timeout_s=2, prefill_timeout_s=5
)
"""Prefill workers are picked in id order: the scripted p1 first."""


def _ending(reason: int) -> Edit:
    async def edit(reply: worker_pb2.PrefillResponse) -> None:
        reply.Clear()  # what a prefill whose request ended without a token answers
        reply.finish_reason = reason

    return edit


def test_a_prefill_answering_error_ends_the_request_with_internal_and_no_token() -> None:
    async def body() -> None:
        async with start_cluster(ROUND_ROBIN) as c:
            await add_scripted_prefill(c, "p1", _ending(inference_pb2.FINISH_REASON_ERROR))
            await c.add("d1", DECODE)
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=4)

            assert result.code == grpc.StatusCode.INTERNAL
            assert result.details == (
                "prefill worker 'p1' failed the request (FINISH_REASON_ERROR)"
            )
            assert result.messages == []
            assert c.workers["d1"].calls == []

    run(body())


def test_a_prefill_answering_cancelled_is_retried_on_another_prefill_worker() -> None:
    async def body() -> None:
        async with start_cluster(ROUND_ROBIN) as c:
            aborted = await add_scripted_prefill(
                c, "p1", _ending(inference_pb2.FINISH_REASON_CANCELLED)
            )
            healthy = await c.add("p2", PREFILL)
            await c.add("d1", DECODE)
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=4)

            assert result.code == grpc.StatusCode.OK, result.details
            assert result.tokens == expected_completion(len(PROMPT), 4)
            assert len(aborted.calls) == 1 and len(healthy.calls) == 1
            assert result.final.serving.prefill_worker == "p2"
            assert result.final.serving.retries == 1
            assert result.final.usage.completion_tokens == 4

    run(body())

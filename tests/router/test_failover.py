"""Worker failures: retries, resumes mid-stream, and when the router gives up."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter

import grpc
import pytest

from services.router.config import RouterConfig
from services.router.errors import RouteError
from services.stubs.tandem.v1 import inference_pb2
from tests.router.fakes import MODEL, Behaviour, FakeWorker, expected_completion, token_text
from tests.router.harness import DECODE, PREFILL, Cluster, Result, cluster, run

PROMPT = [11, 12, 13]
ROUND_ROBIN = RouterConfig(
    policy="round-robin",
    heartbeat_interval_s=0.1,
    heartbeat_timeout_s=2,
    prefill_timeout_s=5,
    decode_wait_s=0.3,
)
"""Workers are picked in id order (p1 before p2, d1 before d2): the failing one first. A
stream left without a decode worker waits 0.3 s for one."""


def _assert_each_token_once(tokens: list[int], expected: list[int]) -> None:
    assert tokens == expected
    assert max(Counter(tokens).values()) == 1


def test_prefill_unavailable_is_retried_on_another_prefill_worker() -> None:
    async def body() -> None:
        async with cluster(ROUND_ROBIN) as c:
            broken = await c.add("p1", PREFILL, Behaviour(fail_code=grpc.StatusCode.UNAVAILABLE))
            healthy = await c.add("p2", PREFILL)
            await c.add("d1", DECODE)
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=4)

            _assert_each_token_once(result.tokens, expected_completion(len(PROMPT), 4))
            assert len(broken.calls) == 1 and len(healthy.calls) == 1
            assert list(healthy.calls[0].request.prompt_token_ids) == PROMPT
            assert result.final.serving.prefill_worker == "p2"
            assert result.final.serving.retries == 1

    run(body())


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_a_worker_that_does_not_serve_the_model_is_passed_over(role: str) -> None:
    """NOT_FOUND from a worker's Prefill/Decode: another worker listens at a stale
    registration's address. It was relayed to the client (naming the worker's model, and
    counted against the caller's request rate by the gateway as the caller's mistake)."""

    async def body() -> None:
        async with cluster(ROUND_ROBIN) as c:
            wrong = Behaviour(fail_code=grpc.StatusCode.NOT_FOUND)
            kind = PREFILL if role == "prefill" else DECODE
            other = DECODE if role == "prefill" else PREFILL
            broken = await c.add(f"{role[0]}1", kind, wrong)
            await c.add(f"{role[0]}2", kind)
            await c.add(f"{'d' if role == 'prefill' else 'p'}1", other)
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=4)
            _assert_each_token_once(result.tokens, expected_completion(len(PROMPT), 4))
            assert len(broken.calls) == 1 and result.final.serving.retries == 1

    run(body())


def test_hung_prefill_times_out_and_is_retried_elsewhere() -> None:
    config = RouterConfig(
        policy="round-robin", heartbeat_interval_s=0.1, heartbeat_timeout_s=5, prefill_timeout_s=0.3
    )

    async def body() -> None:
        async with cluster(config) as c:
            hung = await c.add("p1", PREFILL, Behaviour(hang_after=0))
            await c.add("p2", PREFILL)
            await c.add("d1", DECODE)
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=3)

            _assert_each_token_once(result.tokens, expected_completion(len(PROMPT), 3))
            assert result.final.serving.prefill_worker == "p2"
            assert result.final.serving.retries == 1
            await asyncio.wait_for(hung.cancelled.wait(), 2)  # the hung call was abandoned
            # ... and whatever it may have pinned as it gave up is released by attempt id
            attempt = hung.calls[0].request.request_id
            await _until(lambda: hung.released == [attempt])

    run(body())


def test_decode_death_mid_stream_resumes_on_another_decode_worker() -> None:
    async def body() -> None:
        async with cluster(ROUND_ROBIN) as c:
            p1 = await c.add("p1", PREFILL)
            d1 = await c.add("d1", DECODE, Behaviour(die_after=2))
            d2 = await c.add("d2", DECODE)
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=8, min_tokens=6)
            assert len(d1.calls) == 1

            expected = expected_completion(len(PROMPT), 8)
            _assert_each_token_once(result.tokens, expected)
            assert result.code == grpc.StatusCode.OK
            assert result.text == "".join(token_text(t) for t in expected)
            # Client saw: prefill token, 2 tokens from d1, then (resumed) a new prefill
            # token and d2's tokens. Sent before the failure: 3 tokens.
            sent = expected[:3]
            assert len(p1.calls) == 2
            resumed_prefill = p1.calls[1].request
            assert list(resumed_prefill.prompt_token_ids) == PROMPT + sent
            assert resumed_prefill.max_tokens == 8 - 3
            assert resumed_prefill.min_tokens == 6 - 3
            (resumed_decode,) = d2.calls
            assert list(resumed_decode.request.prompt_token_ids) == PROMPT + sent
            assert resumed_decode.first_token_id == expected[3]
            final = result.final
            assert final.usage.prompt_tokens == len(PROMPT)
            assert final.usage.completion_tokens == 8
            assert final.serving.decode_worker == "d2"
            assert final.serving.retries == 1
            # Each prefill's KV released once, by the decode worker it went to: d1 released
            # the first before its tokens, so the router sends no second ReleaseKV for it
            # after d1 died (it did: a NOT_FOUND and an ERROR span per resumed request).
            attempts = [call.request.request_id for call in p1.calls]
            await _until(lambda: sorted(p1.released) == sorted(attempts))
            await asyncio.sleep(0.2)
            assert sorted(p1.released) == sorted(attempts)

    run(body())


def test_aggregated_decode_death_resumes_over_prompt_plus_sent_tokens() -> None:
    async def body() -> None:
        async with cluster(ROUND_ROBIN) as c:
            await c.add("d1", DECODE, Behaviour(die_after=3))
            d2 = await c.add("d2", DECODE)
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=5)
            assert len(c.workers["d1"].calls) == 1

            _assert_each_token_once(result.tokens, expected_completion(len(PROMPT), 5))
            sent = expected_completion(len(PROMPT), 3)
            (resumed,) = d2.calls
            assert list(resumed.request.prompt_token_ids) == PROMPT + sent
            assert resumed.request.max_tokens == 2
            assert not resumed.HasField("kv") and not resumed.HasField("first_token_id")
            assert result.final.usage.completion_tokens == 5
            assert result.final.usage.prompt_tokens == len(PROMPT)

    run(body())


def test_death_after_the_last_token_ends_the_request_without_a_resume() -> None:
    async def body() -> None:
        async with cluster(ROUND_ROBIN) as c:
            p1 = await c.add("p1", PREFILL)
            await c.add("d1", DECODE, Behaviour(die_after=2))
            d2 = await c.add("d2", DECODE)
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=3)

            _assert_each_token_once(result.tokens, expected_completion(len(PROMPT), 3))
            assert result.final.finish_reason == inference_pb2.FINISH_REASON_LENGTH
            assert result.final.usage.completion_tokens == 3
            assert len(p1.calls) == 1 and d2.calls == []

    run(body())


def test_decode_that_aborts_while_shutting_down_is_resumed() -> None:
    async def body() -> None:
        async with cluster(ROUND_ROBIN) as c:
            await c.add("d1", DECODE, Behaviour(cancel_after=1))
            await c.add("d2", DECODE)
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=4)
            assert len(c.workers["d1"].calls) == 1
            _assert_each_token_once(result.tokens, expected_completion(len(PROMPT), 4))
            assert result.final.finish_reason == inference_pb2.FINISH_REASON_LENGTH
            assert result.final.serving.retries == 1

    run(body())


def test_silent_decode_worker_is_removed_and_its_request_resumes() -> None:
    config = RouterConfig(policy="round-robin", heartbeat_interval_s=0.1, heartbeat_timeout_s=0.5)

    async def body() -> None:
        async with cluster(config) as c:
            hung = await c.add("d1", DECODE, Behaviour(hang_after=2))
            await c.add("d2", DECODE)
            task = asyncio.create_task(c.generate(prompt_token_ids=PROMPT, max_tokens=6))
            await asyncio.wait_for(hung.hanging.wait(), 5)
            await hung.stop_heartbeats()  # a stuck process: alive socket, no heartbeats
            result = await task

            _assert_each_token_once(result.tokens, expected_completion(len(PROMPT), 6))
            assert result.final.serving.decode_worker == "d2"
            assert c.router.registry.get("d1") is None
            await asyncio.wait_for(hung.cancelled.wait(), 2)

    run(body())


def test_every_decode_worker_dying_ends_with_error_message_and_unavailable() -> None:
    async def body() -> None:
        async with cluster(ROUND_ROBIN) as c:
            await c.add("p1", PREFILL)
            await c.add("d1", DECODE, Behaviour(die_after=1))
            await c.add("d2", DECODE, Behaviour(die_after=1))
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=8)

            assert result.code == grpc.StatusCode.UNAVAILABLE
            assert "no decode worker left" in result.details
            assert "d1" in result.details and "d2" in result.details
            assert result.details.endswith("; waited 0.3 s for one")
            expected = expected_completion(len(PROMPT), 8)
            # prefill, d?, prefill again, the other d?: 4 tokens, each once, then one
            # final ERROR message counting them.
            _assert_each_token_once(result.tokens, expected[:4])
            final = result.final
            assert final.finish_reason == inference_pb2.FINISH_REASON_ERROR
            assert final.usage.completion_tokens == 4
            assert final.usage.prompt_tokens == len(PROMPT)
            assert final.serving.retries == 1  # d1 → d2; d2's failure found nobody to move to

    run(body())


def test_retries_are_bounded() -> None:
    config = RouterConfig(
        policy="round-robin", heartbeat_interval_s=0.1, heartbeat_timeout_s=2, max_retries=1
    )

    async def body() -> None:
        async with cluster(config) as c:
            for i in range(3):
                await c.add(f"p{i}", PREFILL, Behaviour(fail_code=grpc.StatusCode.UNAVAILABLE))
            await c.add("d1", DECODE)
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=2)

            assert result.code == grpc.StatusCode.UNAVAILABLE
            assert "gave up after 1 retries" in result.details
            assert result.messages == []
            assert sum(len(w.calls) for w in c.workers.values()) == 2

    run(body())


def test_a_request_that_gives_up_reports_the_retries_it_made() -> None:
    """max_retries=1 and three dying decode workers: one move (d? → d?), then the second
    failure gives up. ServingInfo.retries says 1, the moves made (it said 2: failures)."""
    config = RouterConfig(
        policy="round-robin", heartbeat_interval_s=0.1, heartbeat_timeout_s=2, max_retries=1
    )

    async def body() -> None:
        async with cluster(config) as c:
            await c.add("p1", PREFILL)
            for i in range(3):
                await c.add(f"d{i}", DECODE, Behaviour(die_after=1))
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=8)

            assert result.code == grpc.StatusCode.UNAVAILABLE
            assert "gave up after 1 retries" in result.details
            assert result.final.finish_reason == inference_pb2.FINISH_REASON_ERROR
            assert result.final.serving.retries == 1

    run(body())


def test_every_prefill_worker_failing_falls_back_to_local_prefill() -> None:
    async def body() -> None:
        async with cluster(ROUND_ROBIN) as c:
            await c.add("p1", PREFILL, Behaviour(fail_code=grpc.StatusCode.UNAVAILABLE))
            decode = await c.add("d1", DECODE)
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=3)

            _assert_each_token_once(result.tokens, expected_completion(len(PROMPT), 3))
            assert not decode.calls[0].HasField("kv")
            assert result.final.serving.prefill_worker == ""
            assert result.final.serving.retries == 1

    run(body())


def test_request_errors_from_a_worker_are_passed_through_not_retried() -> None:
    async def body() -> None:
        async with cluster(ROUND_ROBIN) as c:
            failing = Behaviour(fail_code=grpc.StatusCode.RESOURCE_EXHAUSTED)
            p1 = await c.add("p1", PREFILL, failing)
            p2 = await c.add("p2", PREFILL, failing)
            await c.add("d1", DECODE)
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=2)

            assert result.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "scripted failure" in result.details
            assert len(p1.calls) + len(p2.calls) == 1
            assert result.messages == []

    run(body())


def test_decode_worker_process_stopping_mid_stream_is_resumed() -> None:
    async def body() -> None:
        async with cluster(ROUND_ROBIN) as c:
            await c.add("p1", PREFILL)
            d1 = await c.add("d1", DECODE, Behaviour(hang_after=2))
            await c.add("d2", DECODE)
            task = asyncio.create_task(c.generate(prompt_token_ids=PROMPT, max_tokens=6))
            await asyncio.wait_for(d1.hanging.wait(), 5)  # d1 sent its 2 tokens
            await d1.stop()  # the server goes away, heartbeats with it
            result = await task

            _assert_each_token_once(result.tokens, expected_completion(len(PROMPT), 6))
            assert result.final.serving.decode_worker == "d2"
            assert result.final.serving.retries == 1

    run(body())


def test_request_errors_after_messages_end_with_an_error_message_and_internal() -> None:
    async def body() -> None:
        async with cluster(ROUND_ROBIN) as c:
            await c.add("p1", PREFILL)
            await c.add("d1", DECODE, Behaviour(die_after=1))
            await c.add("d2", DECODE, Behaviour(fail_code=grpc.StatusCode.RESOURCE_EXHAUSTED))
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=6)

            assert result.code == grpc.StatusCode.INTERNAL
            assert result.details.startswith("RESOURCE_EXHAUSTED: decode worker 'd2'")
            assert result.final.finish_reason == inference_pb2.FINISH_REASON_ERROR
            assert result.final.usage.completion_tokens == len(result.tokens) == 3

    run(body())


def test_an_engine_failure_is_not_resumed() -> None:
    async def body() -> None:
        async with cluster(ROUND_ROBIN) as c:
            await c.add("p1", PREFILL)
            await c.add("d1", DECODE, Behaviour(error_after=2))
            d2 = await c.add("d2", DECODE)
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=6)

            assert result.code == grpc.StatusCode.INTERNAL
            assert "scripted engine failure" in result.details
            _assert_each_token_once(result.tokens, expected_completion(len(PROMPT), 3))
            assert result.final.finish_reason == inference_pb2.FINISH_REASON_ERROR
            assert result.final.usage.completion_tokens == 3
            assert d2.calls == []

    run(body())


def test_client_cancel_during_prefill_cancels_the_prefill_call() -> None:
    async def body() -> None:
        async with cluster(ROUND_ROBIN) as c:
            prefill = await c.add("p1", PREFILL, Behaviour(hang_after=0))
            await c.add("d1", DECODE)
            request = inference_pb2.GenerateRequest(model="fake-model", prompt_token_ids=PROMPT)
            call = c.stub.Generate(request, timeout=10)
            await _until(lambda: len(prefill.calls) == 1)
            call.cancel()
            await asyncio.wait_for(prefill.cancelled.wait(), 2)
            await _until(lambda: prefill.released == [prefill.calls[0].request.request_id])

    run(body())


def test_client_gone_at_the_first_token_releases_the_prefill_kv() -> None:
    """The consumer stops while the first token is being handed over, before any decode
    call: the prefill's blocks are released at once, not left to the lease."""

    async def body() -> None:
        async with cluster(ROUND_ROBIN) as c:
            prefill = await c.add("p1", PREFILL)
            decode = await c.add("d1", DECODE)
            request = inference_pb2.GenerateRequest(
                model="fake-model", prompt_token_ids=PROMPT, max_tokens=5
            )
            stream = c.router.orchestrator.generate(request, timeout=10)
            first = await anext(stream)
            assert list(first.token_ids) == expected_completion(len(PROMPT), 1)
            await stream.aclose()  # at the yield of the first token
            await _until(lambda: prefill.released == [prefill.calls[0].request.request_id])
            assert decode.calls == []

    run(body())


def test_client_cancel_cancels_the_decode_call() -> None:
    async def body() -> None:
        async with cluster(ROUND_ROBIN) as c:
            await c.add("p1", PREFILL)
            decode = await c.add("d1", DECODE, Behaviour(hang_after=1))
            call = c.stub.Generate(
                inference_pb2.GenerateRequest(
                    model="fake-model", prompt_token_ids=PROMPT, max_tokens=10
                ),
                timeout=10,
            )
            first = await call.read()  # prefill's token
            second = await call.read()  # decode's first, then it hangs
            assert list(first.token_ids) + list(second.token_ids) == expected_completion(3, 2)
            call.cancel()
            await asyncio.wait_for(decode.cancelled.wait(), 2)
            await _until(lambda: all(w.in_flight == 0 for w in c.router.registry.workers()))

    run(body())


async def _until(condition, timeout: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``condition`` until true; fail the test on timeout."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


WAITING = dataclasses.replace(ROUND_ROBIN, decode_wait_s=10.0)


async def _stream_left_without_decoders(c: Cluster) -> tuple[FakeWorker, asyncio.Task[Result]]:
    """p1 and a decode worker d1 that fails every stream after 2 tokens; a request whose
    stream d1 failed, now waiting for a decode worker (d1 is excluded for it)."""
    await c.add("p1", PREFILL)
    d1 = await c.add("d1", DECODE, Behaviour(die_after=2))
    stream = asyncio.create_task(c.generate(prompt_token_ids=PROMPT, max_tokens=8, min_tokens=8))
    await _until(lambda: len(d1.calls) == 1)
    await asyncio.sleep(0.5)
    assert not stream.done()
    return d1, stream


def _assert_resumed_on(result: Result, worker_id: str) -> None:
    _assert_each_token_once(result.tokens, expected_completion(len(PROMPT), 8))
    assert result.code == grpc.StatusCode.OK
    assert result.final.serving.decode_worker == worker_id
    assert result.final.serving.retries == 1


def test_a_stream_left_without_decode_workers_waits_for_one_to_join() -> None:
    """The only decode worker dies after the client got tokens (it restarts, under a new
    id): the stream waits for the new one and resumes there, every token once, rather
    than end half sent. A request with nothing sent yet fails at once (safe to retry)."""

    async def body() -> None:
        async with cluster(WAITING) as c:
            _, stream = await _stream_left_without_decoders(c)
            await c.add("d2", DECODE)
            _assert_resumed_on(await stream, "d2")

            for worker in ("d1", "d2"):
                await c.workers[worker].stop()
            await _until(lambda: not c.router.registry.candidates(MODEL, DECODE))
            started = time.monotonic()
            fresh = await c.generate(prompt_token_ids=PROMPT, max_tokens=8)
            assert fresh.code == grpc.StatusCode.UNAVAILABLE and fresh.messages == []
            assert "waited" not in fresh.details and time.monotonic() - started < 2

    run(body())


def test_the_wait_takes_a_decode_worker_restarted_under_its_own_id() -> None:
    """Compose and Kubernetes restart a worker under the same id: the new process is not
    the one that failed the request, so the waiting stream resumes on it."""

    async def body() -> None:
        async with cluster(WAITING) as c:
            d1, stream = await _stream_left_without_decoders(c)
            await d1.stop()
            restarted = await c.add("d1", DECODE)
            _assert_resumed_on(await stream, "d1")
            assert len(restarted.calls) == 1

    run(body())


def test_a_cancel_landing_as_a_decode_worker_joins_ends_the_request() -> None:
    """The client cancels in the same turn of the loop as the worker it waited for
    registers: the request ends (on Python 3.11 ``wait_for`` dropped that cancel, and a
    new prefill and decode ran for a client that was gone)."""

    async def body() -> None:
        async with cluster(WAITING) as c:
            await c.add("p1", PREFILL)
            d1 = await c.add("d1", DECODE, Behaviour(die_after=2))
            request = inference_pb2.GenerateRequest(
                model=MODEL, prompt_token_ids=PROMPT, max_tokens=8
            )

            async def consume() -> None:
                async for _ in c.router.orchestrator.generate(request, timeout=None):
                    pass

            task = asyncio.create_task(consume())
            await _until(lambda: len(d1.calls) == 1)
            await asyncio.sleep(0.3)  # waiting for a decode worker by now
            d2 = await FakeWorker("d2", DECODE).start()
            c.workers["d2"] = d2
            c.router.registry.register(d2.register_request())
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
            assert d2.calls == []

    run(body())


def test_a_deadline_that_ends_the_wait_for_a_decode_worker_is_deadline_exceeded() -> None:
    """No final ERROR message and no UNAVAILABLE: the client's deadline ended the wait
    (inference.proto: a passed deadline is DEADLINE_EXCEEDED, without a final message)."""

    async def body() -> None:
        async with cluster(WAITING) as c:
            await c.add("p1", PREFILL)
            await c.add("d1", DECODE, Behaviour(die_after=2))
            request = inference_pb2.GenerateRequest(
                model=MODEL, prompt_token_ids=PROMPT, max_tokens=8
            )
            messages = []
            with pytest.raises(RouteError) as ended:
                async for message in c.router.orchestrator.generate(request, timeout=1.0):
                    messages.append(message)
            assert ended.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "deadline passed while waiting" in str(ended.value)
            assert [list(m.token_ids) for m in messages] == [
                [t] for t in expected_completion(len(PROMPT), 3)
            ]
            assert all(m.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED for m in messages)

    run(body())


def test_a_resumed_stream_reports_the_cache_hits_of_the_prefill_it_lost() -> None:
    """No prefill worker: d1 prefills the prompt itself (2 tokens cached) and dies before
    its final message. The resume's prompt includes generated tokens, so its hits are not
    the prompt's; the count comes from d1's first message (it was 0 before)."""

    async def body() -> None:
        async with cluster(ROUND_ROBIN) as c:
            await c.add("d1", DECODE, Behaviour(cached_tokens=2, die_after=2))
            await c.add("d2", DECODE, Behaviour(cached_tokens=3))
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=5)
            _assert_each_token_once(result.tokens, expected_completion(len(PROMPT), 5))
            assert result.final.serving.retries == 1
            assert result.final.usage.prompt_tokens == len(PROMPT)
            assert result.final.usage.cached_tokens == 2

    run(body())

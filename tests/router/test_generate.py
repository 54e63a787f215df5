"""The Generate flow through a real router and fake workers, when nothing fails."""

from __future__ import annotations

from services.stubs.tandem.v1 import inference_pb2
from tests.router.fakes import KV_BYTES, MODEL, Behaviour, expected_completion, token_text
from tests.router.harness import DECODE, PREFILL, cluster, run

PROMPT = [5, 6, 7, 8, 9]


def test_disaggregated_streams_first_token_then_decode_tokens() -> None:
    async def body() -> None:
        async with cluster() as c:
            prefill = await c.add("p1", PREFILL, Behaviour(cached_tokens=3))
            decode = await c.add("d1", DECODE)
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=4, request_id="req-1")

            expected = expected_completion(len(PROMPT), 4)
            assert result.code.name == "OK"
            # The first token comes alone, from the prefill; then one message per
            # decode token; then the decode worker's final message (no tokens).
            assert [list(m.token_ids) for m in result.messages] == [[t] for t in expected] + [[]]
            assert result.text == "".join(token_text(t) for t in expected)
            assert all(m.request_id == "req-1" for m in result.messages)
            final = result.final
            assert final.finish_reason == inference_pb2.FINISH_REASON_LENGTH
            assert final.usage == inference_pb2.Usage(
                prompt_tokens=5, completion_tokens=4, cached_tokens=3
            )
            assert final.serving == inference_pb2.ServingInfo(
                prefill_worker="p1",
                decode_worker="d1",
                kv_transfer_bytes=KV_BYTES,
                kv_transport="grpc",
                retries=0,
                placement="disaggregated",
                policy="kv-aware",
            )
            # The first message says the prompt's size (for proxies whose stream ends
            # early); the others carry no accounting until the last.
            first, *middle = result.messages[:-1]
            assert first.usage == inference_pb2.Usage(prompt_tokens=5)
            assert not first.HasField("serving")
            for m in middle:
                assert not m.HasField("usage") and not m.HasField("serving")

            # What the workers were sent.
            (prefill_call,) = prefill.calls
            assert list(prefill_call.request.prompt_token_ids) == PROMPT
            assert prefill_call.request.prompt == ""
            assert prefill_call.request.max_tokens == 4
            assert prefill_call.request.request_id.startswith("req-1#")
            (decode_call,) = decode.calls
            assert decode_call.first_token_id == expected[0]
            assert decode_call.kv.worker_id == "p1"
            assert decode_call.kv.request_id == prefill_call.request.request_id
            assert list(decode_call.request.prompt_token_ids) == PROMPT
            assert decode_call.request.max_tokens == 4
            # Counts return to zero once the request ends.
            assert all(w.in_flight == 0 for w in c.router.registry.workers())

    run(body())


def test_prefill_that_finishes_the_request_sends_one_final_message() -> None:
    async def body() -> None:
        async with cluster() as c:
            await c.add("p1", PREFILL)
            decode = await c.add("d1", DECODE)
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=1)

            assert result.tokens == expected_completion(len(PROMPT), 1)
            assert len(result.messages) == 1
            assert result.final.finish_reason == inference_pb2.FINISH_REASON_LENGTH
            assert result.final.usage.prompt_tokens == 5
            assert result.final.usage.completion_tokens == 1
            assert result.final.serving.prefill_worker == "p1"
            assert result.final.serving.decode_worker == ""
            assert decode.calls == []

    run(body())


def test_aggregated_mode_relays_the_decode_worker_alone() -> None:
    async def body() -> None:
        async with cluster() as c:
            decode = await c.add("d1", DECODE, Behaviour(cached_tokens=2))
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=3)

            assert result.tokens == expected_completion(len(PROMPT), 3)
            assert result.final.usage == inference_pb2.Usage(
                prompt_tokens=5, completion_tokens=3, cached_tokens=2
            )
            assert result.final.serving.prefill_worker == ""
            assert result.final.serving.decode_worker == "d1"
            (call,) = decode.calls
            assert not call.HasField("first_token_id")
            assert not call.HasField("kv")
            assert list(call.request.prompt_token_ids) == PROMPT

    run(body())


def test_a_decode_worker_that_prefilled_locally_is_reported_without_prefill_worker() -> None:
    async def body() -> None:
        async with cluster() as c:
            await c.add("p1", PREFILL)
            await c.add("d1", DECODE, Behaviour(kv_fallback=True))
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=3)
            assert result.tokens == expected_completion(len(PROMPT), 3)
            assert result.final.serving == inference_pb2.ServingInfo(
                decode_worker="d1", placement="disaggregated", policy="kv-aware"
            )

    run(body())


def test_unset_sampling_fields_stay_unset_and_an_id_is_assigned() -> None:
    async def body() -> None:
        async with cluster() as c:
            decode = await c.add("d1", DECODE)
            result = await c.generate(prompt_token_ids=PROMPT, temperature=0.0, stop=["x"])

            # max_tokens unset means 16, for the router and the worker alike.
            assert len(result.tokens) == 16
            ids = {m.request_id for m in result.messages}
            assert len(ids) == 1 and len(ids.pop()) == 32  # a uuid4 hex
            request = decode.calls[0].request
            assert not request.HasField("max_tokens")
            assert request.HasField("temperature") and request.temperature == 0.0
            assert list(request.stop) == ["x"]

    run(body())


def test_attempts_of_requests_with_the_same_id_get_distinct_worker_ids() -> None:
    async def body() -> None:
        async with cluster() as c:
            decode = await c.add("d1", DECODE)
            await c.generate(prompt_token_ids=PROMPT, max_tokens=2, request_id="same")
            await c.generate(prompt_token_ids=PROMPT, max_tokens=2, request_id="same")
            first, second = (call.request.request_id for call in decode.calls)
            assert first != second
            assert first.startswith("same#") and second.startswith("same#")

    run(body())


def test_list_models_reports_what_live_workers_serve() -> None:
    async def body() -> None:
        async with cluster() as c:
            assert list((await c.stub.ListModels(inference_pb2.ListModelsRequest())).models) == []
            await c.add("d1", DECODE)
            await c.add("o1", DECODE, model="other", model_id="other@1")
            reply = await c.stub.ListModels(inference_pb2.ListModelsRequest())
            assert [(m.id, m.max_context_length, m.vocab_size) for m in reply.models] == [
                (MODEL, 512, 4096),
                ("other", 512, 4096),
            ]

    run(body())


def test_attempt_ids_differ_between_routers() -> None:
    """A router that restarts (or a second replica) must not reuse its predecessor's attempt
    ids: a prefill worker still holding "req-1#1" for a crashed router would refuse the
    client's retry of req-1 as a duplicate (INVALID_ARGUMENT, for a valid request)."""

    async def attempt_id() -> str:
        async with cluster() as c:
            prefill = await c.add("p1", PREFILL)
            await c.add("d1", DECODE)
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=2, request_id="req-1")
            assert result.code.name == "OK"
            (call,) = prefill.calls
            return call.request.request_id

    async def body() -> None:
        first, second = await attempt_id(), await attempt_id()
        assert first.startswith("req-1#") and second.startswith("req-1#")
        assert first != second

    run(body())

"""Open-loop load generator: each request leaves at its scheduled time, whatever came before.

Requests are dispatched by one loop that sleeps until the next scheduled time and
starts the request as a task, so a slow server never delays later sends (a
closed-loop client would, and would hide the queueing it causes). Each record keeps
its scheduled time and its send (``sent_s``, where latencies start); when the client
itself falls behind, or a request waits for a --max-concurrency slot, the gap between
the two shows it (the report's send delay).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence

import grpc

from services.bench.serve_metrics import INCOMPLETE_STREAM, OK, RequestRecord
from services.stubs.tandem.v1 import inference_pb2, inference_pb2_grpc


def generate_request(
    model: str, prompt_token_ids: Sequence[int], output_len: int, request_id: str
) -> inference_pb2.GenerateRequest:
    """A benchmark request: exactly ``output_len`` greedy tokens (EOS ignored until then)."""
    return inference_pb2.GenerateRequest(
        model=model,
        prompt_token_ids=prompt_token_ids,
        request_id=request_id,
        max_tokens=output_len,
        min_tokens=output_len,
        temperature=0.0,
        ignore_eos=True,
    )


def finish_reason_name(value: int) -> str | None:
    """``FINISH_REASON_LENGTH`` → "length", as the engine and ``tandem generate`` spell it."""
    name = inference_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()
    return None if name == "unspecified" else name


async def run_schedule(
    stub: inference_pb2_grpc.InferenceStub,
    requests: Sequence[inference_pb2.GenerateRequest],
    schedule_s: Sequence[float],
    *,
    max_concurrency: int | None = None,
    timeout_s: float | None = None,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """Send ``requests[i]`` at ``schedule_s[i]`` seconds from now; one record per request.

    At most ``max_concurrency`` requests are in flight (None: no cap); ``timeout_s`` is
    each RPC's deadline, counted from when it is issued. ``on_done`` sees each record
    as its request ends.
    """
    if len(requests) != len(schedule_s):
        raise ValueError(f"{len(requests)} requests but {len(schedule_s)} send times")
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    tasks: list[asyncio.Task[RequestRecord]] = []
    try:
        for index, (request, at) in enumerate(zip(requests, schedule_s, strict=True)):
            delay = at - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            send = send_request(stub, request, index, at, clock, slots, timeout_s, on_done)
            tasks.append(asyncio.create_task(send))
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:  # only on an error or Ctrl-C: stop what is still streaming
            task.cancel()


async def send_request(
    stub: inference_pb2_grpc.InferenceStub,
    request: inference_pb2.GenerateRequest,
    index: int,
    scheduled_s: float,
    clock: Callable[[], float],
    slots: asyncio.Semaphore | None = None,
    timeout_s: float | None = None,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> RequestRecord:
    """Run one Generate stream to its end and record when each message arrived."""
    async with slots or contextlib.nullcontext():
        sent = clock()
        times: list[float] = []
        counts: list[int] = []
        final: inference_pb2.GenerateResponse | None = None
        status, error = OK, ""
        last_message = sent
        try:
            async for message in stub.Generate(request, timeout=timeout_s):
                last_message = clock()
                if message.token_ids:
                    times.append(last_message)
                    counts.append(len(message.token_ids))
                if message.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
                    final = message
        except grpc.aio.AioRpcError as exc:
            status, error = exc.code().name, exc.details() or ""
        end = last_message if status == OK else clock()
    if status == OK and final is None:
        status, error = INCOMPLETE_STREAM, "the stream ended OK without a final message"
    record = RequestRecord(
        index=index,
        request_id=request.request_id,
        prompt_len=len(request.prompt_token_ids),
        scheduled_s=scheduled_s,
        sent_s=sent,
        token_times_s=tuple(times),
        token_counts=tuple(counts),
        end_s=end,
        status=status,
        error=error,
        finish_reason=finish_reason_name(final.finish_reason) if final else None,
        usage=final.usage if final and final.HasField("usage") else None,
        serving=final.serving if final and final.HasField("serving") else None,
    )
    if on_done:
        on_done(record)
    return record

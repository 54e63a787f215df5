"""Rolling updates with real processes: a worker sent SIGTERM drains instead of dying.

It tells the router at once (no new request goes to it, none is refused for it),
finishes the stream it is serving without a retry, refuses direct calls with
UNAVAILABLE, and exits 0; a drain that runs past ``--drain-timeout-s`` is cut and
the router resumes the stream elsewhere, every token still sent once.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import pytest

from services.launcher.local import Child, LocalCluster
from services.stubs.tandem.v1 import inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.e2e.client import Completion, channel, eventually, generate, metric, request
from tests.e2e.conftest import DEVICE, offline_tokens, start_cluster

LONG = 300
"""Tokens in the stream that is running when the signal lands: seconds of decoding. The
checks are done by its 30th token here (29 when measured), so a machine ten times slower
still ends them mid-stream; an assertion says so if not."""
LONG_CUT = LONG if DEVICE == "cpu" else 3000
"""The stream a 0.5 s drain must cut: on a GPU (an H100, 2026-11-27) 300 tokens ended
within the drain, and nothing was cut."""
PROMPTS = [list(range(400, 430)), list(range(600, 630))]
"""Round-robin places one stream on each decode worker (which one where, it decides)."""


def _two_decoders(tmp: Path, drain_timeout_s: str) -> LocalCluster:
    """One prefill and two decode workers behind a round-robin router."""
    decode_args = ("--drain-timeout-s", drain_timeout_s)
    return start_cluster(
        tmp, prefill=1, decode=2, kv_transport="grpc", policy="round-robin", decode_args=decode_args
    )


def _exited_cleanly(child: Child, last_words: str) -> None:
    assert child.process.wait(timeout=15) == 0
    _wait_logged(child, last_words)


def _wait_logged(child: Child, line: str, timeout_s: float = 15.0) -> None:
    assert child.log_path is not None
    deadline = time.monotonic() + timeout_s
    while line not in child.log_path.read_text():
        assert time.monotonic() < deadline, f"{child.name} never logged {line!r}"
        time.sleep(0.02)


PATIENT = ("--drain-timeout-s", "120")
"""Over the launcher's 5 s: the long stream must end by itself, however slow the machine."""
ACKED = "draining: the router sends no new"
"""decode-0's line once the router has its draining heartbeat."""
STARTED = "draining: refusing new requests"
"""decode-0's line as it begins to drain (before the router may know)."""


async def _stream_then_sigterm(
    cluster: LocalCluster, during: object = None, logged: str = ACKED, tokens: int = LONG
) -> tuple[list[Completion], list[Completion]]:
    """Two streams of ``tokens``; once both flow, SIGTERM decode-0 and, once it has
    ``logged`` that line, send four short requests. Returns (long streams, short ones)."""
    decode0 = cluster.child("decode-0")
    async with channel(cluster.address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        seen = [Completion() for _ in PROMPTS]
        streams = [
            asyncio.create_task(generate(stub, request(p, tokens), into=c))
            for p, c in zip(PROMPTS, seen, strict=True)
        ]
        while min(len(c.tokens) for c in seen) < 4:
            await asyncio.sleep(0.005)
        decode0.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(_wait_logged, decode0, logged)
        if during is not None:
            await during(decode0)
        short = [generate(stub, request([7, 8, 9, i], 4)) for i in range(4)]
        quick = await asyncio.gather(*short)
        assert not all(c.finals for c in seen), "the long streams ended before the checks"
        return await asyncio.gather(*streams), quick


async def _refused_directly(decode0: Child) -> None:
    async with channel(decode0.address) as ch:
        call = worker_pb2_grpc.DecodeWorkerStub(ch).Decode(
            worker_pb2.DecodeRequest(request=request([1, 2, 3], 2)), timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in call:
                pass
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "decode-0 is draining" in refused.value.details()


def test_a_draining_decode_worker_finishes_its_stream_and_takes_no_new_one(
    tmp_path: Path, tandem_home: Path, reference_engine
) -> None:
    c = _two_decoders(tmp_path, drain_timeout_s=PATIENT[1])
    try:
        streams, quick = asyncio.run(_stream_then_sigterm(c, _refused_directly))
        for prompt, got in zip(PROMPTS, streams, strict=True):
            assert got.tokens == offline_tokens(reference_engine, prompt, LONG)
            assert got.final.serving.retries == 0  # finished where it began...
        # ...one of them on the draining worker
        assert {s.final.serving.decode_worker for s in streams} == {"decode-0", "decode-1"}
        assert {q.final.serving.decode_worker for q in quick} == {"decode-1"}
        assert all(q.final.serving.retries == 0 for q in quick)  # none was refused
        _exited_cleanly(c.child("decode-0"), "drained: every request finished")
    finally:
        c.stop()


def test_a_drain_past_its_timeout_is_cut_and_the_stream_resumes_elsewhere(
    tmp_path: Path, tandem_home: Path, reference_engine
) -> None:
    c = _two_decoders(tmp_path, drain_timeout_s="0.5")
    try:
        # A 0.5 s drain may end before its heartbeat reaches the router (on a busy
        # machine the engine thread starves the event loop): the router then learns from
        # the closed connection instead. Either way the stream resumes elsewhere.
        streams, _ = asyncio.run(_stream_then_sigterm(c, logged=STARTED, tokens=LONG_CUT))
        for prompt, got in zip(PROMPTS, streams, strict=True):
            assert got.tokens == offline_tokens(reference_engine, prompt, LONG_CUT)  # once each
            assert got.final.serving.decode_worker == "decode-1"
        # The one decode-0 was serving was cut and resumed; the other never moved.
        assert sorted(s.final.serving.retries for s in streams) == [0, 1]
        cut_short = "stopping with 1 calls still in flight (drain timeout)"
        _exited_cleanly(c.child("decode-0"), cut_short)
    finally:
        c.stop()


def test_a_draining_router_relays_its_streams_to_the_end_then_exits_at_once(
    tmp_path: Path, tandem_home: Path, reference_engine
) -> None:
    """The workers' KV event streams never end by themselves: the router waits for its
    Generate streams only, or every restart would wait out the whole drain timeout."""
    c = start_cluster(tmp_path, prefill=1, decode=1, kv_transport="grpc", router_args=PATIENT)
    router = c.child("router")
    prompt = PROMPTS[0]

    async def sigterm_mid_stream() -> tuple[Completion, int, float]:
        async with channel(c.address) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            seen = Completion()
            stream = asyncio.create_task(generate(stub, request(prompt, LONG), into=seen))
            while len(seen.tokens) < 4:
                await asyncio.sleep(0.005)
            router.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(_wait_logged, router, "router draining")
            async with channel(c.address) as fresh:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await generate(inference_pb2_grpc.InferenceStub(fresh), request([1, 2], 2))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not seen.finals, "the stream ended before the checks"
            got = await stream
            ended = time.monotonic()
            code = await asyncio.to_thread(router.process.wait, 10)
            return got, code, time.monotonic() - ended

    try:
        got, code, exit_s = asyncio.run(sigterm_mid_stream())
        assert code == 0 and exit_s < 5  # once the stream ended, not after the drain timeout
        assert got.tokens == offline_tokens(reference_engine, prompt, LONG)
        assert got.final.usage.completion_tokens == LONG
    finally:
        c.stop()


def test_a_second_sigterm_cuts_the_routers_drain_short_and_it_still_stops_cleanly(
    tmp_path: Path, tandem_home: Path
) -> None:
    """An operator who will not wait out a drain signals again: the router cuts the streams
    it relays (the client gets a status, not a hang), exits 0 at once rather than dying
    mid-drain, and the workers release every block the cut stream held."""
    c = start_cluster(tmp_path, prefill=1, decode=1, kv_transport="grpc", router_args=PATIENT)
    router = c.child("router")
    workers = [c.child(name) for name in ("prefill-0", "decode-0")]
    idle = {w.name: metric(w.metrics_port, "tandem_kv_free_blocks") for w in workers}

    async def signal_twice() -> tuple[grpc.StatusCode, int, float]:
        async with channel(c.address) as ch:
            seen = Completion()
            call = generate(
                inference_pb2_grpc.InferenceStub(ch), request(PROMPTS[0], LONG), into=seen
            )
            stream = asyncio.create_task(call)
            while len(seen.tokens) < 4:
                await asyncio.sleep(0.005)
            router.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(_wait_logged, router, "router draining")
            signalled = time.monotonic()
            router.process.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                await stream
            assert not seen.finals and len(seen.tokens) < LONG
            code = await asyncio.to_thread(router.process.wait, 15)
            return cut.value.code(), code, time.monotonic() - signalled

    try:
        status, code, exit_s = asyncio.run(signal_twice())
        assert status in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert code == 0 and exit_s < 10  # not the 120 s drain, not killed by the signal
        _wait_logged(router, "router stopping with 1 streams still in flight (signalled again)")
        for w in workers:
            eventually(lambda p=w.metrics_port: metric(p, "tandem_running_requests") == 0)
            eventually(lambda w=w: metric(w.metrics_port, "tandem_kv_free_blocks") == idle[w.name])
    finally:
        c.stop()

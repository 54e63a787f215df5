"""Failures with real processes: killed workers and routers, failed KV reads, silent workers.

Each test kills or stops a real worker process and checks that requests still
end with the offline tokens, each token sent exactly once and one final message.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.launcher.local import LocalCluster
from services.stubs.tandem.v1 import inference_pb2_grpc
from tests.e2e.client import Completion, channel, generate, request
from tests.e2e.conftest import ALWAYS_DISAGGREGATE, offline_tokens, start_cluster

ROLES = ("prefill", "decode")
HEARTBEAT_TIMEOUT_S = 3.0  # the router's default: 3 missed 1 s heartbeats


@pytest.fixture
def cluster(tmp_path: Path, tandem_home: Path) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path, prefill=2, decode=2, kv_transport="grpc")
    yield c
    c.stop()


async def _many(address: str, prompts: list[list[int]], max_tokens: int) -> list[Completion]:
    async with channel(address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        return await asyncio.gather(*(generate(stub, request(p, max_tokens)) for p in prompts))


def test_dead_prefill_worker_is_retried_elsewhere(cluster: LocalCluster, reference_engine) -> None:
    os.kill(cluster.child("prefill-0").process.pid, signal.SIGKILL)
    prompts = [list(range(50 + i, 90 + i)) for i in range(4)]
    # Sent at once, before the router misses a heartbeat: round-robin sends
    # half of them to the dead worker first.
    results = asyncio.run(_many(cluster.address, prompts, 8))
    for prompt, got in zip(prompts, results, strict=True):
        assert got.tokens == offline_tokens(reference_engine, prompt, 8)
        assert got.final.serving.prefill_worker == "prefill-1"
    assert sum(r.final.serving.retries for r in results) >= 1


def test_decode_worker_killed_mid_stream_resumes_elsewhere(
    cluster: LocalCluster, reference_engine
) -> None:
    prompts = [list(range(400, 430)), list(range(600, 630))]  # round-robin: one per decode

    async def kill_after_first_tokens() -> list[Completion]:
        async with channel(cluster.address) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            seen = [Completion() for _ in prompts]
            tasks = [
                asyncio.create_task(generate(stub, request(p, 120), into=c))
                for p, c in zip(prompts, seen, strict=True)
            ]
            # Kill once both stream (a fixed sleep let a fast run finish first).
            while min(len(c.tokens) for c in seen) < 4:
                await asyncio.sleep(0.005)
            os.kill(cluster.child("decode-0").process.pid, signal.SIGKILL)
            assert not any(c.finals for c in seen), "a request ended before the kill"
            return await asyncio.gather(*tasks)

    results = asyncio.run(kill_after_first_tokens())
    for prompt, got in zip(prompts, results, strict=True):
        assert got.tokens == offline_tokens(reference_engine, prompt, 120)  # each token once
        final = got.final  # exactly one final message
        assert final.usage.prompt_tokens == len(prompt)
        assert final.usage.completion_tokens == 120
        assert final.serving.decode_worker == "decode-1"
    assert max(r.final.serving.retries for r in results) >= 1


def test_silent_worker_leaves_the_registry(cluster: LocalCluster) -> None:
    stopped = cluster.child("decode-1").process.pid
    os.kill(stopped, signal.SIGSTOP)  # alive but silent: no heartbeats
    try:
        time.sleep(HEARTBEAT_TIMEOUT_S + 1.5)
        results = asyncio.run(_many(cluster.address, [[5, 6, 7, i] for i in range(6)], 4))
        assert {r.final.serving.decode_worker for r in results} == {"decode-0"}
        assert all(r.final.serving.retries == 0 for r in results)
    finally:
        os.kill(stopped, signal.SIGCONT)


def test_failed_kv_read_falls_back_to_local_prefill(
    tmp_path: Path, tandem_home: Path, reference_engine
) -> None:
    # A read deadline nothing can meet: every KV read fails, and the decode
    # worker must prefill locally instead of hanging.
    c = start_cluster(
        tmp_path, prefill=1, decode=1, kv_transport="grpc", decode_args=("--kv-timeout-s", "1e-6")
    )
    try:
        prompt = list(range(700, 760))
        started = time.monotonic()
        (got,) = asyncio.run(_many(c.address, [prompt], 10))
        assert time.monotonic() - started < 30
        assert got.tokens == offline_tokens(reference_engine, prompt, 10)
        assert got.final.serving.kv_transport == ""  # nothing crossed
        assert got.final.serving.kv_transfer_bytes == 0
    finally:
        c.stop()


def test_workers_rejoin_a_restarted_router(
    tmp_path: Path, tandem_home: Path, reference_engine
) -> None:
    """The router is stateless but for its registry: killed and started again on its port
    (what compose or Kubernetes do), it gets both workers back by their heartbeats within
    seconds, and serves disaggregated requests with the offline tokens."""
    c = start_cluster(tmp_path, prefill=1, decode=1, kv_transport="grpc")
    router = c.child("router")
    replacement = None
    try:
        os.kill(router.process.pid, signal.SIGKILL)
        router.process.wait()
        time.sleep(3.0)  # long enough for the workers' channels to back off
        command = ["router", "--port", str(router.port), *ALWAYS_DISAGGREGATE]
        log = tmp_path / "router-again.log"
        with log.open("w") as out:
            replacement = subprocess.Popen(
                [sys.executable, "-m", "services.cli.main", *command],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started = time.monotonic()
        while not all(f"registered {role} worker" in log.read_text() for role in ROLES):
            assert time.monotonic() - started < 20, "the workers did not rejoin in 20 s"
            assert replacement.poll() is None, f"the new router exited: {log.read_text()}"
            time.sleep(0.1)
        prompt = list(range(300, 340))
        (got,) = asyncio.run(_many(c.address, [prompt], 8))
        assert got.tokens == offline_tokens(reference_engine, prompt, 8)
        assert got.final.serving.kv_transfer_bytes > 0  # both workers are back, in their roles
    finally:
        if replacement is not None:
            replacement.terminate()
            replacement.wait(timeout=30)
        c.stop()


def test_a_killed_decode_worker_is_started_again_and_the_stream_resumes_on_it(
    tmp_path: Path, tandem_home: Path, reference_engine
) -> None:
    """`tandem up`'s supervision with the only decode worker SIGKILLed mid-stream: the
    launcher starts it again under its id, it rejoins the router, and the stream that was
    waiting for a decode worker resumes there with every token once. One restart a minute
    here: a second exit is left dead (and `tandem up` then stops everything)."""
    c = start_cluster(tmp_path, prefill=1, decode=1, kv_transport="grpc", worker_restarts=1)
    prompt = list(range(800, 830))

    async def kill_and_restart_mid_stream() -> Completion:
        async with channel(c.address) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            seen = Completion()
            task = asyncio.create_task(generate(stub, request(prompt, 60), into=seen))
            while len(seen.tokens) < 4:
                await asyncio.sleep(0.005)
            os.kill(c.child("decode-0").process.pid, signal.SIGKILL)
            c.child("decode-0").process.wait()
            (said,) = c.restart_dead_workers()
            assert said.startswith("decode-0 exited with status -9")
            assert said.endswith("started it again (1 of 1 within 60 s)")
            return await task

    try:
        got = asyncio.run(kill_and_restart_mid_stream())
        assert got.tokens == offline_tokens(reference_engine, prompt, 60)  # each token once
        assert got.final.serving.decode_worker == "decode-0"
        assert got.final.serving.retries >= 1
        os.kill(c.child("decode-0").process.pid, signal.SIGKILL)
        c.child("decode-0").process.wait()
        assert c.restart_dead_workers() == []
        assert [d.name for d in c.dead_children()] == ["decode-0"]
    finally:
        c.stop()

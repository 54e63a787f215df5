"""Workers' KV events reach the router's index, and a restarted worker's stale blocks vanish.

Real processes: a router and one prefill and one decode worker. The router's
``tandem_router_indexed_blocks{worker}`` gauge shows what its prefix index holds
for each worker. The router runs with a long heartbeat timeout, so the killed
worker's entry can only leave the index through the replacement's registration,
never through expiry: the test shows the re-registration itself drops it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from services.launcher.local import free_port
from services.stubs.tandem.v1 import inference_pb2_grpc
from tests.e2e.client import Completion, channel, generate, request
from tests.e2e.conftest import WORKER_ARGS, start_cluster

HEARTBEAT_INTERVAL_S = 1.0  # the router's default
PROMPT = list(range(100, 164))  # 64 tokens: 4 full blocks of 16


def indexed_blocks(metrics_port: int, worker_id: str) -> float:
    """The router's tandem_router_indexed_blocks for one worker; 0 when not exported."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as page:
        text = page.read().decode()
    prefix = f'tandem_router_indexed_blocks{{worker="{worker_id}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll every 20 ms; returns the monotonic time the condition first held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return time.monotonic()


def complete(address: str, prompt: list[int]) -> Completion:
    async def call() -> Completion:
        async with channel(address) as ch:
            return await generate(inference_pb2_grpc.InferenceStub(ch), request(prompt, 4), 60)

    return asyncio.run(call())


def test_index_follows_events_and_a_restarted_worker_loses_its_blocks_at_once(
    tmp_path: Path, tandem_home: Path
) -> None:
    cluster = start_cluster(
        tmp_path,
        prefill=1,
        decode=1,
        kv_transport="grpc",
        router_args=("--heartbeat-timeout-ms", "60000"),
    )
    replacement: subprocess.Popen | None = None
    try:
        router_metrics = cluster.child("router").metrics_port
        first = complete(cluster.address, PROMPT)
        assert first.final.serving.prefill_worker == "prefill-0"
        wait_for(lambda: indexed_blocks(router_metrics, "prefill-0") >= 4, 2.0, "prefill blocks")
        wait_for(lambda: indexed_blocks(router_metrics, "decode-0") >= 3, 2.0, "decode blocks")

        old = cluster.child("prefill-0")
        os.kill(old.process.pid, signal.SIGKILL)
        old.process.wait(10)
        # The dead worker's entry is still registered: its blocks are still indexed.
        assert indexed_blocks(router_metrics, "prefill-0") >= 4

        log_path = tmp_path / "prefill-0-replacement.log"
        with log_path.open("w") as log:
            replacement = subprocess.Popen(
                [sys.executable, "-m", "services.cli.main", "prefill",
                 "--router", cluster.address, "--worker-id", "prefill-0",
                 "--port", str(free_port()), "--metrics-port", str(free_port()),
                 "--kv-transport", "grpc", *WORKER_ARGS],
                stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
            )  # fmt: skip

        def registered() -> bool:
            assert replacement.poll() is None, log_path.read_text()
            return "registered with the router as prefill-0" in log_path.read_text()

        # Poll both at once: when the registration shows in the log, and when the gauge drops.
        registered_at = dropped_at = None
        deadline = time.monotonic() + 60
        while registered_at is None or dropped_at is None:
            assert time.monotonic() < deadline, "the replacement never registered"
            now = time.monotonic()
            if registered_at is None and registered():
                registered_at = now
            if dropped_at is None and indexed_blocks(router_metrics, "prefill-0") == 0:
                dropped_at = now
            time.sleep(0.02)
        assert dropped_at - registered_at <= HEARTBEAT_INTERVAL_S

        second = complete(cluster.address, list(range(300, 364)))
        assert second.final.serving.prefill_worker == "prefill-0"
        assert len(second.tokens) == 4
        # The fresh worker's own events arrive: its index entries are its new blocks only.
        wait_for(lambda: indexed_blocks(router_metrics, "prefill-0") >= 4, 2.0, "new blocks")
        assert indexed_blocks(router_metrics, "prefill-0") < 8
    finally:
        if replacement is not None and replacement.poll() is None:
            replacement.terminate()
            try:
                replacement.wait(10)
            except subprocess.TimeoutExpired:
                replacement.kill()
                replacement.wait()
        cluster.stop()

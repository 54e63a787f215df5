"""`tandem prefill|decode --advertise`: a worker listens on --host but registers, and is
dialled, under the advertised name (what Kubernetes needs: pods bind 0.0.0.0, and their
certificates can name their stable DNS name, never their IP)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from services.router.config import RouterConfig
from services.router.registry import WorkerState
from services.router.server import Router, start_router
from services.rpc.server import client_channel
from services.rpc.tls import TlsConfig
from services.rpc.tls_dev_ca import DevCa
from services.stubs.tandem.v1 import inference_pb2, inference_pb2_grpc
from tests.rpc.health import health_status

WORKER_ID = "advertised"
START_TIMEOUT_S = 120.0  # a cold start imports torch and builds the engine


@asynccontextmanager
async def _router(tls: TlsConfig | None) -> AsyncIterator[Router]:
    router = await start_router(RouterConfig(heartbeat_interval_s=0.2, tls=tls))
    try:
        yield router
    finally:
        await router.stop(grace=0)


@asynccontextmanager
async def _worker(argv: list[str]) -> AsyncIterator[asyncio.subprocess.Process]:
    # The TLS flags default to $TANDEM_TLS_*: keep the caller's out of the child.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_TLS_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", *argv,
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _registered(router: Router, process: asyncio.subprocess.Process) -> WorkerState:
    """The worker's registration once the router has it; fails with the worker's stderr if
    it exits first."""
    deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
    while (worker := router.registry.get(WORKER_ID)) is None:
        if process.returncode is not None:
            stderr = await process.stderr.read() if process.stderr else b""
            pytest.fail(f"the worker exited {process.returncode}:\n{stderr.decode()}")
        assert asyncio.get_running_loop().time() < deadline, "the worker never registered"
        await asyncio.sleep(0.1)
    return worker


async def _generate(router: Router, model: str, tls: TlsConfig | None) -> list[int]:
    """Four greedy tokens through the router, which must dial the worker to serve them."""
    request = inference_pb2.GenerateRequest(
        model=model, prompt_token_ids=[5, 6, 7], max_tokens=4, temperature=0.0, ignore_eos=True
    )
    async with client_channel(router.address, tls=tls) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        return [t async for m in stub.Generate(request, timeout=60) for t in m.token_ids]


def _worker_argv(model: Path, engine_flags: list[str]) -> list[str]:
    """A decode worker bound to loopback by address, advertising a name (--router to add)."""
    return [
        "decode", "--model", str(model), *engine_flags, "--kv-transport", "grpc",
        "--host", "127.0.0.1", "--advertise", "localhost", "--worker-id", WORKER_ID,
    ]  # fmt: skip


def test_a_worker_registers_its_advertised_name_and_serves_there(
    tiny_model_dir: Path, engine_flags: list[str]
) -> None:
    async def body() -> None:
        argv = _worker_argv(tiny_model_dir, engine_flags)
        async with _router(None) as router, _worker([*argv, "--router", router.address]) as process:
            worker = await _registered(router, process)
            host, port = worker.address.rsplit(":", 1)
            assert host == "localhost" and int(port) > 0, worker.address
            assert len(await _generate(router, str(tiny_model_dir), None)) == 4

    asyncio.run(body())


def test_over_mtls_the_router_reaches_a_worker_by_the_name_its_certificate_holds(
    tiny_model_dir: Path, engine_flags: list[str], tmp_path: Path
) -> None:
    ca = DevCa.create(tmp_path / "ca")
    # Only "localhost": a DevCa leaf's loopback addresses would hide a dial by address.
    worker_tls = ca.issue("localhost", local_names=False)
    client = ca.issue("client")
    argv = _worker_argv(tiny_model_dir, engine_flags)
    argv += ["--tls-cert", str(worker_tls.cert), "--tls-key", str(worker_tls.key)]
    argv += ["--tls-ca", str(ca.cert)]

    async def body() -> None:
        async with (
            _router(ca.issue("router")) as router,
            _worker([*argv, "--router", router.address]) as process,
        ):
            worker = await _registered(router, process)
            assert worker.address.startswith("localhost:"), worker.address
            assert len(await _generate(router, str(tiny_model_dir), client)) == 4
            # The bound address is not a name the certificate holds: only the advertised
            # name lets a verifying peer in.
            port = worker.address.rsplit(":", 1)[1]
            assert await health_status(f"127.0.0.1:{port}", client) == grpc.StatusCode.UNAVAILABLE
            assert await health_status(worker.address, client) == grpc.StatusCode.OK

    asyncio.run(body())

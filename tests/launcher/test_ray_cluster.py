"""Workers as Ray actors on a local Ray instance: they serve, and Ray restarts a killed one.

One prefill and one decode actor (half a CPU each, on a 2-CPU local Ray) behind a real
router process and a gateway in front of it, as ``tandem up --ray`` runs them; the router is
told to always disaggregate, so both actors are on the path of every request.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

ray = pytest.importorskip("ray")

from services.cli.up import EXAMPLE_POLICY  # noqa: E402
from services.cli.up import _gateway as up_gateway  # noqa: E402
from services.engine.engine import LLMEngine  # noqa: E402
from services.engine.sampling_params import SamplingParams  # noqa: E402
from services.launcher.local import GatewaySpec, StartTimeout, free_port  # noqa: E402
from services.launcher.progress import StartProgress  # noqa: E402
from services.launcher.ray_cluster import (  # noqa: E402
    RayCluster,
    RayClusterConfig,
    RayStartError,
    start_on_ray,
)
from services.stubs.tandem.v1 import inference_pb2 as pb  # noqa: E402
from services.stubs.tandem.v1 import inference_pb2_grpc  # noqa: E402
from tests.e2e.client import Completion, channel, generate, request  # noqa: E402
from tests.e2e.conftest import ALWAYS_DISAGGREGATE, WORKER_ARGS, offline_tokens  # noqa: E402

pytestmark = pytest.mark.slow
PROMPTS = [[5, 17, 99, 3, 250, 61, 7], list(range(40, 80))]
PATIENT_S = 120.0
"""Every service's drain: a stream in flight must end by itself, however slow the machine."""
LONG = 300
"""Tokens in the stream running when an actor is stopped: seconds of decoding."""


@pytest.fixture(scope="module")
def gateway_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[GatewaySpec, str]:
    """The gateway ``tandem up --ray`` would run, and its minted admin key."""
    return up_gateway(EXAMPLE_POLICY, tmp_path_factory.mktemp("state"), "tandem-tiny")


START_LINES = io.StringIO()
"""What the module's cluster said while it started (plain lines, as in a log)."""
WORKER = (*WORKER_ARGS, "--kv-transport", "grpc", "--num-threads", "1")


@pytest.fixture(scope="module")
def cluster(tandem_home: Path, gateway_key: tuple[GatewaySpec, str]) -> Iterator[RayCluster]:
    port = free_port()
    c = start_on_ray(
        RayClusterConfig(
            address=None,  # a local Ray instance
            prefill=1,
            decode=1,
            port=port,
            router_host="127.0.0.1",
            router_args=ALWAYS_DISAGGREGATE,
            worker_args=WORKER,
            num_cpus=0.5,
            num_gpus=0,
            env={"TANDEM_HOME": str(tandem_home)},
            ray_init_kwargs={"num_cpus": 2, "include_dashboard": False},
            startup_timeout_s=180,
            gateway=gateway_key[0],
            gateway_host="127.0.0.1",
            loopback_only=True,  # as `tandem up --ray` on a local Ray
            drain_timeout_s=PATIENT_S,
        ),
        progress=StartProgress(START_LINES, bar=False),
    )
    yield c
    c.stop()


def wait_registered(actors: Iterable[Any], deadline: float) -> None:
    """Wait until the router has registered every one of ``actors`` (after a restart)."""
    pending = list(actors)
    while pending:
        remaining = max(1.0, deadline - time.monotonic())
        answers = ray.get([a.registered.remote() for a in pending], timeout=remaining)
        pending = [a for a, ok in zip(pending, answers, strict=True) if not ok]
        assert not pending or time.monotonic() < deadline, "actors did not register in time"
        if pending:
            time.sleep(0.2)


def _offline(engine: LLMEngine, max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [list(c.token_ids) for c in engine.generate(PROMPTS, params)]


async def _serve(address: str, max_tokens: int) -> list[list[int]]:
    async with channel(address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        done = await asyncio.gather(*(generate(stub, request(p, max_tokens)) for p in PROMPTS))
    return [c.tokens for c in done]


def test_the_start_says_what_it_waits_for(cluster: RayCluster) -> None:
    """``tandem up --ray`` shows the same progress as ``tandem up``: what was started, then
    each service ready, then the model registered."""
    lines = [line.strip() for line in START_LINES.getvalue().splitlines()]
    assert lines[0] == "started router, ray-prefill-0, ray-decode-0, gateway"
    ready = [line.split(" (")[0] for line in lines if line.endswith(" s)")]
    assert ready == [
        "router ready",
        "ray-prefill-0 ready",
        "ray-decode-0 ready",
        "gateway ready",
        "tandem-tiny registered with the router",
    ]


def test_actors_serve_the_offline_tokens(cluster: RayCluster, reference_engine: LLMEngine) -> None:
    assert asyncio.run(_serve(cluster.router_address, 12)) == _offline(reference_engine, 12)
    ids = {ray.get(a.worker_id.remote()) for a in cluster.actors.values()}
    assert ids == {"ray-prefill-0", "ray-decode-0"}


def test_the_gateway_is_the_door(cluster: RayCluster, gateway_key: tuple[GatewaySpec, str]) -> None:
    assert cluster.address != cluster.router_address
    req = request(PROMPTS[0], 4)
    with grpc.insecure_channel(cluster.address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(req, timeout=30))  # no key
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metadata = (("authorization", f"Bearer {gateway_key[1]}"),)
        replies = list(stub.Generate(req, timeout=60, metadata=metadata))
    assert sum(len(r.token_ids) for r in replies) == 4
    assert any(r.finish_reason == pb.FINISH_REASON_LENGTH for r in replies)


def test_a_killed_actor_is_restarted_and_serves_again(
    cluster: RayCluster, reference_engine: LLMEngine
) -> None:
    decode = cluster.actors["ray-decode-0"]
    old_pid = ray.get(decode.pid.remote())
    os.kill(old_pid, signal.SIGKILL)  # a crash, not a polite stop: Ray must notice
    # Calls on the handle are retried on the restarted actor (max_task_retries); the
    # first may still reach the dying process, so ask until another process answers.
    deadline = time.monotonic() + 120
    while ray.get(decode.pid.remote(), timeout=120) == old_pid:
        assert time.monotonic() < deadline, "Ray did not restart the killed actor"
        time.sleep(0.2)
    assert ray.get(decode.worker_id.remote()) == "ray-decode-0"
    wait_registered([decode], time.monotonic() + 60)
    expected = _offline(reference_engine, 8)
    # The router may still hold the dead address until it hears the new registration
    # or times the old one out; it retries on failure, so a request soon succeeds.
    deadline = time.monotonic() + 60
    while True:
        try:
            assert asyncio.run(_serve(cluster.router_address, 8)) == expected
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_a_stopped_actor_drains_its_stream(
    cluster: RayCluster, reference_engine: LLMEngine
) -> None:
    """``stop()`` on an actor (what stopping the cluster does) drains like SIGTERM on a
    process worker: the stream in flight ends with every token, none is cut."""
    decode = cluster.actors["ray-decode-0"]
    prompt = list(range(400, 430))  # tests/e2e/test_drain.py's: its reference is known

    async def stream_then_stop() -> Completion:
        async with channel(cluster.router_address) as ch:
            seen = Completion()
            stream = asyncio.create_task(
                generate(inference_pb2_grpc.InferenceStub(ch), request(prompt, LONG), into=seen)
            )
            while len(seen.tokens) < 4:
                await asyncio.sleep(0.005)
            await asyncio.to_thread(ray.get, decode.stop.remote(), timeout=PATIENT_S + 30)
            assert seen.finals, "stop() returned before the stream it drained had ended"
            return await stream

    got = asyncio.run(stream_then_stop())
    assert got.tokens == offline_tokens(reference_engine, prompt, LONG)
    assert got.final.serving.retries == 0  # finished where it began
    # Leave a serving decode actor for whatever runs next: Ray restarts a killed one.
    ray.kill(decode, no_restart=False)
    wait_registered([decode], time.monotonic() + 120)


def _config(**overrides: object) -> RayClusterConfig:
    """A one-decode-actor cluster without a gateway, on the module's Ray (half a CPU free),
    in a namespace of its own (the module's cluster holds the actor names)."""
    settings: dict = dict(
        prefill=0, decode=1, port=free_port(), loopback_only=True, num_cpus=0.5, num_gpus=0,
        worker_args=WORKER, drain_timeout_s=1, startup_timeout_s=120, namespace="test",
    )  # fmt: skip
    return RayClusterConfig(**{**settings, **overrides})


def test_a_worker_that_fails_to_start_is_one_line(cluster: RayCluster) -> None:
    """A worker actor whose start fails ends the start at once, with its own reason, not
    Ray's remote traceback (an ActorDiedError of 60 lines before)."""
    began = time.monotonic()
    with pytest.raises(RayStartError) as failed:
        start_on_ray(_config(model="/nonexistent/model"))
    message = str(failed.value)
    assert message.startswith("ray-decode-0 failed to start: ModelNotFoundError: unknown model")
    assert "\n" not in message and "Traceback" not in message
    assert time.monotonic() - began < 60


def test_actors_ray_cannot_place_are_refused_at_once(cluster: RayCluster) -> None:
    """More CPUs than the local Ray has: one message now, not a wait until the start timeout
    (then a GetTimeoutError traceback, and a stop that waited 25 s per pending actor)."""
    began = time.monotonic()
    with pytest.raises(RayStartError, match=r"ask for 6 CPUs \(3 each\) but the Ray cluster"):
        start_on_ray(_config(prefill=1, num_cpus=3, startup_timeout_s=10))
    assert time.monotonic() - began < 5


def test_a_start_past_its_timeout_is_one_message(cluster: RayCluster) -> None:
    """--startup-timeout ends the start with StartTimeout (a RuntimeError `tandem up --ray`
    prints as one line) naming what was late and the flag; the actor still loading is
    killed at once, not drained."""
    began = time.monotonic()
    with pytest.raises(StartTimeout, match=r"did not start serving .*--startup-timeout"):
        start_on_ray(_config(startup_timeout_s=1))
    assert time.monotonic() - began < 15


SIGTERMED = """
import sys
from services.launcher import ray_cluster
from services.launcher.supervise import interrupt_on_sigterm

wait_serving = ray_cluster._wait_serving


def waiting(*args, **kwargs):
    print("waiting", flush=True)
    return wait_serving(*args, **kwargs)


ray_cluster._wait_serving = waiting
interrupt_on_sigterm()  # as run_on_ray does, before Ray starts
config = ray_cluster.RayClusterConfig(address=sys.argv[1], router="127.0.0.1:1", prefill=0,
                                      decode=0, startup_timeout_s=60)
try:
    ray_cluster.start_on_ray(config)
except KeyboardInterrupt:
    print("interrupted: stopping in order", flush=True)
"""


def test_sigterm_still_stops_in_order_after_ray_init(cluster: RayCluster) -> None:
    """``ray.init`` puts in its own SIGTERM handler, which exits at once (status 15):
    ``tandem up --ray`` then never ran its stop (no drain, no order, no "stopping")."""
    gcs = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERMED, gcs], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "waiting"  # Ray joined, the router awaited
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "interrupted: stopping in order" in out
    assert proc.returncode == 0


class _Registered:
    """A stand-in worker actor (no model): answers ``registered()`` as a serving one does."""

    def registered(self) -> bool:
        return True


def test_an_actor_ray_will_not_restart_is_reported(
    cluster: RayCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tandem up --ray` supervises its actors too: one Ray will not bring back is named
    (the launcher then stops, as when the router exits), one alive or restarting is not."""
    monkeypatch.setattr("services.launcher.ray_cluster.ACTOR_PROBE_S", 0.0)
    probe = ray.remote(_Registered).options(num_cpus=0, max_restarts=0).remote()
    cluster.actors["probe"] = probe
    try:
        ray.get(probe.registered.remote(), timeout=60)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # every actor alive: nothing lost
            assert cluster.lost_actors() == []
            time.sleep(0.05)
        ray.kill(probe, no_restart=True)
        deadline, lost = time.monotonic() + 30, []
        while not lost and time.monotonic() < deadline:
            lost = cluster.lost_actors()
            time.sleep(0.05)
        assert lost == ["worker actor probe (Ray will not restart it)"]
    finally:
        cluster.actors.pop("probe", None)
        cluster._probes.pop("probe", None)

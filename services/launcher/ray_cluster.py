"""Place prefill and decode workers as Ray actors on a Ray cluster.

Each actor hosts a real worker, the same ``services.worker.host.WorkerHost`` that
``tandem prefill`` / ``tandem decode`` run, and the worker registers with the router
over gRPC like any other: the router knows nothing of Ray. Ray adds placement (each
actor asks for its CPUs and, where the cluster has GPUs, one GPU) and supervision:
actors are created with ``max_restarts``, so when an actor's process dies Ray starts a
new one, whose constructor starts the worker again under the same worker id; the
worker re-registers and the router's stale state for that id is replaced.

The worker runs on its own thread with its own asyncio loop, started from the actor's
constructor, because a restarted actor runs only its constructor: serving must begin
there, not in a method someone has to call again.

The router runs where this launcher runs (``tandem router`` as a child process,
listening on every interface, or on loopback only with ``loopback_only``) unless an
existing router is given. With
``RayClusterConfig.gateway`` set (``tandem up --ray``'s default), a ``tandem gateway`` runs
here too, in front: it takes ``port`` (the door clients use) and the router moves to a free
port behind it, as with ``services.launcher.local``. Every Ray node needs Tandem installed
(the deploy/Dockerfile image, or the same virtual environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from services.launcher.launched import LAUNCHER_PID
from services.launcher.local import KILL_AFTER_DRAIN_S, GatewaySpec, StartTimeout, free_port
from services.launcher.progress import StartProgress
from services.launcher.supervise import interrupt_on_sigterm, supervise
from services.rpc.channel_options import RECONNECT_OPTIONS
from services.rpc.health_wait import NotServing, wait_serving
from services.stubs.tandem.v1 import inference_pb2 as pb
from services.stubs.tandem.v1 import inference_pb2_grpc

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
ACTOR_PROBE_S = 5.0
"""How often a running ``tandem up --ray`` asks its worker actors whether they are alive."""
PROBE_S = 5.0
"""How long ``start_on_ray`` tries to reach a Ray address before it gives up (``ray.init``
on a GCS address that does not answer retries for ever, deaf to Ctrl-C)."""


class RayStartError(RuntimeError):
    """Ray could not be reached, or a worker actor could not be placed or started: one
    line saying which and why (``tandem up --ray`` prints it instead of a traceback)."""


@dataclass(frozen=True)
class RayClusterConfig:
    address: str | None = None
    """Ray cluster to join (``ray.init(address=...)``, e.g. ``ray://head:10001`` or
    ``auto``); None starts a local Ray instance."""
    model: str = "tandem-tiny"
    prefill: int = 1
    """Prefill actors; 0 runs the decode actors aggregated."""
    decode: int = 1
    router: str | None = None
    """An existing router (host:port) the workers register with; None starts one here."""
    router_host: str | None = None
    """The address workers use to reach the router this launcher starts; None: this
    machine's address as Ray sees it (reachable from the other Ray nodes)."""
    port: int = 50051
    """Where clients connect: the gateway's port when there is one, else the port of the
    router this launcher starts."""
    gateway: GatewaySpec | None = None
    """Run a ``tandem gateway`` here on ``port`` in front of the router; None: clients call
    the router (development only)."""
    gateway_host: str = "0.0.0.0"
    """Interface the gateway listens on (every one by default, as the router did before
    there was a gateway: clients may be on other machines)."""
    loopback_only: bool = False
    """Bind the router, the gateway and the worker actors to 127.0.0.1 (a local Ray
    instance, where nothing on another machine needs them): the router and workers take
    no credentials, so they must not listen where the network can reach them."""
    trace_exporter: str = "none"
    """``--trace-exporter`` for the router, the gateway and every worker actor (OTLP
    endpoints from the OTEL_EXPORTER_OTLP_* variables; give them to actors through ``env``)."""
    policy: str = "kv-aware"
    router_args: tuple[str, ...] = ()
    """Extra ``tandem router`` flags."""
    worker_args: tuple[str, ...] = ()
    """Extra ``tandem prefill``/``tandem decode`` flags for every worker (engine
    settings such as --kv-cache-gib, --dtype): parsed by the real CLI parser."""
    num_cpus: float = 1.0
    """CPUs each actor reserves from Ray."""
    num_gpus: float | None = None
    """GPUs each actor reserves; None: 1 when the cluster has GPUs, else 0."""
    max_restarts: int = -1
    """How often Ray restarts a dead actor (-1: without limit)."""
    namespace: str | None = None
    """Ray namespace of the named actors (``tandem-ray-decode-0``, ...); None: this driver's
    own. Two clusters started from one driver need different ones (the names would clash)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables for the actors (e.g. TANDEM_HOME), through Ray's runtime_env."""
    ray_init_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``ray.init`` arguments (``num_cpus`` for a local instance, ...)."""
    startup_timeout_s: float = 300.0
    drain_timeout_s: float = 5.0
    """``--drain-timeout-s`` for the router, the gateway and every worker actor: on stop,
    how long streams in flight get to end (each is killed a few seconds after that)."""


def worker_config_from_flags(role: str, model: str, host: str, router: str, worker_id: str,
                             flags: Sequence[str]) -> Any:  # fmt: skip
    """The WorkerConfig ``tandem <role> <flags>`` would run, for this actor's host and id."""
    from services.cli.main import build_parser
    from services.cli.worker import worker_config

    args = build_parser().parse_args([role, *flags])
    return worker_config(args, model=model, host=host, router=router, worker_id=worker_id)


def _configure_tracing(role: str, flags: Sequence[str], worker_id: str) -> None:
    """What ``tandem <role> --trace-exporter …`` would do, in this actor's process."""
    from services.cli.main import build_parser
    from services.cli.telemetry_args import configure

    configure(build_parser().parse_args([role, *flags]), f"tandem-{role}", worker_id)


class WorkerActor:
    """A Ray actor hosting one prefill or decode worker (see the module docstring)."""

    def __init__(self, role: str, model: str, router: str, worker_id: str,
                 flags: Sequence[str], use_gpu: bool, loopback: bool = False) -> None:  # fmt: skip
        import ray

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        flags = list(flags)
        if use_gpu and "--device" not in flags:
            flags += ["--device", "cuda"]  # Ray set CUDA_VISIBLE_DEVICES to our GPU
        host = LOOPBACK if loopback else ray.util.get_node_ip_address()
        self.role = role
        self.config = worker_config_from_flags(role, model, host, router, worker_id, flags)
        _configure_tracing(role, flags, worker_id)  # before the worker's server and channels exist
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._host: Any = None
        self._thread = threading.Thread(target=self._serve, name=f"tandem-{role}", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            cause = f"{type(self._error).__name__}: {self._error}"
            # The message carries the cause: Ray hands the launcher only the text.
            raise RuntimeError(f"{worker_id} failed to start: {cause}") from self._error

    def _serve(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        from services.stubs.tandem.v1 import worker_pb2 as wpb
        from services.worker.host import WorkerHost

        if self.role == "prefill":
            from services.prefill.server import _servicers

            role = wpb.WORKER_ROLE_PREFILL
        else:
            from services.decode.server import _servicers

            role = wpb.WORKER_ROLE_DECODE
        self._loop = asyncio.get_running_loop()
        host = WorkerHost(self.config, role)
        try:
            await host.start(_servicers)
        except BaseException as exc:
            self._error = exc
            self._started.set()
            await host.stop()
            return
        self._host = host
        self._started.set()
        await host._stop.wait()  # set by stop() below, or when the router refuses us
        await host.stop()
        if host.refused is not None:
            # A refused worker must not linger as a live actor serving nothing: end the
            # process, and Ray's restart policy decides what happens next.
            log.error("the router refused this worker; exiting")
            os._exit(1)

    def address(self) -> str:
        """host:port the worker serves on (and registered with the router)."""
        return self._host.address

    def worker_id(self) -> str:
        return self._host.worker_id

    def registered(self) -> bool:
        """Whether the router knows this worker now: one real heartbeat (the worker's own
        load figures, as the heartbeat loop sends), which the router answers NOT_FOUND
        for a worker it has not registered. False once stopped: a call that reaches an
        actor being replaced (``ray.kill`` with a restart) finds its loop closed."""
        if self._loop.is_closed():
            return False
        coroutine = self._heartbeat()
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        except RuntimeError:  # closed between the check and the call
            coroutine.close()
            return False
        return future.result(timeout=10)

    async def _heartbeat(self) -> bool:
        from services.rpc.server import client_channel
        from services.stubs.tandem.v1 import worker_pb2 as wpb
        from services.stubs.tandem.v1 import worker_pb2_grpc

        host = self._host
        async with client_channel(self.config.router) as channel:
            beat = wpb.HeartbeatRequest(worker_id=host.worker_id, load=await host.load())
            try:
                await worker_pb2_grpc.RegistryStub(channel).Heartbeat(beat, timeout=5)
            except grpc.aio.AioRpcError:
                return False
        return True

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        """Graceful stop, as SIGTERM on a process worker: drain (the router stops placing
        work here at the first draining heartbeat; calls in flight and held prefills finish,
        for at most the worker's ``--drain-timeout-s``), then stop."""
        if self._loop is None or self._host is None:
            return
        drained = asyncio.run_coroutine_threadsafe(self._host.drain(), self._loop)
        with contextlib.suppress(Exception):  # a failed drain still ends in the stop below
            drained.result(timeout=self.config.drain_timeout_s + 5)
        self._loop.call_soon_threadsafe(self._host._stop.set)
        self._thread.join(timeout=15)


@dataclass
class RayCluster:
    """Started by :func:`start_on_ray`; ``stop()`` ends the actors and the router."""

    config: RayClusterConfig
    router_address: str
    actors: dict[str, Any] = field(default_factory=dict)
    """Actor handles by worker id (``prefill-0``, ``decode-1``, ...)."""
    router_process: subprocess.Popen | None = None
    owns_ray: bool = False
    gateway_process: subprocess.Popen | None = None
    gateway_address: str | None = None
    serving: set[str] = field(default_factory=set)
    """Worker ids whose actor served and registered (all of them once started): ``stop``
    drains these and kills the rest at once (one still loading has nothing to finish)."""
    _probes: dict[str, Any] = field(default_factory=dict)
    """Worker id → a ``registered()`` call in flight, asked by ``lost_actors``."""
    _next_probe: float = 0.0

    @property
    def address(self) -> str:
        """Where clients connect: the gateway, if any, else the router."""
        return self.gateway_address or self.router_address

    def dead_processes(self) -> list[str]:
        """Names of the local services (router, gateway) that have exited."""
        local = (("router", self.router_process), ("gateway", self.gateway_process))
        return [name for name, p in local if p is not None and p.poll() is not None]

    def lost_actors(self) -> list[str]:
        """Worker actors Ray will not bring back (restarts used up, or a restart whose
        worker failed to start), looked for at most every ACTOR_PROBE_S: without this the
        launcher served on with a pool short of a worker, saying nothing. An actor being
        restarted is not lost: its call waits for the new one (max_task_retries)."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        now = time.monotonic()
        if now < self._next_probe or not self.actors:
            return []
        self._next_probe = now + ACTOR_PROBE_S
        for worker_id, actor in self.actors.items():
            if worker_id not in self._probes:
                self._probes[worker_id] = actor.registered.remote()
        ready, _ = ray.wait(list(self._probes.values()), num_returns=len(self._probes), timeout=0)
        lost = []
        for worker_id, probe in list(self._probes.items()):
            if probe not in ready:
                continue  # busy or restarting: asked again once it answers
            del self._probes[worker_id]
            try:
                ray.get(probe)
            except ActorUnavailableError:
                pass  # restarting
            except RayActorError:
                lost.append(f"worker actor {worker_id} (Ray will not restart it)")
        return lost

    def stop(self) -> None:
        import ray

        drain = self.config.drain_timeout_s
        _terminate(self.gateway_process, drain)  # the door first: no new requests
        # Every actor drains at once, under one deadline (an actor Ray never placed answers
        # no call: waiting for each in turn took that long once per such actor); already
        # dead, or Ray going down: killed all the same.
        stopping = [a.stop.remote() for wid, a in self.actors.items() if wid in self.serving]
        if stopping:
            with contextlib.suppress(Exception):
                ray.wait(stopping, num_returns=len(stopping), timeout=drain + KILL_AFTER_DRAIN_S)
        for actor in self.actors.values():
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self.actors.clear()
        self.serving.clear()
        _terminate(self.router_process, drain)
        if self.owns_ray:
            ray.shutdown()


def start_on_ray(config: RayClusterConfig, progress: StartProgress | None = None) -> RayCluster:
    """Join (or start) Ray, start or reuse the router, create the worker actors (and the
    gateway), and return once every one serves and the model is listed by the router.

    ``progress`` hears what is awaited and what became ready, as ``LocalCluster``'s does.
    Failures are RuntimeErrors of one line: RayStartError (Ray unreachable, an actor that
    cannot be placed or failed to start, a local service that exited) or StartTimeout
    (past ``config.startup_timeout_s``); everything started is stopped first."""
    import ray

    progress = progress or StartProgress(None)
    owns_ray = not ray.is_initialized()
    if owns_ray:
        _connect(config)
    cluster: RayCluster | None = None
    try:
        num_gpus = config.num_gpus
        if num_gpus is None:
            num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        _check_resources(config, num_gpus)
        router_process = None
        router = config.router
        if router is None:
            # behind a gateway the router leaves `port` to it and takes a free one
            router_port = free_port() if config.gateway else config.port
            router_host = (
                LOOPBACK
                if config.loopback_only
                else config.router_host or ray.util.get_node_ip_address()
            )
            router_process = _start_router(config, router_port)
            router = f"{router_host}:{router_port}"
        cluster = RayCluster(config, router, router_process=router_process, owns_ray=owns_ray)
        actor_class = ray.remote(WorkerActor)
        # Ours first, so a --drain-timeout-s in worker_args wins.
        flags = ("--drain-timeout-s", f"{config.drain_timeout_s:g}", *config.worker_args)
        if config.trace_exporter != "none":
            flags += ("--trace-exporter", config.trace_exporter)
        for role, count in (("prefill", config.prefill), ("decode", config.decode)):
            for i in range(count):
                worker_id = f"ray-{role}-{i}"
                cluster.actors[worker_id] = actor_class.options(
                    name=f"tandem-{worker_id}",
                    namespace=config.namespace,
                    num_cpus=config.num_cpus,
                    num_gpus=num_gpus,
                    max_restarts=config.max_restarts,
                    # a call in flight when the actor dies is retried on the restarted one
                    max_task_retries=-1 if config.max_restarts else 0,
                ).remote(
                    role, config.model, router, worker_id, flags, num_gpus > 0,
                    config.loopback_only,
                )  # fmt: skip
        if config.gateway is not None:
            # started with the workers (it serves before they register), as tandem up does
            cluster.gateway_process = _start_gateway(config, config.gateway, router)
            listen = LOOPBACK if config.loopback_only else config.gateway_host
            host = LOOPBACK if listen in ("0.0.0.0", "::", "") else listen
            cluster.gateway_address = f"{host}:{config.port}"
        names = ["router"] if router_process is not None else []
        names += [*cluster.actors, *(["gateway"] if cluster.gateway_process else [])]
        # the router serving, each actor, the gateway, then the model registered
        progress.started(names, 1 + len(cluster.actors) + (config.gateway is not None) + 1)
        deadline = time.monotonic() + config.startup_timeout_s
        _wait_serving(router, deadline, router_process, "router", progress)
        for worker_id, actor in cluster.actors.items():
            _wait_actor(cluster, worker_id, actor, num_gpus, deadline, progress)
        if cluster.gateway_address is not None:
            gateway = cluster.gateway_address
            _wait_serving(gateway, deadline, cluster.gateway_process, "gateway", progress)
        wait_model_listed(router, config.model, deadline, progress)
    except BaseException:
        progress.close()  # before the error is printed, or the stop's lines
        if cluster is not None:
            cluster.stop()
        elif owns_ray:
            ray.shutdown()
        raise
    progress.close()
    return cluster


def _connect(config: RayClusterConfig) -> None:
    """``ray.init`` for ``config``: RayStartError when the address does not answer (Ray would
    retry for ever), the caller's SIGTERM handler kept (``ray.init`` replaces it with one
    that exits at once: ``tandem up --ray`` then stopped nothing in order, exit status 15)."""
    import ray

    # None would let ray.init join whatever cluster RAY_ADDRESS (set on Ray and KubeRay
    # nodes) or the last `ray start` names, while everything bound loopback as if local.
    address = config.address or "local"
    if address not in ("auto", "local"):
        _probe(address)
    runtime_env = {"env_vars": dict(config.env)} if config.env else None
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address, runtime_env=runtime_env, **config.ray_init_kwargs)
    except ConnectionError as exc:
        raise RayStartError(f"cannot connect to the Ray cluster at {address}: {exc}") from exc
    finally:
        if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)


def _probe(address: str) -> None:
    """RayStartError unless something accepts TCP connections at ``address``
    (``[ray://]host:port``)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_S):
            pass
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or "timeout"
        raise RayStartError(
            f"cannot reach the Ray cluster at {address} ({why}): give the head node's GCS "
            "address (host:6379), ray://host:10001 for Ray Client, 'auto' on a cluster node, "
            "or no address for a local Ray instance"
        ) from exc


def _check_resources(config: RayClusterConfig, num_gpus: float) -> None:
    """RayStartError when the actors ask for more CPUs or GPUs than the Ray cluster has in
    all: Ray would hold them pending until the start timed out. Only for a local instance
    (``address`` None): a remote cluster's autoscaler may add nodes, so there it is a
    warning."""
    import ray

    actors = config.prefill + config.decode
    total = ray.cluster_resources()
    for resource, each in (("CPU", config.num_cpus), ("GPU", num_gpus)):
        need, have = each * actors, total.get(resource, 0.0)
        if need <= have:
            continue
        message = (
            f"the {actors} worker actors ask for {need:g} {resource}s ({each:g} each) but "
            f"the Ray cluster has {have:g}"
        )
        if config.address is None:
            raise RayStartError(f"{message}: run fewer workers (--prefill/--decode)")
        log.warning("%s: they wait until nodes are added", message)


def _wait_actor(cluster: RayCluster, worker_id: str, actor: Any, num_gpus: float,
                deadline: float, progress: StartProgress) -> None:  # fmt: skip
    """Wait until ``actor`` was placed, its worker serves and the router registered it."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError

    progress.waiting(f"{worker_id} to serve")
    asked = None
    while True:
        progress.tick()
        if dead := cluster.dead_processes():
            raise RayStartError(f"the {' and '.join(dead)} exited while the workers started")
        asked = asked or actor.registered.remote()
        done, _ = ray.wait([asked], timeout=min(1.0, max(0.0, deadline - time.monotonic())))
        if done:
            try:
                if ray.get(asked):
                    break
            except ActorUnavailableError:
                pass  # being restarted: ask again
            except RayActorError as exc:
                raise RayStartError(_actor_failure(worker_id, exc)) from None
            asked = None
        if time.monotonic() > deadline:
            free = ray.available_resources()
            asks = f"{cluster.config.num_cpus:g} CPU" + (f", {num_gpus:g} GPU" if num_gpus else "")
            raise StartTimeout(
                f"{worker_id} did not start serving within {cluster.config.startup_timeout_s:g} "
                f"s (tandem up --startup-timeout); each worker actor asks Ray for {asks}, and "
                f"Ray has {free.get('CPU', 0):g} CPU, {free.get('GPU', 0):g} GPU free now "
                "(an actor not placed waits for them); the actor's output is above"
            )
        if not done:
            continue
        time.sleep(0.2)
    cluster.serving.add(worker_id)
    progress.ready(worker_id)


def _actor_failure(worker_id: str, error: Exception) -> str:
    """One line from Ray's actor error (a whole remote traceback): the worker's own
    "ID failed to start: …" when its constructor raised, else Ray's first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if f"{worker_id} failed to start:" in line:
            return line[line.index(worker_id) :] + " (the actor's output is above)"
    return f"{worker_id} died while starting: {lines[0] if lines else type(error).__name__}"


def _announce(cluster: RayCluster) -> str:
    config = cluster.config
    return (
        f"Tandem is up on Ray ({config.prefill} prefill + {config.decode} decode actors, "
        f"model {config.model}): connect to {cluster.address} (tandem.v1.Inference). "
        "Ray restarts a worker actor that dies. Ctrl-C stops everything."
    )


def run_on_ray(
    config: RayClusterConfig,
    announce: Callable[[RayCluster], str] = _announce,
    progress: StartProgress | None = None,
    start_failed: Callable[[RuntimeError], Exception] | None = None,
) -> int:
    """``tandem up --ray``: start (saying so on ``progress``), print ``announce``'s line
    (where to connect), serve until Ctrl-C/SIGTERM, until the router or gateway here exits
    or until Ray gives up on a worker actor. ``start_failed`` maps a RuntimeError of the
    start (not of the stop that follows serving) to the exception to raise instead."""
    interrupt_on_sigterm()
    try:
        cluster = start_on_ray(config, progress)
    except RuntimeError as exc:
        if start_failed is None:
            raise
        raise start_failed(exc) from exc
    print(announce(cluster), flush=True)
    return supervise(
        lambda: " and ".join(cluster.dead_processes() + cluster.lost_actors()), cluster.stop
    )


LOOPBACK = "127.0.0.1"


def _start_router(config: RayClusterConfig, port: int) -> subprocess.Popen:
    host = LOOPBACK if config.loopback_only else "0.0.0.0"
    args = [
        "router", "--host", host, "--port", str(port), "--policy", config.policy,
        *config.router_args,
    ]  # fmt: skip
    return _start_local(config, args)


def _start_gateway(config: RayClusterConfig, spec: GatewaySpec, router: str) -> subprocess.Popen:
    host = LOOPBACK if config.loopback_only else config.gateway_host
    args = [
        "gateway", "--host", host, "--port", str(config.port),
        "--router", router, "--policy", str(spec.policy), "--store", spec.store, *spec.args,
    ]  # fmt: skip
    return _start_local(config, args)


def _start_local(config: RayClusterConfig, args: list[str]) -> subprocess.Popen:
    """``tandem <args>`` as a child process here (output to this terminal), draining for at
    most ``config.drain_timeout_s`` on SIGTERM: below ``_terminate``'s kill."""
    args = [*args, "--drain-timeout-s", f"{config.drain_timeout_s:g}"]
    if config.trace_exporter != "none":
        args = [*args, "--trace-exporter", config.trace_exporter]
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", *args],
        # The launcher's pid: the child stops itself if the launcher dies (a kill -9), as
        # the local launcher's children do, instead of serving on as an orphan.
        env={**os.environ, "PYTHONUNBUFFERED": "1", LAUNCHER_PID: str(os.getpid())},
    )


def _terminate(process: subprocess.Popen | None, drain_s: float) -> None:
    """SIGTERM (graceful: a drain of ``drain_s``), SIGKILL ``KILL_AFTER_DRAIN_S`` later."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(drain_s + KILL_AFTER_DRAIN_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_serving(
    address: str,
    deadline: float,
    process: subprocess.Popen | None,
    name: str = "router",
    progress: StartProgress | None = None,
) -> None:
    progress = progress or StartProgress(None)

    def check_alive() -> None:
        if process is not None and process.poll() is not None:
            raise RayStartError(
                f"the {name} exited with status {process.returncode} while starting "
                "(its output is above)"
            )
        progress.tick()

    progress.waiting(f"{name} to serve")
    with grpc.insecure_channel(address, options=RECONNECT_OPTIONS) as channel:
        try:
            wait_serving(channel, f"the {name} at {address}", deadline, check_alive)
        except NotServing as late:
            raise StartTimeout(
                f"the {name} at {address} did not start serving in time "
                "(tandem up --startup-timeout)" + late.hint()
            ) from None
    progress.ready(name)


def wait_model_listed(
    router: str, model: str, deadline: float, progress: StartProgress | None = None
) -> None:
    """Wait until the router lists ``model`` (some worker serving it has registered)."""
    progress = progress or StartProgress(None)
    progress.waiting(f"a worker to register {model} with the router")
    with grpc.insecure_channel(router, options=RECONNECT_OPTIONS) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        while time.monotonic() < deadline:
            progress.tick()
            try:
                models = stub.ListModels(pb.ListModelsRequest(), timeout=2.0).models
                if any(m.id == model for m in models):
                    progress.ready(model, "registered with the router")
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise StartTimeout(
        f"no worker registered {model} with the router at {router} in time "
        "(tandem up --startup-timeout)"
    )

"""Run the router and its workers (and optionally a gateway in front) as child processes.

Every child is a ``tandem <service>`` process on a port chosen here, so the
launcher can wait for each to report SERVING on grpc.health.v1 before
declaring the system up. With ``ClusterConfig.gateway`` set, the gateway takes ``port`` (the
public door) and the router moves to a free loopback port behind it. Children are stopped
with SIGTERM, on which each drains (finishes its streams, refusing new ones) for at most
``ClusterConfig.drain_timeout_s``, then SIGKILL a few seconds after that; a child that dies
on its own is reported by name.

With ``ClusterConfig.tls_dir`` every child gets a certificate from a development CA there
(``services.rpc.tls_dev_ca``): every internal hop is mTLS, and the public port is TLS with
the gateway's (or, without a gateway, the router's) certificate.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.launcher.launched import LAUNCHER_PID
from services.launcher.progress import StartProgress
from services.rpc.channel_options import RECONNECT_OPTIONS
from services.rpc.health_wait import NotServing, wait_serving
from services.rpc.tls import TlsConfig, channel_credentials
from services.stubs.tandem.v1 import inference_pb2 as pb
from services.stubs.tandem.v1 import inference_pb2_grpc

RESTART_WINDOW_S = 60.0
"""The window ``ClusterConfig.worker_restarts`` counts restarts in: a worker that keeps
exiting (a bad flag, no memory) is left dead rather than restarted forever."""
WORKER_ROLES = ("prefill-", "decode-")
"""Name prefixes of the children ``restart_dead_workers`` may start again."""


@dataclass(frozen=True)
class GatewaySpec:
    """A ``tandem gateway`` in front of the router (``tandem up``'s default)."""

    policy: Path
    """The gateway's policy file (models, roles, default limits)."""
    store: str
    """Its store URL, e.g. ``sqlite:<state dir>/gateway.db``."""
    args: tuple[str, ...] = ()
    """Extra ``tandem gateway`` flags."""


@dataclass(frozen=True)
class ClusterConfig:
    model: str = "tandem-tiny"
    """Model every worker serves."""
    prefill: int = 1
    """Prefill workers; 0 runs decode workers in aggregated mode."""
    decode: int = 1
    """Decode workers."""
    port: int = 50051
    """Where clients connect: the gateway's port when there is one, else the router's."""
    host: str = "127.0.0.1"
    policy: str = "kv-aware"
    """Router placement policy."""
    kv_transport: str = "auto"
    """nixl, grpc or auto."""
    worker_args: tuple[str, ...] = ()
    """Extra flags for every worker (engine settings)."""
    prefill_args: tuple[str, ...] = ()
    """Extra flags for prefill workers only."""
    decode_args: tuple[str, ...] = ()
    """Extra flags for decode workers only."""
    router_args: tuple[str, ...] = ()
    """Extra flags for the router."""
    metrics: bool = False
    """Give every worker a Prometheus /metrics port (``Child.metrics_port``)."""
    log_dir: Path | None = None
    """Where each child's output goes (one file per child); None inherits stderr."""
    startup_timeout_s: float = 180.0
    """How long to wait for every service to be SERVING and registered."""
    gateway: GatewaySpec | None = None
    """Put a gateway on ``port`` in front of the router; None: clients call the router."""
    trace_exporter: str = "none"
    """``--trace-exporter`` for every child (gateway, router, workers): one trace per request
    across all of them. OTLP endpoints come from the OTEL_EXPORTER_OTLP_* variables, which
    the children inherit."""
    worker_restarts: int = 3
    """How often ``restart_dead_workers`` starts a worker that exited again within
    ``RESTART_WINDOW_S`` before it leaves it dead (the launcher then stops everything);
    0: never restart."""
    drain_timeout_s: float = 5.0
    """``--drain-timeout-s`` for every child: on stop, how long streams in flight get to end.
    Short, as a person stopping a local stack expects, and below ``stop``'s kill grace, so a
    gateway is never killed with usage still to write."""
    tls_dir: Path | None = None
    """A development CA's directory (``services.rpc.tls_dev_ca.DevCa``; made there when it
    has none): each child gets its own certificate from it and requires mTLS from its
    callers, except the gateway's public port, which asks no client certificate. Clients
    verify with ``<tls_dir>/ca.pem``. None: plaintext everywhere."""


@dataclass
class Child:
    name: str
    port: int
    process: subprocess.Popen
    log_path: Path | None = None
    metrics_port: int = 0
    args: tuple[str, ...] = ()
    """The ``tandem`` command line it runs (to start it again)."""
    restarts: list[float] = field(default_factory=list)
    """When it was started again after exiting (monotonic seconds)."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class LocalCluster:
    config: ClusterConfig
    children: list[Child] = field(default_factory=list)
    router_port: int = 0
    """The router's port, chosen by ``start`` (``config.port`` without a gateway)."""
    tls: TlsConfig | None = None
    """With ``config.tls_dir``: the launcher's own certificate, signed by the dev CA, which
    every child accepts (mTLS), the router included; None without TLS."""
    progress: StartProgress = field(default_factory=lambda: StartProgress(None))
    """Where ``start`` says what it waits on and what became ready (silent by default)."""

    @property
    def address(self) -> str:
        """Where clients connect (the gateway, if any, else the router)."""
        return f"{self.config.host}:{self.config.port}"

    @property
    def router_address(self) -> str:
        return f"127.0.0.1:{self.router_port}"

    def start(self) -> None:
        """Start the router, then the workers; return once all serve and registered."""
        cfg = self.config
        self.router_port = free_port() if cfg.gateway else cfg.port
        if cfg.tls_dir is not None:
            self.tls = self._dev_ca().issue("launcher")
        try:
            router_metrics = free_port() if cfg.metrics else 0
            router_args = [
                "router",
                "--port",
                str(self.router_port),
                "--policy",
                cfg.policy,
                "--metrics-port",
                str(router_metrics),
                *cfg.router_args,
            ]
            self._spawn("router", self.router_port, router_args, router_metrics)
            for role, count in (("prefill", cfg.prefill), ("decode", cfg.decode)):
                for i in range(count):
                    self._spawn_worker(role, i)
            if cfg.gateway is not None:
                self._spawn_gateway(cfg.gateway)
            deadline = time.monotonic() + cfg.startup_timeout_s
            names = [c.name for c in self.children]
            self.progress.started(names, len(names) + 1)  # each serving, then registration
            for child in self.children:
                self._wait_serving(child, deadline)
            self._wait_model_listed(deadline)
        except BaseException:
            self.progress.close()  # before the error is printed, or the stop's lines
            self.stop()
            raise
        self.progress.close()

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM every child (the gateway first, the router last), SIGKILL those still
        alive after ``grace_s`` (None: the drain timeout + ``KILL_AFTER_DRAIN_S``). Ctrl-C
        meanwhile (a second one, for ``tandem up``) signals the router and workers again,
        which ends their drains at once; the gateway is left to meter the streams that
        ends, and exits."""
        if grace_s is None:
            grace_s = self.config.drain_timeout_s + KILL_AFTER_DRAIN_S
        self._signal_alive(signal.SIGTERM)
        try:
            self._wait_or_kill(time.monotonic() + grace_s)
        except KeyboardInterrupt:
            print("stopping now ...", file=sys.stderr)
            self._signal_alive(signal.SIGTERM, spare="gateway")
            self._wait_or_kill(time.monotonic() + SECOND_SIGNAL_GRACE_S)

    def _signal_alive(self, signum: int, spare: str | None = None) -> None:
        for child in reversed(self.children):
            if child.process.poll() is None and child.name != spare:
                child.process.send_signal(signum)

    def _wait_or_kill(self, deadline: float) -> None:
        for child in self.children:
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def dead_children(self) -> list[Child]:
        return [c for c in self.children if c.process.poll() is not None]

    def restart_dead_workers(self) -> list[str]:
        """Start again, on the same port and id, every worker that exited and has restarts
        left (``config.worker_restarts`` within ``RESTART_WINDOW_S``); one line per restart
        saying so. The router lets it rejoin and resumes streams on it. A router or gateway
        that exited, or a worker out of restarts, stays in ``dead_children``."""
        said = []
        now = time.monotonic()
        for i, child in enumerate(self.children):
            code = child.process.poll()
            if code is None or not child.name.startswith(WORKER_ROLES):
                continue
            recent = [t for t in child.restarts if now - t < RESTART_WINDOW_S]
            if len(recent) >= self.config.worker_restarts:
                continue
            self.children[i] = self._start(
                child.name, child.port, child.args, child.metrics_port, again=True
            )
            self.children[i].restarts.extend([*recent, now])
            said.append(
                f"{child.name} exited with status {code}{_output_in(child)}; started it again "
                f"({len(recent) + 1} of {self.config.worker_restarts} within "
                f"{RESTART_WINDOW_S:g} s)"
            )
        return said

    # --------------------------------------------------------------- internals
    def _spawn_worker(self, role: str, index: int) -> None:
        cfg = self.config
        port = free_port()
        metrics_port = free_port() if cfg.metrics else 0
        role_args = cfg.prefill_args if role == "prefill" else cfg.decode_args
        args = [
            role, "--port", str(port), "--router", self.router_address, "--model", cfg.model,
            "--worker-id", f"{role}-{index}", "--kv-transport", cfg.kv_transport,
            "--metrics-port", str(metrics_port), *cfg.worker_args, *role_args,
        ]  # fmt: skip
        self._spawn(f"{role}-{index}", port, args, metrics_port)

    def _spawn_gateway(self, spec: GatewaySpec) -> None:
        cfg = self.config
        metrics_port = free_port() if cfg.metrics else 0
        args = [
            "gateway", "--port", str(cfg.port), "--host", cfg.host,
            "--router", self.router_address, "--policy", str(spec.policy),
            "--store", spec.store, "--metrics-port", str(metrics_port), *spec.args,
        ]  # fmt: skip
        self._spawn("gateway", cfg.port, args, metrics_port)

    def _spawn(self, name: str, port: int, args: list[str], metrics_port: int = 0) -> None:
        self.children.append(self._start(name, port, tuple(args), metrics_port))

    def _start(
        self, name: str, port: int, args: tuple[str, ...], metrics_port: int, again: bool = False
    ) -> Child:
        """Launch one ``tandem`` service with its output in ``<log_dir>/<name>.log`` (added
        to, when it is started ``again``, so the last run's end stays readable)."""
        # Right after the service's name: a --drain-timeout-s in ``args`` (later) wins.
        drain = ("--drain-timeout-s", f"{self.config.drain_timeout_s:g}")
        command = [args[0], *drain, *args[1:]]
        if self.config.trace_exporter != "none":
            command += ["--trace-exporter", self.config.trace_exporter]
        if self.config.tls_dir is not None:
            # The child's own name and the public host too, beside the loopback names.
            host = self.config.host
            extra = () if host in ("0.0.0.0", "::", "") else (host,)
            tls = self._dev_ca().issue(name, extra)
            command += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
            command += ["--tls-ca", str(tls.ca)]
        log_path = None
        out = contextlib.nullcontext()
        if self.config.log_dir is not None:
            self.config.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.config.log_dir / f"{name}.log"
            out = log_path.open("a" if again else "w")
        with out as stream:
            process = subprocess.Popen(
                [sys.executable, "-m", "services.cli.main", *command],
                stdout=stream,
                stderr=subprocess.STDOUT if stream else None,
                env=_child_env(),
                start_new_session=True,  # Ctrl-C reaches the launcher only; it stops children
            )  # no preexec_fn: see services/launcher/launched.py
        return Child(name, port, process, log_path, metrics_port, args)

    def _dev_ca(self):  # type: ignore[no-untyped-def]
        """The CA in ``config.tls_dir``, created there when it holds none."""
        from services.rpc.tls_dev_ca import DevCa

        assert self.config.tls_dir is not None
        ca = DevCa(self.config.tls_dir)
        if ca.cert.is_file() and ca.key.is_file():
            return ca
        return DevCa.create(self.config.tls_dir)

    def _channel(self, address: str) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(address, options=RECONNECT_OPTIONS)
        return grpc.secure_channel(
            address, channel_credentials(self.tls), options=RECONNECT_OPTIONS
        )

    def _wait_serving(self, child: Child, deadline: float) -> None:
        def alive() -> None:
            self._check_alive(child)
            self.progress.tick()

        self.progress.waiting(f"{child.name} to serve")
        with self._channel(child.address) as channel:
            try:
                wait_serving(channel, child.name, deadline, alive)
            except NotServing as late:
                raise StartTimeout(
                    f"{child.name} did not start serving within "
                    f"{self.config.startup_timeout_s:g} s (tandem up --startup-timeout)"
                    + late.hint()
                    + _output_in(child)
                ) from None
        self.progress.ready(child.name)

    def _wait_model_listed(self, deadline: float) -> None:
        model = self.config.model
        self.progress.waiting(f"a worker to register {model} with the router")
        # Asks the router itself: the gateway in front would want a credential.
        with self._channel(self.router_address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            while time.monotonic() < deadline:
                for child in self.children:
                    self._check_alive(child)
                self.progress.tick()
                models = stub.ListModels(pb.ListModelsRequest(), timeout=2.0).models
                if any(m.id == model for m in models):
                    self.progress.ready(model, "registered with the router")
                    return
                time.sleep(0.2)
        where = f"; the workers' output is in {self.config.log_dir}" if self.config.log_dir else ""
        raise StartTimeout(
            f"no worker registered {model} with the router within "
            f"{self.config.startup_timeout_s:g} s (tandem up --startup-timeout){where}"
        )

    def _check_alive(self, child: Child) -> None:
        code = child.process.poll()
        if code is not None:
            raise RuntimeError(
                f"{child.name} exited with status {code} while starting{_output_in(child)}"
            )


class StartTimeout(RuntimeError):
    """A service did not become ready before the start's deadline (still running)."""


def _output_in(child: Child) -> str:
    """The "; its output is in LOG" that ``up_preflight.start_failed`` reads the reason from."""
    return f"; its output is in {child.log_path}" if child.log_path else ""


KILL_AFTER_DRAIN_S = 5.0
"""How long after its drain timeout a child that has not exited is killed."""
SECOND_SIGNAL_GRACE_S = 3.0
"""After a second Ctrl-C: how long children get to exit before SIGKILL."""
PORT_FLOOR = 20000
"""Lowest port ``free_port`` hands out."""
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now, for a child to bind soon after.

    Drawn at random from below the kernel's ephemeral range: a port the kernel chose
    (``bind(0)``) goes back into that range once released, where any outgoing connection
    may take it as its local port before the child binds it (a cluster start then failed
    with "Address already in use"). Never the same port twice in one process.
    """
    ceiling = _ephemeral_floor()
    for _ in range(200):
        port = random.randrange(PORT_FLOOR, ceiling) if ceiling > PORT_FLOOR + 1000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free loopback port found")


def _ephemeral_floor() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768 when unknown)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


TLS_ENVIRONMENT = (
    "TANDEM_TLS_CERT",
    "TANDEM_TLS_KEY",
    "TANDEM_TLS_CA",
    "TANDEM_METRICS_CLIENT_CA",
)
"""Defaults of the services' TLS flags (services/cli/tls_args.py): the launcher passes its
children's TLS as flags (--tls), so an operator's environment never turns it on half-way."""


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TLS_ENVIRONMENT}
    return env | {"PYTHONUNBUFFERED": "1", LAUNCHER_PID: str(os.getpid())}

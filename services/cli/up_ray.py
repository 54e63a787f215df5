"""``tandem up --ray [ADDRESS]``: the workers as Ray actors instead of local processes.

Kept apart from up.py so that up.py only has to add the flag and hand over:
``add_ray_arg(parser)`` in its ``register`` and, first thing in its handler,
``if args.ray is not None: return up_ray.run(args)``. Ray is imported only then.

As with ``tandem up``, the gateway is the door (``--port``), in front of the router, both
on this machine; an admin key is minted into the gateway's store (``--state-dir``) and
printed once; ``--no-gateway`` puts the router on ``--port`` instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from services.cli import arg_types

if TYPE_CHECKING:
    from services.launcher.ray_cluster import RayClusterConfig

LOCAL = "local"
"""--ray without an address: start a Ray instance on this machine."""


def add_ray_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL,
        default=None,
        metavar="ADDRESS",
        help="place the prefill/decode workers as Ray actors (restarted by Ray when they "
        "die) on the Ray cluster at ADDRESS (e.g. ray://head:10001, or 'auto' on a "
        "cluster node); without ADDRESS, on a local Ray instance. The gateway and the "
        "router run here.",
    )
    parser.add_argument(
        "--ray-cpus-per-worker",
        type=arg_types.positive_float,
        default=1.0,
        metavar="N",
        help="with --ray: CPUs each worker actor reserves from Ray (default %(default)g)",
    )
    parser.add_argument(
        "--ray-gpus-per-worker",
        type=arg_types.non_negative_float,
        default=None,
        metavar="N",
        help="with --ray: GPUs each worker actor reserves; a fraction shares one (0.5: a "
        "prefill and a decode worker on one GPU; size --kv-cache-gib for both) (default: 1 "
        "when the cluster has GPUs, else 0)",
    )


def config_from_args(args: argparse.Namespace) -> RayClusterConfig:
    """The RayClusterConfig that ``tandem up``'s flags describe."""
    from services.launcher.local import free_port
    from services.launcher.ray_cluster import RayClusterConfig

    worker_args: tuple[str, ...] = ()
    if getattr(args, "kv_cache_gib", None):
        worker_args += ("--kv-cache-gib", str(args.kv_cache_gib))
    if getattr(args, "kv_transport", None):
        worker_args += ("--kv-transport", args.kv_transport)
    address = None if args.ray in (None, "", LOCAL) else args.ray
    return RayClusterConfig(
        address=address,
        # A local Ray instance: nothing on another machine needs the router or the workers,
        # which take no credentials, so nothing listens beyond loopback (as `tandem up`).
        loopback_only=address is None,
        model=args.model,
        prefill=args.prefill,
        decode=args.decode,
        port=args.port or free_port(),  # the launcher waits on this port: never 0
        # the router's placement policy: `tandem up --routing-policy` stores it as
        # args.policy (--policy, the gateway's policy file, is args.policy_file)
        policy=getattr(args, "policy", None) or "kv-aware",
        worker_args=worker_args,
        trace_exporter=getattr(args, "trace_exporter", "none"),
        env=_actor_env(getattr(args, "trace_exporter", "none")),
        drain_timeout_s=getattr(args, "drain_timeout_s", 5.0),
        startup_timeout_s=getattr(args, "startup_timeout", None) or 180.0,
        num_cpus=getattr(args, "ray_cpus_per_worker", 1.0),
        num_gpus=getattr(args, "ray_gpus_per_worker", None),
    )


def _actor_env(trace_exporter: str) -> dict[str, str]:
    """The launcher's OTEL_* variables (the OTLP endpoint, headers, resource) for the worker
    actors when tracing is on: actors on other nodes do not inherit this environment, and
    exported to their own node's default endpoint, so traces lost the workers' hops."""
    if trace_exporter == "none":
        return {}
    return {k: v for k, v in os.environ.items() if k.startswith("OTEL_")}


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from services.cli import up
    from services.cli.up_preflight import (
        StartFailed,
        check_public_ports,
        forget_temporary_state,
        lock_state_dir,
        start_failed,
    )
    from services.engine.model_source import resolve_model
    from services.launcher.progress import StartProgress

    try:
        import ray  # noqa: F401 - said here, not in the middle of the start
    except ImportError as exc:
        raise StartFailed(
            f"--ray needs Ray, which cannot be imported here ({exc}): pip install 'ray>=2.40'"
        ) from exc
    from services.launcher.ray_cluster import RayCluster, run_on_ray

    # the policy file and the ports are checked before Ray or anything else starts
    policy = None if getattr(args, "no_gateway", False) else up._policy_file(args)
    check_public_ports(args.port, getattr(args, "http_port", 0) or 0, gateway=policy is not None)
    if args.ray in (None, "", LOCAL):
        # one local build of tandem-tiny, not one per actor at once (as `tandem up` does);
        # on a remote cluster each node builds its own on first use
        resolve_model(args.model)
    config = config_from_args(args)
    if not config.loopback_only:
        print(
            "note: on a Ray cluster the router and the worker actors listen on the cluster "
            "network and take no credentials (--tls is not supported with --ray yet): keep "
            "that network private; clients go through the gateway",
            file=sys.stderr,
        )
    secret = None
    temporary: Path | None = None  # a state directory this run made: removed at a clean stop
    if policy is not None:
        state_dir = getattr(args, "log_dir", None)
        if state_dir is None:
            state_dir = temporary = Path(tempfile.mkdtemp(prefix="tandem-up-"))
        # another tandem up on this store: its admin key must not be revoked under it
        state_lock = lock_state_dir(state_dir)  # noqa: F841 - held open until this process ends
        http_port = getattr(args, "http_port", 0) or 0
        origins = getattr(args, "cors_origin", None) or ()
        spec, secret = up._gateway(policy, state_dir, args.model, http_port, origins)
        config = dataclasses.replace(config, gateway=spec)
        print(f"the gateway's store: {spec.store}", file=sys.stderr)

    def announce(cluster: RayCluster) -> str:
        line = up._where_to_connect(args, cluster.address, secret)
        return f"{line} Worker actors run on Ray, which restarts one that dies."

    front = "" if config.gateway is None else "a gateway, "
    where = "a local Ray instance" if config.address is None else f"the Ray cluster at {args.ray}"
    print(
        f"starting {front}{args.prefill} prefill + {args.decode} decode worker actors "
        f"on {where} ...",
        file=sys.stderr,
    )
    # Loading a model can take minutes: say what is awaited (a bar on a terminal). A start
    # that fails (Ray unreachable, an actor or service failed or timed out) is one message.
    status = run_on_ray(config, announce, StartProgress(sys.stderr), start_failed)
    if temporary is not None:
        forget_temporary_state(temporary, status)
    return status

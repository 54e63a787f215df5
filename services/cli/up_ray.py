"""``tandem up --ray [ADDRESS]``: the workers as Ray actors instead of local processes.

Kept apart from up.py so that up.py only has to add the flag and hand over:
``add_ray_arg(parser)`` in its ``register`` and, first thing in its handler,
``if args.ray is not None: return up_ray.run(args)``. Ray is imported only then.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

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
        "cluster node); without ADDRESS, on a local Ray instance. The router runs here.",
    )


def config_from_args(args: argparse.Namespace) -> RayClusterConfig:
    """The RayClusterConfig that ``tandem up``'s flags describe."""
    from services.launcher.ray_cluster import RayClusterConfig

    worker_args: tuple[str, ...] = ()
    if getattr(args, "kv_cache_gib", None):
        worker_args += ("--kv-cache-gib", str(args.kv_cache_gib))
    if getattr(args, "kv_transport", None):
        worker_args += ("--kv-transport", args.kv_transport)
    return RayClusterConfig(
        address=None if args.ray in (None, "", LOCAL) else args.ray,
        model=args.model,
        prefill=args.prefill,
        decode=args.decode,
        port=args.port,
        # the router's placement policy (`tandem up --routing-policy`; --policy is the
        # gateway's policy file there)
        policy=getattr(args, "routing_policy", None) or "kv-aware",
        worker_args=worker_args,
    )


def run(args: argparse.Namespace) -> int:
    from services.engine.model_source import resolve_model
    from services.launcher.ray_cluster import run_on_ray

    if args.ray in (None, "", LOCAL):
        # one local build of tandem-tiny, not one per actor at once (as `tandem up` does);
        # on a remote cluster each node builds its own on first use
        resolve_model(args.model)
    return run_on_ray(config_from_args(args))

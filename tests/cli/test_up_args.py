"""`tandem up` flags reach the services it starts: the drain timeout above all, which bounds
how long Ctrl-C waits for streams in flight (locally and on Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.main import build_parser
from services.cli.up import UP_DRAIN_TIMEOUT_S, cluster_config
from services.cli.up_ray import config_from_args
from services.launcher.ray_cluster import worker_config_from_flags
from services.rpc.drain import DEFAULT_DRAIN_TIMEOUT_S


@pytest.mark.parametrize(("flags", "drain_s"), [((), UP_DRAIN_TIMEOUT_S), (("2.5",), 2.5)])
def test_drain_timeout_reaches_both_launchers(
    tmp_path: Path, flags: tuple[str, ...], drain_s: float
) -> None:
    given = ("--drain-timeout-s", *flags) if flags else ()
    args = build_parser().parse_args(["up", *given])
    assert cluster_config(args, tmp_path).drain_timeout_s == drain_s
    ray_args = build_parser().parse_args(["up", "--ray", *given])
    assert config_from_args(ray_args).drain_timeout_s == drain_s


def test_up_drains_faster_than_a_standalone_service() -> None:
    # Ctrl-C on a development cluster should not wait out a production drain.
    assert UP_DRAIN_TIMEOUT_S < DEFAULT_DRAIN_TIMEOUT_S
    assert build_parser().parse_args(["decode"]).drain_timeout_s == DEFAULT_DRAIN_TIMEOUT_S


def test_ray_actor_config_is_the_worker_cli_config_with_its_placement() -> None:
    config = worker_config_from_flags(
        "prefill", "tandem-tiny", "10.0.0.5", "10.0.0.1:50052", "ray-prefill-0",
        ["--drain-timeout-s", "3", "--lease-s", "9"],
    )  # fmt: skip
    assert (config.host, config.router, config.worker_id) == (
        "10.0.0.5",
        "10.0.0.1:50052",
        "ray-prefill-0",
    )
    assert (config.model, config.drain_timeout_s, config.lease_s) == ("tandem-tiny", 3.0, 9.0)

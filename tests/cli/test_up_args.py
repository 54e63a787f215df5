"""`tandem up` flags reach the services it starts: the drain timeout above all, which bounds
how long Ctrl-C waits for streams in flight (locally and on Ray)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from services.cli.main import build_parser
from services.cli.up import UP_DRAIN_TIMEOUT_S, cluster_config
from services.cli.up_ray import config_from_args
from services.launcher import ray_cluster
from services.launcher.launched import LAUNCHER_PID
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


def test_port_0_picks_a_free_port_for_both_launchers(tmp_path: Path) -> None:
    """The launcher waits for the service on the port it was given: 0 waited 180 s and
    failed while the gateway served on the port it had picked."""
    local = cluster_config(build_parser().parse_args(["up", "--port", "0"]), tmp_path).port
    ray = config_from_args(build_parser().parse_args(["up", "--ray", "--port", "0"])).port
    assert 0 < local <= 65535 and 0 < ray <= 65535
    assert cluster_config(build_parser().parse_args(["up"]), tmp_path).port == 50051


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


def test_up_on_a_local_ray_listens_on_loopback_only() -> None:
    # The router and workers take no credentials: on a local Ray nothing else needs them.
    assert config_from_args(build_parser().parse_args(["up", "--ray"])).loopback_only
    remote = build_parser().parse_args(["up", "--ray", "ray://head:10001"])
    assert not config_from_args(remote).loopback_only


def test_ray_launchers_children_stop_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The router and gateway the Ray launcher starts know its pid (services.launcher.launched
    stops them when it dies), as the local launcher's children do."""
    started: list[dict[str, str]] = []
    monkeypatch.setattr(
        ray_cluster.subprocess, "Popen", lambda argv, env: started.append(env) or argv
    )
    config = ray_cluster.RayClusterConfig(loopback_only=True)
    ray_cluster._start_router(config, 50052)
    assert started[0][LAUNCHER_PID] == str(os.getpid())


def test_up_keeps_its_state_private_and_audits_its_admin_keys(tmp_path: Path) -> None:
    from services.cli.up import EXAMPLE_POLICY
    from services.cli.up import _gateway as up_gateway
    from services.gateway.audit import AuditLog
    from services.gateway.store import open_store

    state = tmp_path / "state"
    first = up_gateway(EXAMPLE_POLICY, state, "tandem-tiny")[0]
    up_gateway(EXAMPLE_POLICY, state, "tandem-tiny")  # the next run revokes the last key
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "gateway.db").stat().st_mode) == 0o600
    with open_store(first.store) as store:
        reasons = [r.event.reason for r in AuditLog(store).records()]
    assert [r.split(" key ")[0] for r in reasons] == [
        "tandem up: admin",
        "tandem up: revoked the last run's admin",
        "tandem up: admin",
    ]


def test_up_passes_its_cors_origins_to_the_gateway(tmp_path: Path) -> None:
    """`tandem up --cors-origin O` reaches `tandem gateway --cors-origin O` (with the HTTP
    API on; without it there is nothing for a browser to call)."""
    from services.cli.main import build_parser
    from services.cli.up import EXAMPLE_POLICY
    from services.cli.up import _gateway as up_gateway

    args = build_parser().parse_args(["up", "--cors-origin", "https://a.example"])
    spec = up_gateway(EXAMPLE_POLICY, tmp_path, "tandem-tiny", 8000, args.cors_origin)[0]
    assert spec.args == ("--http-port", "8000", "--cors-origin", "https://a.example")
    off = up_gateway(EXAMPLE_POLICY, tmp_path, "tandem-tiny", 0, args.cors_origin)[0]
    assert off.args == ()

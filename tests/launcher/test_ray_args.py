"""``tandem up --ray``'s flags and the mistakes it reports before (or instead of) starting
Ray: one ``error:`` line each, never a traceback or a hang."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from services.cli.main import build_parser, main
from services.cli.up_ray import config_from_args
from services.launcher.local import free_port


def test_ray_honours_startup_timeout() -> None:
    """--startup-timeout was dropped with --ray (the config's own 300 s applied)."""
    args = build_parser().parse_args(["up", "--ray", "--startup-timeout", "7"])
    assert config_from_args(args).startup_timeout_s == 7
    default = build_parser().parse_args(["up", "--ray"])
    assert config_from_args(default).startup_timeout_s == 180  # tandem up's default


def test_ray_not_installed_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as without Ray
    assert main(["up", "--ray", "--no-gateway", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --ray needs Ray") and "pip install" in err


def test_a_taken_port_is_refused_before_ray_starts(capsys: pytest.CaptureFixture[str]) -> None:
    """As `tandem up`: before, Ray started, the workers loaded, and then the gateway could
    not bind (or the launcher's health check found whatever held the port serving)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        began = time.monotonic()
        assert main(["up", "--ray", "--no-gateway", "--port", str(port)]) == 2
    assert f"port {port} is taken" in capsys.readouterr().err
    assert time.monotonic() - began < 5


def test_an_unreachable_ray_address_is_one_line() -> None:
    """``ray.init`` on a GCS address nothing answers retried for ever, deaf to Ctrl-C."""
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "up", "--ray", address, "--no-gateway"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"error: cannot reach the Ray cluster at {address}" in done.stderr
    assert "Traceback" not in done.stderr


def test_ray_with_both_apis_on_one_port_is_refused_before_ray_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """As `tandem up`: each port alone was free, so Ray and the actors started and the
    gateway then failed to bind ("the gateway exited while the workers started")."""
    began = time.monotonic()
    assert main(["up", "--ray", "--port", "23998", "--http-port", "23998"]) == 2
    assert "error: --http-port: must differ from --port (23998)" in capsys.readouterr().err
    assert time.monotonic() - began < 5


def test_actors_get_the_launchers_otel_variables_when_tracing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Actors on other nodes do not inherit the launcher's environment: with
    --trace-exporter otlp they exported to their node's default endpoint."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    monkeypatch.setenv("UNRELATED", "x")
    traced = build_parser().parse_args(["up", "--ray", "--trace-exporter", "otlp"])
    assert config_from_args(traced).env == {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}
    untraced = build_parser().parse_args(["up", "--ray"])
    assert config_from_args(untraced).env == {}


def test_without_an_address_ray_starts_locally_whatever_ray_address_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ray.init(address=None) joins the cluster RAY_ADDRESS names (set on Ray and KubeRay
    nodes) while the launcher bound everything to loopback as if local."""
    import ray

    from services.launcher import ray_cluster

    monkeypatch.setenv("RAY_ADDRESS", "192.0.2.2:6379")
    seen: list[object] = []
    monkeypatch.setattr(ray, "init", lambda address=None, **kwargs: seen.append(address))
    ray_cluster._connect(ray_cluster.RayClusterConfig(address=None, loopback_only=True))
    assert seen == ["local"]


def test_actor_resources_come_from_their_flags() -> None:
    """A one-GPU box refused the default 1 prefill + 1 decode (a whole GPU each): a fraction
    shares one GPU."""
    args = build_parser().parse_args(
        ["up", "--ray", "--ray-gpus-per-worker", "0.5", "--ray-cpus-per-worker", "2"]
    )
    config = config_from_args(args)
    assert (config.num_gpus, config.num_cpus) == (0.5, 2.0)
    default = config_from_args(build_parser().parse_args(["up", "--ray"]))
    assert (default.num_gpus, default.num_cpus) == (None, 1.0)  # GPUs: 1 where there are any

"""``tandem router``: flags, help, the config they give, and a router importable without torch."""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import textwrap

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli import router as router_cli
from services.router.config import RouterConfig
from services.router.policies import POLICIES

FLAGS = (
    "--port",
    "--host",
    "--policy",
    "--heartbeat-interval-ms",
    "--heartbeat-timeout-ms",
    "--max-retries",
    "--prefill-timeout-ms",
    "--policy-seed",
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tandem")
    router_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["router", *argv])


def test_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in FLAGS:
        assert flag in out
    assert "round-robin" in out and "least-loaded" in out


def test_flags_become_the_router_config() -> None:
    args = parse(
        [
            "--port=7000",
            "--host=0.0.0.0",
            "--policy=round-robin",
            "--heartbeat-interval-ms=200",
            "--heartbeat-timeout-ms=900",
            "--max-retries=5",
            "--prefill-timeout-ms=1500",
            "--policy-seed=7",
        ]
    )
    assert router_cli.router_config(args) == RouterConfig(
        host="0.0.0.0",
        port=7000,
        policy="round-robin",
        policy_seed=7,
        heartbeat_interval_s=0.2,
        heartbeat_timeout_s=0.9,
        max_retries=5,
        prefill_timeout_s=1.5,
    )
    defaults = router_cli.router_config(parse(["--port", "0"]))
    assert defaults == RouterConfig(port=0)
    assert defaults.policy_seed is None  # a fresh seed per process (start_router)
    assert defaults.effective_heartbeat_timeout_s == 3.0


def test_bad_flags_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["--port=1", "--policy=random"],
        ["--port=-1"],
        [],
        ["--port=1", "--max-retries=-1"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            parse(argv)
        assert exit_info.value.code == 2
    args = parse(["--port=1", "--heartbeat-interval-ms=1000", "--heartbeat-timeout-ms=500"])
    assert router_cli.run(args) == 2
    assert "must exceed heartbeat_interval_s" in capsys.readouterr().err


def test_the_cli_lists_exactly_the_registered_policies() -> None:
    assert sorted(router_cli.POLICY_NAMES) == sorted(POLICIES)


def test_the_router_imports_without_torch() -> None:
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import services.router
        for module in pkgutil.iter_modules(services.router.__path__):
            importlib.import_module(f"services.router.{module.name}")
        import services.cli.router
        assert "torch" not in sys.modules, "torch was imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_tandem_router_serves_until_sigterm() -> None:
    script = textwrap.dedent(
        """
        import argparse, logging, sys
        from services.cli import router
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        parser = argparse.ArgumentParser(prog="tandem")
        router.register(parser.add_subparsers())
        args = parser.parse_args(["router", "--port", "0"])
        sys.exit(args.handler(args))
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        match = re.search(r"router listening on 127\.0\.0\.1:(\d+)", line)
        assert match, line
        channel = grpc.insecure_channel(f"127.0.0.1:{match.group(1)}")
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="tandem.v1.Registry"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

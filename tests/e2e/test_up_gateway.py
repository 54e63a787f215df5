"""`tandem up` as a user runs it: the gateway is the door and the printed admin key opens it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import openai

from services.launcher.local import free_port
from services.stubs.tandem.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc
from services.stubs.tandem.v1 import inference_pb2 as pb
from tests.e2e.client import UP_KEY, wait_up


def _tandem(*argv: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``tandem`` CLI as a user would, with ``key`` as TANDEM_API_KEY (or none)."""
    env = {k: v for k, v in os.environ.items() if k != "TANDEM_API_KEY"}
    if key is not None:
        env["TANDEM_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_up_prints_an_admin_key_that_opens_the_gateway(tmp_path: Path, tandem_home: Path) -> None:
    port, http_port, state = free_port(), free_port(), tmp_path / "state"
    stderr = tmp_path / "up.err"
    with stderr.open("w") as err:
        up = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "up", "--prefill", "0", "--decode",
             "1", "--port", str(port), "--state-dir", str(state), "--kv-cache-gib", "0.25",
             "--http-port", str(http_port), "--metrics"],
            stdout=subprocess.PIPE, stderr=err, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        line = wait_up(up)
        # the start's progress, all said before the line above
        assert ready_lines(stderr.read_text()) == [
            "started router, decode-0, gateway",
            "router ready",
            "decode-0 ready",
            "gateway ready",
            "tandem-tiny registered with the router",
        ]
        found = UP_KEY.search(line)
        assert found, line
        secret, target = found.group(1), f"127.0.0.1:{port}"
        endpoints = metrics_endpoints(up)
        assert set(endpoints) == {"gateway", "router", "decode-0"}, endpoints

        generate = _tandem(
            "generate", "--target", target, "--prompt-token-ids", "5,6,7,8", "--max-tokens",
            "4", "--temperature", "0", "--ignore-eos", "--json", key=secret,
        )  # fmt: skip
        assert generate.returncode == 0, generate.stderr
        result = json.loads(generate.stdout)
        assert len(result["token_ids"]) == 4 and result["usage"]["completion_tokens"] == 4
        assert secret not in generate.stdout + generate.stderr
        models = _tandem("models", "--target", target, "--json", key=secret)
        assert models.returncode == 0, models.stderr
        assert [m["id"] for m in json.loads(models.stdout)["models"]] == ["tandem-tiny"]
        keyless = _tandem(
            "generate", "--target", target, "--prompt-token-ids", "5,6", "--max-tokens", "2"
        )
        assert keyless.returncode != 0
        assert "UNAUTHENTICATED" in keyless.stderr and "TANDEM_API_KEY" in keyless.stderr

        with grpc.insecure_channel(target) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = pb.GenerateRequest(model="tandem-tiny", prompt_token_ids=[5], max_tokens=2)
            try:
                list(stub.Generate(request, timeout=30))
                raise AssertionError("a call without a key was served")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
            # the printed key is an admin key: it reads the usage just metered
            usage = admin_pb2_grpc.UsageServiceStub(channel).GetUsage(
                admin_pb2.GetUsageRequest(month=time.strftime("%Y-%m", time.gmtime())),
                metadata=(("authorization", f"Bearer {secret}"),),
                timeout=30,
            )
            assert [(r.model, r.requests, r.completion_tokens) for r in usage.rows] == [
                ("tandem-tiny", 1, 4)
            ]
        # ... and so does `tandem usage` (this month by default)
        usage_cli = _tandem("usage", "--target", target, "--json", key=secret)
        assert usage_cli.returncode == 0, usage_cli.stderr
        rows = json.loads(usage_cli.stdout)["rows"]
        assert [(r["model"], r["requests"], r["completion_tokens"]) for r in rows] == [
            ("tandem-tiny", 1, 4)
        ]
        # the same key opens the OpenAI-compatible HTTP API, whose address the line names
        assert f"http://127.0.0.1:{http_port}/v1" in line
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key=secret)
        assert [m.id for m in client.models.list().data] == ["tandem-tiny"]
        completion = client.completions.create(
            model="tandem-tiny", prompt=[5, 6, 7, 8], max_tokens=3, temperature=0
        )
        assert completion.usage.completion_tokens == 3
        # every service's /metrics answers, and counted the requests above
        scraped = {name: scrape(url) for name, url in endpoints.items()}
        assert (
            'tandem_gateway_requests_total{model="tandem-tiny",outcome="ok"' in (scraped["gateway"])
        )
        assert "tandem_ttft_seconds_count" in scraped["router"]
        assert 'tandem_decode_requests_total{mode="aggregated"}' in scraped["decode-0"]
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    assert up.returncode == 0
    logs = list(state.glob("*.log"))
    assert {p.name for p in logs} >= {"gateway.log", "router.log", "decode-0.log"}
    assert all(secret not in p.read_text(errors="replace") for p in logs)


def ready_lines(stderr: str) -> list[str]:
    """`tandem up`'s progress lines up to "Tandem is up", times and waits left out."""
    progress = (line.strip() for line in stderr.splitlines() if line.startswith("  "))
    return [
        re.sub(r" \(\d+\.\d s\)$", "", line)
        for line in progress
        if not line.startswith(("waiting for", "still waiting for"))
    ]


def metrics_endpoints(up: subprocess.Popen) -> dict[str, str]:
    """Service name → /metrics URL, from the line `tandem up --metrics` prints next."""
    assert up.stdout is not None
    line = up.stdout.readline()
    assert line.startswith("Prometheus metrics: "), line
    pairs = (item.split(" ") for item in line.removeprefix("Prometheus metrics: ").split(", "))
    return {name: url.strip() for name, url in pairs}


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_a_temporary_state_dir_is_removed_at_a_clean_stop(
    tmp_path: Path, tandem_home: Path
) -> None:
    """Without --state-dir each run made a directory in the temporary directory and left it:
    logs, the store and, with --tls, a CA's private key, run after run."""
    stderr = tmp_path / "up.err"
    with stderr.open("w") as err:
        up = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "up", "--prefill", "0", "--decode",
             "1", "--port", str(free_port()), "--http-port", str(free_port()),
             "--kv-cache-gib", "0.25", "--tls"],
            stdout=subprocess.PIPE, stderr=err, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)},
        )  # fmt: skip
    try:
        wait_up(up)
        (state,) = tmp_path.glob("tandem-up-*")
        assert (state / "tls" / "ca.pem").exists() and (state / "gateway.db").exists()
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    assert up.returncode == 0
    assert not state.exists()
    assert f"removed this run's temporary state {state}" in stderr.read_text()

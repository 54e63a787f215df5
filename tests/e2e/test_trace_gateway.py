"""One request through ``tandem up``'s processes, one trace: gateway → router → prefill → KV
transfer → decode.

The cluster is the one ``tandem up`` starts (a gateway in front, an admin key minted into
its store, ``--trace-exporter`` given to every child through ``ClusterConfig``), each child
exporting its spans as JSON to its log (the console exporter); the test reads them back.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import grpc.aio

from services.cli.up import EXAMPLE_POLICY
from services.cli.up import _gateway as up_gateway
from services.launcher.local import free_port
from services.stubs.tandem.v1 import inference_pb2 as pb
from services.stubs.tandem.v1 import inference_pb2_grpc
from tests.e2e.conftest import start_cluster
from tests.e2e.spans import console_spans

CHILDREN = ("gateway", "router", "prefill-0", "decode-0")
CANARY = "zebra-canary-prompt"
"""Prompt text that must appear in no span and no log."""
BAD_KEY = "tdm_nosuchkey_" + "s" * 43
"""A well-formed API key the store does not hold."""
LONG_MODEL = "m" * 5000
"""A model name no check has bounded yet when authentication refuses the call."""
POLICY_STEPS = ("gateway.authenticate", "gateway.authorize", "gateway.admit", "gateway.settle")


async def _one_request(address: str, secret: str) -> list[int]:
    """Generate 3 tokens from a text prompt through the gateway; the tokens streamed."""
    req = pb.GenerateRequest(
        model="tandem-tiny", prompt=f"{CANARY} " * 8, max_tokens=3, temperature=0.0, ignore_eos=True
    )
    tokens: list[int] = []
    async with grpc.aio.insecure_channel(address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        stream = stub.Generate(req, timeout=120, metadata=(("authorization", f"Bearer {secret}"),))
        async for message in stream:
            tokens += message.token_ids
    return tokens


def _http_completion(port: int, secret: str) -> dict:
    """POST /v1/completions on the gateway's OpenAI HTTP API."""
    body = {"model": "tandem-tiny", "prompt": CANARY, "max_tokens": 2, "temperature": 0}
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"authorization": f"Bearer {secret}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as reply:
        return json.load(reply)


async def _refused(address: str, credential: str) -> grpc.StatusCode:
    """The status of a call with a credential the gateway does not accept, naming a model
    of 5,000 characters (the span recorded it whole, unvalidated)."""
    req = pb.GenerateRequest(model=LONG_MODEL, prompt=CANARY, max_tokens=1)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        try:
            metadata = (("authorization", f"Bearer {credential}"),)
            async for _ in stub.Generate(req, timeout=30, metadata=metadata):
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    raise AssertionError("a bad credential was served")


def _under_http(span: dict, spans: list[dict]) -> bool:
    """Whether ``span`` belongs to the trace of an OpenAI HTTP API request."""
    http = {s["context"]["trace_id"] for s in spans if s["name"].startswith("POST /v1/")}
    return span["context"]["trace_id"] in http


def test_one_trace_from_the_gateway_to_decode(tmp_path: Path, tandem_home: Path) -> None:
    http_port = free_port()
    spec, secret = up_gateway(EXAMPLE_POLICY, tmp_path / "state", "tandem-tiny", http_port)
    # the gRPC KV transport, so that the transfer is a traced call (NIXL moves bytes
    # outside gRPC; the decode side's kv.read span covers it either way)
    cluster = start_cluster(
        tmp_path, prefill=1, decode=1, kv_transport="grpc", gateway=spec, trace_exporter="console"
    )
    try:
        assert len(asyncio.run(_one_request(cluster.address, secret))) == 3
        refused = asyncio.run(_refused(cluster.address, BAD_KEY))
        assert refused == grpc.StatusCode.UNAUTHENTICATED
        assert _http_completion(http_port, secret)["usage"]["completion_tokens"] == 2
    finally:
        cluster.stop()  # the console exporter has written every span by now
    logs = tmp_path / "logs"
    spans = {name: console_spans(logs / f"{name}.log") for name in CHILDREN}

    grpc_spans = [s for s in spans["gateway"] if not _under_http(s, spans["gateway"])]
    denied = [s for s in grpc_spans if s["name"] == "gateway.authenticate"]
    assert [s["attributes"]["tandem.gateway.decision"] for s in denied] == ["allow", "deny"]
    assert denied[1]["attributes"]["tandem.model"] == "m" * 256 + "...(5000 characters)"
    gateway = {s["name"]: s for s in grpc_spans if s not in denied[1:]}
    assert set(POLICY_STEPS) <= set(gateway), sorted(gateway)
    (trace_id,) = {gateway[step]["context"]["trace_id"] for step in POLICY_STEPS}
    for name in CHILDREN:
        assert trace_id in {s["context"]["trace_id"] for s in spans[name]}, name
    in_trace = [s for name in CHILDREN for s in spans[name] if s["context"]["trace_id"] == trace_id]
    names = {s["name"] for s in in_trace}
    # every hop: the gateway's server span and its call to the router, the router's calls to
    # both workers, the KV read on the decode side and the prefill side serving it
    assert {
        "/tandem.v1.Inference/Generate",
        "/tandem.v1.PrefillWorker/Prefill",
        "/tandem.v1.DecodeWorker/Decode",
        "kv.read",
        "/tandem.v1.KVTransfer/ReadBlocks",
    } <= names, sorted(names)
    served = {s["name"] for s in spans["prefill-0"] if s["context"]["trace_id"] == trace_id}
    assert "/tandem.v1.KVTransfer/ReadBlocks" in served, sorted(served)

    admit, settle = gateway["gateway.admit"]["attributes"], gateway["gateway.settle"]["attributes"]
    assert admit["tandem.model"] == "tandem-tiny" and admit["tandem.team"] == "platform"
    assert admit["tandem.gateway.decision"] == "allow" and admit["tandem.gateway.tokens_reserved"]
    assert settle["tandem.usage.completion_tokens"] == 3 and settle["tandem.usage.prompt_tokens"]
    assert settle["tandem.gateway.outcome"] == "ok"
    # the HTTP request: its own trace, the policy steps under the HTTP span, on to the router
    (http,) = [s for s in spans["gateway"] if s["name"] == "POST /v1/completions"]
    assert http["attributes"]["http.response.status_code"] == 200
    http_trace = http["context"]["trace_id"]
    steps = {s["name"] for s in spans["gateway"] if s["context"]["trace_id"] == http_trace}
    assert set(POLICY_STEPS) <= steps, sorted(steps)
    assert http_trace in {s["context"]["trace_id"] for s in spans["router"]}
    # nothing secret or private in any span or log line
    for log in logs.glob("*.log"):
        text = log.read_text(errors="replace")
        assert secret not in text and BAD_KEY not in text and CANARY not in text, log.name

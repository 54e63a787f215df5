"""One request, one trace: the context crosses router → prefill → decode in metadata.

The same traced cluster (one prefill, one decode worker, every service exporting its spans
to its log and serving /metrics) also checks the metrics a request leaves behind: each
test measures the change its own requests make.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import grpc
import pytest

from services.launcher.local import LocalCluster
from services.stubs.tandem.v1 import inference_pb2 as pb
from services.stubs.tandem.v1 import inference_pb2_grpc, worker_pb2_grpc
from services.stubs.tandem.v1 import worker_pb2 as wpb
from tests.e2e.client import channel, eventually, generate, metric, request
from tests.e2e.conftest import start_cluster
from tests.e2e.spans import console_spans

CANARY = "zebra-canary-prompt"
"""Prompt text that must appear in no span and no log."""
BEARER = "tdm_canarybearer_" + "q" * 40
"""A bearer token sent to the router, which must appear in no span and no log."""
UNTRACED = ("Heartbeat", "PublishKVEvents", "grpc.health.v1.Health")
ROLES = ("router", "prefill-0", "decode-0")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tandem_home: Path) -> Iterator[LocalCluster]:
    tracing = ("--trace-exporter", "console")
    c = start_cluster(
        tmp_path_factory.mktemp("traced"),
        prefill=1,
        decode=1,
        kv_transport="grpc",  # ReadBlocks serves (and counts) every byte the decode side reads
        router_args=tracing,
        prefill_args=tracing,
        decode_args=tracing,
    )
    yield c
    c.stop()


def _all_spans(cluster: LocalCluster) -> dict[str, list[dict]]:
    return {c.name: console_spans(c.log_path) for c in cluster.children if c.log_path is not None}


def _router_traces(cluster: LocalCluster) -> set[str]:
    return {
        s["context"]["trace_id"]
        for s in console_spans(cluster.child("router").log_path)
        if s["name"] == "/tandem.v1.Inference/Generate"
    }


HOPS = (
    ("router", "/tandem.v1.Inference/Generate", "SERVER"),
    ("router", "/tandem.v1.PrefillWorker/Prefill", "CLIENT"),
    ("router", "/tandem.v1.DecodeWorker/Decode", "CLIENT"),
    ("prefill-0", "/tandem.v1.PrefillWorker/Prefill", "SERVER"),
    ("decode-0", "/tandem.v1.DecodeWorker/Decode", "SERVER"),
    ("decode-0", "kv.read", "INTERNAL"),
    ("prefill-0", "/tandem.v1.KVTransfer/ReadBlocks", "SERVER"),
    ("decode-0", "/tandem.v1.KVTransfer/ReadBlocks", "CLIENT"),
)
"""Every span one disaggregated request makes: (service, span name, kind)."""


def _all_hops_written(cluster: LocalCluster, traces: set[str]) -> bool:
    """Whether each of ``traces`` has every span of HOPS in its service's log: each
    process writes a span when it ends, and the router may end its part first (it cancels
    the Decode call after the final message, before the decode worker's handler returns)."""
    spans = _all_spans(cluster)
    return all(
        any(
            s["name"] == name and s["kind"] == f"SpanKind.{kind}" and s["context"]["trace_id"] == t
            for s in spans[service]
        )
        for t in traces
        for service, name, kind in HOPS
    )


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _one(spans: list[dict], name: str, kind: str) -> dict:
    (span,) = [s for s in spans if s["name"] == name and s["kind"] == f"SpanKind.{kind}"]
    return span


def test_one_trace_spans_every_hop(cluster: LocalCluster) -> None:
    before = _router_traces(cluster)

    async def one() -> None:
        async with channel(cluster.address) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            req = pb.GenerateRequest(
                model="tandem-tiny", prompt=f"{CANARY} " * 8, max_tokens=3, ignore_eos=True
            )
            got = await generate(stub, req)
            assert len(got.tokens) == 3
            # and a bearer token in the metadata: no service may record it
            metadata = (("authorization", f"Bearer {BEARER}"),)
            async for _ in stub.Generate(request([5, 6, 7] * 12, 2), metadata=metadata):
                pass

    asyncio.run(one())
    eventually(lambda: len(_router_traces(cluster) - before) == 2)
    eventually(lambda: _all_hops_written(cluster, _router_traces(cluster) - before), 5)
    spans = _all_spans(cluster)
    router = spans["router"]
    for trace_id in _router_traces(cluster) - before:
        in_trace = {
            name: [s for s in found if s["context"]["trace_id"] == trace_id]
            for name, found in spans.items()
        }
        # one trace, and each span a child of the one that caused it
        generate_span = _one(in_trace["router"], "/tandem.v1.Inference/Generate", "SERVER")
        prefill_call = _one(in_trace["router"], "/tandem.v1.PrefillWorker/Prefill", "CLIENT")
        decode_call = _one(in_trace["router"], "/tandem.v1.DecodeWorker/Decode", "CLIENT")
        prefill = _one(in_trace["prefill-0"], "/tandem.v1.PrefillWorker/Prefill", "SERVER")
        decode = _one(in_trace["decode-0"], "/tandem.v1.DecodeWorker/Decode", "SERVER")
        kv_read = _one(in_trace["decode-0"], "kv.read", "INTERNAL")
        served = _one(in_trace["prefill-0"], "/tandem.v1.KVTransfer/ReadBlocks", "SERVER")
        reading = _one(in_trace["decode-0"], "/tandem.v1.KVTransfer/ReadBlocks", "CLIENT")

        def parent_of(span: dict, parent: dict) -> None:
            assert span["parent_id"] == parent["context"]["span_id"], (span, parent)

        assert generate_span["parent_id"] is None
        parent_of(prefill_call, generate_span)
        parent_of(decode_call, generate_span)
        parent_of(prefill, prefill_call)
        parent_of(decode, decode_call)
        parent_of(kv_read, decode)
        parent_of(reading, kv_read)
        parent_of(served, reading)
        assert kv_read["attributes"]["tandem.kv.bytes"] > 0
        # the router's call to the decode worker ends with the call, inside its parent
        # (not when the garbage collector finalizes the stream the router stopped reading)
        assert _seconds(decode_call["end_time"]) <= _seconds(generate_span["end_time"]) + 0.1
        assert decode_call["status"]["status_code"] == "UNSET"
    # calls that belong to no request make no trace (heartbeats, health checks, KV events)
    for name, found in spans.items():
        noise = sorted({s["name"] for s in found if any(u in s["name"] for u in UNTRACED)})
        assert noise == [], (name, noise)
    assert len(router) == len({s["context"]["span_id"] for s in router})
    # each replica is named on its spans: a worker by the id it registered under
    instances = {
        name: {s["resource"]["attributes"]["service.instance.id"] for s in found}
        for name, found in spans.items()
    }
    assert instances["prefill-0"] == {"prefill-0"} and instances["decode-0"] == {"decode-0"}
    assert len(instances["router"]) == 1
    # nothing secret or private in any span or log line
    for child in cluster.children:
        text = child.log_path.read_text(errors="replace")
        assert CANARY not in text and BEARER not in text, child.name


def test_a_cancelled_request_is_counted_as_cancelled(cluster: LocalCluster) -> None:
    port = cluster.child("router").metrics_port

    def outcome(name: str) -> float:
        try:
            return metric(port, f'tandem_requests_finished_total{{outcome="{name}"}}')
        except AssertionError:  # no such sample yet
            return 0.0

    cancelled, failed = outcome("cancelled"), outcome("failed")

    async def cancel_after_first_tokens() -> None:
        async with channel(cluster.address) as ch:
            call = inference_pb2_grpc.InferenceStub(ch).Generate(
                request(list(range(300, 340)), 200)
            )
            async for msg in call:
                if msg.token_ids:
                    call.cancel()
                    break

    asyncio.run(cancel_after_first_tokens())
    eventually(lambda: metric(port, "tandem_requests_in_flight") == 0)
    assert (outcome("cancelled"), outcome("failed")) == (cancelled + 1, failed)


def test_ttft_and_kv_bytes_count_what_was_served(cluster: LocalCluster) -> None:
    router, prefill, decode = (cluster.child(n).metrics_port for n in ROLES)
    names = (
        (router, "tandem_ttft_seconds_count"),
        (router, "tandem_requests_finished_total"),
        (router, "tandem_router_retries_total"),
        (decode, "tandem_kv_transfer_received_bytes_total"),
        (decode, "tandem_kv_transfer_seconds_count"),
        (prefill, "tandem_kv_transfer_served_bytes_total"),
    )
    eventually(lambda: metric(router, "tandem_requests_in_flight") == 0)
    before = [metric(port, name) for port, name in names]
    prompts = [list(range(900 + 50 * i, 940 + 50 * i)) for i in range(3)]

    async def serve() -> list[int]:
        async with channel(cluster.address) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            done = await asyncio.gather(*(generate(stub, request(p, 3)) for p in prompts))
        return [d.final.serving.kv_transfer_bytes for d in done]

    moved = asyncio.run(serve())
    assert all(moved)
    eventually(lambda: metric(router, "tandem_requests_in_flight") == 0)
    after = [metric(port, name) for port, name in names]
    assert [a - b for a, b in zip(after, before, strict=True)] == [
        3,  # one first token per request
        3,
        0,  # no retry happened
        sum(moved),  # what the decode worker received is what the clients were told ...
        3,
        sum(moved),  # ... and what the prefill worker served
    ]
    for port in (prefill, decode):  # idle again: nothing queued or running
        eventually(lambda p=port: metric(p, "tandem_queue_depth") == 0)
        eventually(lambda p=port: metric(p, "tandem_running_requests") == 0)


def _steady(port: int, name: str, quiet_s: float, timeout_s: float = 30.0) -> float:
    """``name``'s value once it has not changed for ``quiet_s``."""
    deadline = time.monotonic() + timeout_s
    value, since = metric(port, name), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, f"{name} never settled"
        time.sleep(0.1)
        if (now := metric(port, name)) != value:
            value, since = now, time.monotonic()
    return value


def test_a_lease_expiry_is_counted_once(cluster: LocalCluster) -> None:
    """A prefill nobody reads: its lease runs out, which counts one expiry, no release."""
    port = cluster.child("prefill-0").metrics_port
    expiries = metric(port, "tandem_kv_lease_expiries_total")
    released = metric(port, "tandem_kv_released_total")
    # The gauge is set at each heartbeat (1 s): the previous test's blocks may still show
    # as held. The baseline is the pool once it reads the same over two heartbeats.
    free = _steady(port, "tandem_kv_free_blocks", quiet_s=2.5)

    async def prefill_and_leave() -> grpc.StatusCode:
        async with channel(cluster.child("prefill-0").address) as ch:
            stub = worker_pb2_grpc.PrefillWorkerStub(ch)
            req = request(list(range(1500, 1540)), 4, request_id="never-read")
            held = await stub.Prefill(wpb.PrefillRequest(request=req, lease_ms=300))
            assert held.kv.block_ids
            await asyncio.sleep(0.3)
            while metric(port, "tandem_kv_lease_expiries_total") == expiries:
                await asyncio.sleep(0.05)
            try:
                await stub.ReleaseKV(wpb.ReleaseKVRequest(request_id="never-read"))
            except grpc.aio.AioRpcError as e:
                return e.code()
            return grpc.StatusCode.OK

    started = time.monotonic()
    assert asyncio.run(asyncio.wait_for(prefill_and_leave(), 10)) == grpc.StatusCode.NOT_FOUND
    assert time.monotonic() - started < 10
    time.sleep(0.5)  # a second expiry of the same lease would show by now
    assert metric(port, "tandem_kv_lease_expiries_total") == expiries + 1
    assert metric(port, "tandem_kv_released_total") == released
    eventually(lambda: metric(port, "tandem_kv_free_blocks") == free)  # blocks back in the pool

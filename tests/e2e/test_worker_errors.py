"""Bad input at every internal service gets a precise status and leaks no block.

Talks to the workers' own RPCs (what the router and peers call), not through
the router, with malformed and unknown requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.launcher.local import LocalCluster
from services.stubs.tandem.v1 import inference_pb2 as pb
from services.stubs.tandem.v1 import worker_pb2 as wpb
from services.stubs.tandem.v1 import worker_pb2_grpc
from tests.e2e.client import channel, eventually, metric, request
from tests.e2e.conftest import start_cluster

BLOCK_BYTES = 16 * 8 * 2 * 4 * 64 * 4
TOTAL_BLOCKS = 0.25 * 2**30 // BLOCK_BYTES


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tandem_home: Path) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path_factory.mktemp("errors"), prefill=1, decode=1, kv_transport="grpc")
    yield c
    c.stop()


async def _status(address: str, call) -> grpc.aio.AioRpcError:
    async with channel(address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            result = call(ch)
            if hasattr(result, "__aiter__"):
                async for _ in result:
                    pass
            else:
                await result
        return err.value


def _expect(address: str, call, code: grpc.StatusCode, words: str) -> None:
    err = asyncio.run(_status(address, call))
    assert err.code() == code, err.details()
    assert words in err.details()


def test_release_of_unknown_request_is_not_found(cluster: LocalCluster) -> None:
    _expect(
        cluster.child("prefill-0").address,
        lambda ch: worker_pb2_grpc.PrefillWorkerStub(ch).ReleaseKV(
            wpb.ReleaseKVRequest(request_id="never-prefilled"), timeout=10
        ),
        grpc.StatusCode.NOT_FOUND,
        "never-prefilled",
    )


def test_prefill_takes_token_ids_not_text(cluster: LocalCluster) -> None:
    req = pb.GenerateRequest(model="tandem-tiny", prompt="text", max_tokens=4)
    _expect(
        cluster.child("prefill-0").address,
        lambda ch: worker_pb2_grpc.PrefillWorkerStub(ch).Prefill(
            wpb.PrefillRequest(request=req), timeout=10
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "prompt",
    )


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_a_call_for_another_model_is_not_found(cluster: LocalCluster, role: str) -> None:
    """Served on this worker's weights it would answer for the wrong model (was: served)."""
    req = pb.GenerateRequest(model="other-model", prompt_token_ids=[1, 2, 3], max_tokens=4)
    if role == "prefill":
        call = lambda ch: worker_pb2_grpc.PrefillWorkerStub(ch).Prefill(  # noqa: E731
            wpb.PrefillRequest(request=req), timeout=10
        )
    else:
        call = lambda ch: worker_pb2_grpc.DecodeWorkerStub(ch).Decode(  # noqa: E731
            wpb.DecodeRequest(request=req), timeout=10
        )
    words = "model 'other-model' is not served by this worker, which serves 'tandem-tiny'"
    _expect(cluster.child(f"{role}-0").address, call, grpc.StatusCode.NOT_FOUND, words)


def test_decode_of_a_one_token_completion_is_refused(cluster: LocalCluster) -> None:
    """max_tokens=1 and the prefill's token handed over: nothing is left to decode (was: a
    second token streamed, completion_tokens 2)."""
    kv = wpb.KVHandle(
        worker_id="prefill-0",
        address=cluster.child("prefill-0").address,
        request_id="x",
        block_ids=[0],
        num_tokens=3,
    )
    _expect(
        cluster.child("decode-0").address,
        lambda ch: worker_pb2_grpc.DecodeWorkerStub(ch).Decode(
            wpb.DecodeRequest(request=request([1, 2, 3], 1), kv=kv, first_token_id=9), timeout=10
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "nothing left to decode",
    )


def test_decode_with_kv_but_no_first_token_is_refused(cluster: LocalCluster) -> None:
    kv = wpb.KVHandle(
        worker_id="prefill-0",
        address=cluster.child("prefill-0").address,
        request_id="x",
        block_ids=[1],
        num_tokens=3,
    )
    _expect(
        cluster.child("decode-0").address,
        lambda ch: worker_pb2_grpc.DecodeWorkerStub(ch).Decode(
            wpb.DecodeRequest(request=request([1, 2, 3], 4), kv=kv), timeout=10
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "first_token_id",
    )


def test_decode_of_kv_nobody_pinned_falls_back_and_leaks_nothing(cluster: LocalCluster) -> None:
    # A handle naming blocks the prefill worker never pinned: the read fails with
    # NOT_FOUND, the decode worker prefills locally and still answers.
    kv = wpb.KVHandle(
        worker_id="prefill-0",
        address=cluster.child("prefill-0").address,
        request_id="ghost",
        block_ids=[1, 2],
        num_tokens=20,
    )

    async def decode() -> list[pb.GenerateResponse]:
        async with channel(cluster.child("decode-0").address) as ch:
            stub = worker_pb2_grpc.DecodeWorkerStub(ch)
            req = wpb.DecodeRequest(request=request(list(range(20)), 3), kv=kv, first_token_id=9)
            return [m async for m in stub.Decode(req, timeout=30)]

    messages = asyncio.run(decode())
    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert messages[-1].serving.kv_transport == ""
    assert sum(len(m.token_ids) for m in messages) == 2  # the first token is not repeated
    for name in ("prefill-0", "decode-0"):
        port = cluster.child(name).metrics_port
        eventually(lambda p=port: metric(p, "tandem_kv_free_blocks") == TOTAL_BLOCKS)


def test_handshake_from_an_incompatible_peer_is_refused(cluster: LocalCluster) -> None:
    layout = wpb.KVLayout(
        protocol_version=1,
        model_id="other-model@0",
        block_size=32,
        dtype="float32",
        layout="layer-kv-slot-head-dim",
        num_layers=8,
        num_kv_heads=4,
        head_dim=64,
        num_blocks=10,
    )
    _expect(
        cluster.child("prefill-0").address,
        lambda ch: worker_pb2_grpc.KVTransferStub(ch).Handshake(
            wpb.HandshakeRequest(worker_id="intruder", layout=layout), timeout=10
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "model_id",
    )

"""A decode worker checks the KV handle it is given, and the lease behind a read.

A handle short of blocks, naming a block twice or giving another token count would leave
blocks that nothing writes: the request would decode on whatever they hold, and report a
successful transfer. A read after which the prefill no longer held the blocks (its lease
ran out) may have read another prompt's KV: it is discarded, and the prompt prefilled here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc
import pytest

from services.kv_transfer.client import KVReader
from services.rpc.server import client_channel
from services.stubs.tandem.v1 import worker_pb2, worker_pb2_grpc
from tests.decode.helpers import (
    DECODE,
    MAX_TOKENS,
    PREFILL,
    PROMPT,
    decode,
    prefill,
    until_idle,
)
from tests.router.harness import run
from tests.router.inprocess import (
    IDLE,
    generate_request,
    idle,
    read_stream,
    reference_tokens,
    worker,
)


def _truncated(kv: worker_pb2.KVHandle) -> None:
    del kv.block_ids[2:]


def _duplicated(kv: worker_pb2.KVHandle) -> None:
    kv.block_ids[2] = kv.block_ids[0]


def _miscounted(kv: worker_pb2.KVHandle) -> None:
    kv.num_tokens = len(PROMPT) - 1


BAD_HANDLES: Sequence[tuple[Callable[[worker_pb2.KVHandle], None], str]] = (
    (_truncated, "kv.block_ids: has 2 blocks; a prompt of 40 tokens in blocks of 16 needs 3"),
    (_duplicated, "kv.block_ids: names a block more than once"),
    (_miscounted, "kv.num_tokens: is 39; must be the prompt's length, 40 (or 0)"),
)


def test_a_malformed_handle_is_refused_naming_its_field_and_leaks_nothing() -> None:
    """Each bad handle ends with INVALID_ARGUMENT before a block is taken; the honest
    handle of the same prefill then decodes exactly the offline reference's tokens."""
    expected = reference_tokens(PROMPT, MAX_TOKENS)

    async def body() -> None:
        async with (
            worker(PREFILL, "p0", kv_transport="grpc") as p,
            worker(DECODE, "d0", kv_transport="grpc") as d,
        ):
            # d0 caches PROMPT's 2 full blocks: a handle of 2 blocks then has as many blocks
            # to read as d0 lacks, and nothing but the check stops it.
            warm = generate_request([*PROMPT[:32], *range(900, 908)], 1, "warm")
            async with client_channel(d.address) as channel:
                call = worker_pb2_grpc.DecodeWorkerStub(channel).Decode(
                    worker_pb2.DecodeRequest(request=warm), timeout=30
                )
                assert (await read_stream(call)).code == grpc.StatusCode.OK
            first = await prefill(p, "p")
            for spoil, message in BAD_HANDLES:
                kv = worker_pb2.KVHandle()
                kv.CopyFrom(first.kv)
                spoil(kv)
                stream = await decode(d, f"bad-{spoil.__name__}", first, kv)
                assert (stream.code, stream.details) == (grpc.StatusCode.INVALID_ARGUMENT, message)
                assert stream.messages == []
                assert await idle(d) == IDLE
            stream = await decode(d, "good", first, first.kv)
            assert stream.code == grpc.StatusCode.OK, stream.details
            assert [first.first_token_id, *stream.tokens] == expected
            assert stream.messages[-1].serving.kv_transport == "grpc"
            await until_idle(p, d)

    run(body(), timeout=60)


def test_a_read_the_prefill_no_longer_held_by_its_release_is_discarded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The prefill's lease ends just after the read (its ReleaseKV answers NOT_FOUND): what
    was read may be another prompt's KV, so the decode worker frees those blocks uncached
    and prefills the prompt itself: the reference's tokens, and no transfer reported."""
    expected = reference_tokens(PROMPT, MAX_TOKENS)

    async def body() -> None:
        async with (
            worker(PREFILL, "p0", kv_transport="grpc") as p,
            worker(DECODE, "d0", kv_transport="grpc") as d,
        ):
            pull = KVReader.pull
            reads: list[int] = []

            async def pull_then_lease_ends(reader: KVReader, *args: object) -> int:
                read = await pull(reader, *args)
                reads.append(read)
                await p.loop.call(lambda e: e.release_held("p"))  # as the lease running out
                return read

            monkeypatch.setattr(KVReader, "pull", pull_then_lease_ends)
            first = await prefill(p, "p")
            stream = await decode(d, "d", first, first.kv)
            assert stream.code == grpc.StatusCode.OK, stream.details
            assert [first.first_token_id, *stream.tokens] == expected
            serving = stream.messages[-1].serving
            assert (serving.kv_transport, serving.kv_transfer_bytes) == ("", 0)
            # The bytes did cross the wire: received is counted (served is, on the prefill).
            assert reads[0] > 0
            assert d.metrics.kv_bytes_received._value.get() == reads[0]
            await until_idle(p, d)

    run(body(), timeout=60)

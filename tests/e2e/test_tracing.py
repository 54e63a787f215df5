"""One request, one trace: the context crosses router → prefill → decode in metadata."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from services.stubs.tandem.v1 import inference_pb2_grpc
from tests.e2e.client import channel, generate, request
from tests.e2e.conftest import start_cluster

TRACE_ID = re.compile(r'"trace_id": "(0x[0-9a-f]{32})"')


def _trace_ids(log: Path) -> set[str]:
    return set(TRACE_ID.findall(log.read_text()))


def test_one_trace_spans_every_hop(tmp_path: Path, tandem_home: Path) -> None:
    tracing = ("--trace-exporter", "console")
    cluster = start_cluster(
        tmp_path,
        prefill=1,
        decode=1,
        router_args=tracing,
        prefill_args=tracing,
        decode_args=tracing,
    )
    try:

        async def one() -> None:
            async with channel(cluster.address) as ch:
                await generate(inference_pb2_grpc.InferenceStub(ch), request([5, 6, 7] * 12, 3))

        asyncio.run(one())
    finally:
        cluster.stop()  # flushes the console exporters
    logs = tmp_path / "logs"
    router, prefill, decode = (
        _trace_ids(logs / f"{name}.log") for name in ("router", "prefill-0", "decode-0")
    )
    shared = router & prefill & decode
    assert len(shared) == 1, (router, prefill, decode)
    decode_text = (logs / "decode-0.log").read_text()
    assert '"name": "kv.read"' in decode_text
    assert "/tandem.v1.DecodeWorker/Decode" in decode_text

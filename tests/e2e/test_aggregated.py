"""`tandem up --prefill 0`: decode workers prefill for themselves."""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.engine.sampling_params import SamplingParams
from services.stubs.tandem.v1 import inference_pb2_grpc
from tests.e2e.client import channel, generate, metric, request
from tests.e2e.conftest import start_cluster


def test_aggregated_workers_serve_the_offline_tokens(
    tmp_path: Path, tandem_home: Path, reference_engine
) -> None:
    cluster = start_cluster(tmp_path, prefill=0, decode=2)
    try:
        prompts = [list(range(30 + i, 70 + i)) for i in range(4)]

        async def serve() -> list:
            async with channel(cluster.address) as ch:
                stub = inference_pb2_grpc.InferenceStub(ch)
                return await asyncio.gather(*(generate(stub, request(p, 12)) for p in prompts))

        results = asyncio.run(serve())
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        expected = [list(c.token_ids) for c in reference_engine.generate(prompts, params)]
        assert [r.tokens for r in results] == expected
        assert {r.final.serving.decode_worker for r in results} == {"decode-0", "decode-1"}
        assert all(r.final.serving.prefill_worker == "" for r in results)
        # The router's own metrics saw every request's first token.
        router = cluster.child("router")
        assert metric(router.metrics_port, "tandem_ttft_seconds_count") == 4
        assert metric(router.metrics_port, "tandem_requests_finished_total") == 4
    finally:
        cluster.stop()

"""Online serving benchmark: a seeded workload sent to a live Inference service on a schedule.

The run asks the target for the model's card (ListModels: vocabulary and context
length), builds the prompts (serve_workload), sends one short untimed warm-up
request that must succeed, then sends every prompt on a Poisson schedule
(serve_client) and computes the figures from the records (serve_metrics). Every
request is greedy with EOS ignored and min_tokens = max_tokens = output_len, so every
completion has exactly output_len tokens and runs compare like for like.

Nothing here imports torch: the client can run on a machine without it.
"""

from __future__ import annotations

import asyncio
import math
import sys
from dataclasses import dataclass, field

import grpc
from tqdm import tqdm

from services.bench import serve_workload
from services.bench.serve_client import generate_request, run_schedule, send_request
from services.bench.serve_metrics import SLO_METRICS, RequestRecord, ServeMetrics, compute_metrics
from services.bench.workload import WARMUP_OUTPUT_LEN
from services.engine.errors import InvalidRequestError, ModelNotFoundError, TandemError
from services.rpc.server import client_channel
from services.rpc.tls import TlsConfig
from services.stubs.tandem.v1 import inference_pb2, inference_pb2_grpc

LIST_MODELS_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 1e9
"""The longest --timeout (~31 years): gRPC cannot hold a deadline of about 9.2e9 s or more
(every request failed at once with DEADLINE_EXCEEDED)."""
REQUEST_ID_PREFIX = "bench-"
"""Request i is sent with request_id "bench-<i>", the warm-up with "bench-warmup"."""


class ServeBenchError(TandemError):
    """The benchmark could not start: the target is unreachable or failed the warm-up."""

    grpc_code = "UNAVAILABLE"


@dataclass(frozen=True)
class ServeConfig:
    """One serving benchmark run."""

    target: str
    """HOST:PORT of a tandem.v1.Inference service (a gateway or a router; workers serve
    only the internal services)."""
    num_prompts: int
    """Requests in the run."""
    input_len: int
    """Prompt tokens per request (random), or unique tokens after the prefix (shared-prefix)."""
    output_len: int
    """Tokens generated per request: EOS is ignored, so exactly this many."""
    model: str = "tandem-tiny"
    """ModelCard.id to ask for."""
    workload: str = "random"
    """One of serve_workload.WORKLOADS."""
    request_rate: float = math.inf
    """Mean requests/s of the Poisson arrivals; inf sends every request at once."""
    max_concurrency: int | None = None
    """Most requests in flight; later ones wait in the client, a wait reported as the send
    delay, not in their latency (which starts when each is sent)."""
    seed: int = 0
    """Seed of the prompts and of the arrival schedule."""
    num_groups: int | None = None
    """shared-prefix only: number of distinct prefixes."""
    prefix_len: int | None = None
    """shared-prefix only: tokens in each shared prefix."""
    slos_ms: dict[str, float] = field(default_factory=dict)
    """Goodput limits by SLO_METRICS name, e.g. {"ttft_ms": 500}; empty: no goodput."""
    timeout_s: float = 300.0
    """Deadline of each request, counted from when it is sent."""
    show_progress: bool = True
    """Draw a tqdm progress bar on stderr while requests complete."""
    api_key: str | None = field(default=None, repr=False)
    """Sent as ``authorization: Bearer …`` on every call (a gateway needs it); never
    printed, and left out of ``serve_report.result_dict``."""
    tls: TlsConfig | None = None
    """Connect over TLS, verifying the server with its CA (and presenting its client
    certificate, if any); None: plaintext."""

    @property
    def prompt_len(self) -> int:
        return self.input_len + (self.prefix_len or 0)


@dataclass(frozen=True)
class ServeResult:
    config: ServeConfig
    vocab_size: int
    max_context_length: int
    """From the target's ModelCard."""
    records: list[RequestRecord]
    """One per request, in workload order."""
    metrics: ServeMetrics

    @property
    def short_outputs(self) -> int:
        """OK requests with fewer or more tokens than asked for: their figures mislead."""
        want = self.config.output_len
        return sum(r.ok and r.output_tokens != want for r in self.records)


def measure_serving(config: ServeConfig) -> ServeResult:
    """Run the benchmark against ``config.target`` and return every record and figure."""
    check_config(config)
    return asyncio.run(_measure(config))


def check_config(config: ServeConfig) -> None:
    """Raise InvalidRequestError naming the flag that is out of range or missing."""
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(config, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise InvalidRequestError(flag, f"must be at least 1, got {getattr(config, name)}")
    if config.workload not in serve_workload.WORKLOADS:
        choices = ", ".join(serve_workload.WORKLOADS)
        raise InvalidRequestError("--workload", f"must be one of {choices}, got {config.workload}")
    shared = config.workload == "shared-prefix"
    for name in ("num_groups", "prefix_len"):
        value, flag = getattr(config, name), "--" + name.replace("_", "-")
        if shared and value is None:
            raise InvalidRequestError(flag, "is required with --workload shared-prefix")
        if shared and value < 1:
            raise InvalidRequestError(flag, f"must be at least 1, got {value}")
        if not shared and value is not None:
            raise InvalidRequestError(flag, "applies to --workload shared-prefix only")
    if shared and config.num_groups > config.num_prompts:
        raise InvalidRequestError(
            "--num-groups",
            f"must not exceed --num-prompts ({config.num_prompts}), got {config.num_groups}",
        )
    if not config.request_rate > 0:
        raise InvalidRequestError(
            "--request-rate", f"must be above 0 or inf, got {config.request_rate}"
        )
    if config.max_concurrency is not None and config.max_concurrency < 1:
        raise InvalidRequestError(
            "--max-concurrency", f"must be at least 1, got {config.max_concurrency}"
        )
    for name, limit in config.slos_ms.items():
        if name not in SLO_METRICS:
            raise InvalidRequestError(
                "--goodput", f"unknown SLO {name!r}; use {', '.join(SLO_METRICS)}"
            )
        if not (limit > 0 and math.isfinite(limit)):
            raise InvalidRequestError(
                "--goodput", f"{name} must be a finite number above 0, got {limit}"
            )
    if not 0 < config.timeout_s <= MAX_TIMEOUT_S:
        raise InvalidRequestError(
            "--timeout",
            f"must be above 0 and at most {MAX_TIMEOUT_S:g} s (a gRPC deadline cannot reach "
            f"further), got {config.timeout_s:g}",
        )


def build_prompts(config: ServeConfig, vocab_size: int) -> list[list[int]]:
    if config.workload == "shared-prefix":
        assert config.num_groups is not None and config.prefix_len is not None  # check_config
        return serve_workload.shared_prefix_prompts(
            config.num_prompts,
            config.num_groups,
            config.prefix_len,
            config.input_len,
            vocab_size,
            config.seed,
        )
    return serve_workload.random_prompts(
        config.num_prompts, config.input_len, vocab_size, config.seed
    )


async def _measure(config: ServeConfig) -> ServeResult:
    async with client_channel(config.target, config.api_key, config.tls) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        card = await _model_card(stub, config)
        prompts = build_prompts(config, card.vocab_size)
        requests = [
            generate_request(config.model, p, config.output_len, f"{REQUEST_ID_PREFIX}{i}")
            for i, p in enumerate(prompts)
        ]
        schedule = serve_workload.poisson_schedule(
            config.num_prompts, config.request_rate, config.seed
        )
        await _warm_up(stub, config, card.vocab_size)
        with tqdm(
            total=config.num_prompts,
            desc="bench serve",
            unit="req",
            file=sys.stderr,
            disable=not config.show_progress,
        ) as bar:
            records = await run_schedule(
                stub,
                requests,
                schedule,
                max_concurrency=config.max_concurrency,
                timeout_s=config.timeout_s,
                on_done=lambda _: bar.update(),
            )
    metrics = compute_metrics(records, config.request_rate, config.slos_ms)
    return ServeResult(config, card.vocab_size, card.max_context_length, records, metrics)


async def _model_card(
    stub: inference_pb2_grpc.InferenceStub, config: ServeConfig
) -> inference_pb2.ModelCard:
    """The target's card for config.model, checked to hold the workload's requests."""
    try:
        listing = await stub.ListModels(
            inference_pb2.ListModelsRequest(), timeout=LIST_MODELS_TIMEOUT_S
        )
    except grpc.aio.AioRpcError as exc:
        raise ServeBenchError(
            f"cannot list the models at {config.target}: {exc.code().name}: {exc.details()}"
        ) from None
    cards = {card.id: card for card in listing.models}
    if config.model not in cards:
        served = ", ".join(sorted(cards)) or "none"
        raise ModelNotFoundError(
            f"model {config.model!r} is not served at {config.target} (it serves: {served})"
        )
    card = cards[config.model]
    if card.vocab_size <= serve_workload.FIRST_ORDINARY_ID:
        raise ServeBenchError(f"{config.target} reports a vocab_size of {card.vocab_size}")
    total = config.prompt_len + config.output_len
    if card.max_context_length and total > card.max_context_length:
        raise InvalidRequestError(
            "--input-len + --prefix-len + --output-len"
            if config.prefix_len
            else "--input-len + --output-len",
            f"is {total} tokens but {config.model}'s context holds {card.max_context_length}",
        )
    return card


async def _warm_up(
    stub: inference_pb2_grpc.InferenceStub, config: ServeConfig, vocab_size: int
) -> None:
    """One short untimed request, so connection set-up is not in the first figures."""
    prompt = serve_workload.warmup_prompt(vocab_size, config.seed)
    output_len = min(WARMUP_OUTPUT_LEN, config.output_len)
    request = generate_request(config.model, prompt, output_len, f"{REQUEST_ID_PREFIX}warmup")
    record = await send_request(stub, request, -1, 0.0, lambda: 0.0, timeout_s=config.timeout_s)
    if not record.ok:
        raise ServeBenchError(
            f"the warm-up request to {config.target} failed: {record.status}: {record.error}"
        )

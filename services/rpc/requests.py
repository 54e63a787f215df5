"""tandem.v1 messages ↔ engine types, shared by every service (no torch here)."""

from __future__ import annotations

from services.engine.errors import InvalidRequestError, ModelNotFoundError
from services.engine.outputs import FinishReason, RequestOutput, Usage
from services.engine.sampling_params import SamplingParams
from services.stubs.tandem.v1 import inference_pb2 as pb

FINISH_TO_PROTO = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}


_OPTIONAL_SAMPLING_FIELDS = (
    "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "seed",
)  # fmt: skip


def sampling_params(req: pb.GenerateRequest) -> SamplingParams:
    """SamplingParams from the request's set fields, validated.

    Unset optional fields take SamplingParams' defaults, which are the ones
    inference.proto documents (max_tokens 16, temperature 1.0, top_p 1.0, ...).
    Raises InvalidRequestError naming the first field out of range.
    """
    given = {f: getattr(req, f) for f in _OPTIONAL_SAMPLING_FIELDS if req.HasField(f)}
    params = SamplingParams(**given, stop=tuple(req.stop), ignore_eos=req.ignore_eos)
    params.validate()
    return params


def check_model(req: pb.GenerateRequest, served: str) -> None:
    """Refuse (NOT_FOUND) a call for a model other than ``served``, this worker's: it would
    run on the wrong weights. An empty name means this worker's (direct callers)."""
    if req.model and req.model != served:
        raise ModelNotFoundError(
            f"model {req.model!r} is not served by this worker, which serves {served!r}; "
            "send requests to the router, which places each on a worker of its model"
        )


def prompt_token_ids(req: pb.GenerateRequest) -> list[int]:
    """The token ids of a request that must carry them (internal hops)."""
    if req.prompt:
        raise InvalidRequestError("prompt", "workers take prompt_token_ids; the router tokenizes")
    if not req.prompt_token_ids:
        raise InvalidRequestError("prompt_token_ids", "is empty; give at least one token")
    return list(req.prompt_token_ids)


def usage_proto(usage: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
    )


def response_from(out: RequestOutput) -> pb.GenerateResponse:
    """One stream message for an engine delta; the last carries finish reason and usage,
    the first usage too (RequestOutput)."""
    msg = pb.GenerateResponse(request_id=out.request_id, token_ids=out.token_ids, text=out.text)
    if out.finish_reason is not None:
        msg.finish_reason = FINISH_TO_PROTO[out.finish_reason]
    if out.usage is not None:
        msg.usage.CopyFrom(usage_proto(out.usage))
    return msg

"""Progress: what the client of one Generate call has received, and how to resume it.

The orchestrator sends every message to the client through ``chunk()`` or
``final()``, so ``sent`` is exactly the completion tokens the client holds, in
order, each once. After a worker failure the request resumes from there:
``attempt_request()`` is the original request over prompt + sent tokens with
max_tokens and min_tokens reduced by the tokens sent. The client-facing numbers
stay those of the original request: usage.prompt_tokens is the original prompt
length and usage.completion_tokens counts every token sent across attempts.

Resuming, decided here and documented for clients:
- Text: each message carries the text its worker produced. A worker holds back
  text that ends in an incomplete UTF-8 character or may start a stop string;
  what a dead worker held back is lost, and the next worker, which sees those
  tokens as prompt, does not produce it again. So at a seam the text may miss a
  multi-byte character's bytes, and a stop string spanning the seam is not
  detected; token ids are always exact.
- Seeded sampling: the resumed attempt keeps the request's seed. The worker's
  seeded generator restarts at the seam, so the continuation is reproducible
  (same seed, same tokens sent) but differs from what an uninterrupted run would
  have sampled. Greedy requests (temperature 0) continue exactly.
"""

from __future__ import annotations

from services.engine.block_hash import BlockHash
from services.router.admission import AdmittedRequest, prompt_block_hashes
from services.stubs.tandem.v1 import inference_pb2

FinishReason = int
"""An inference_pb2.FinishReason value."""


class Progress:
    """The client-visible state of one Generate call, across all its attempts."""

    def __init__(self, admitted: AdmittedRequest) -> None:
        self.admitted = admitted
        self.sent: list[int] = []
        """Completion token ids the client has received, in order."""
        self.started = False
        """Whether any message reached the client (then failures end with a final message)."""
        self.retries = 0
        """Times the request moved to another worker after a failure (ServingInfo.retries):
        a failure that finds no worker left ends the request without counting one."""
        self.last_failure: str | None = None
        """The failure the next attempt retries after (None: the first attempt, or counted)."""
        self.cached_tokens = 0
        """Prompt tokens served from a prefix cache, as the prefill of the prompt said."""
        self.prefill_worker = ""
        """The prefill worker of the current attempt ("" when the decode worker prefills)."""
        self.decode_worker = ""
        """The decode worker of the current attempt."""
        self.placement = ""
        """Where the current attempt prefills and why (ServingInfo.placement)."""
        self.policy = ""
        """The router's placement policy (ServingInfo.policy)."""
        self._resume_hashes: tuple[int, tuple[BlockHash, ...]] | None = None

    @property
    def request_id(self) -> str:
        return self.admitted.request_id

    @property
    def remaining_tokens(self) -> int:
        """Tokens still allowed by max_tokens."""
        return self.admitted.params.max_tokens - len(self.sent)

    @property
    def exhausted(self) -> bool:
        """True when no further token may be generated (max_tokens or context reached):
        a failure at this point ends the request with FINISH_REASON_LENGTH, not a resume."""
        context_used = len(self.admitted.prompt_token_ids) + len(self.sent)
        return self.remaining_tokens <= 0 or context_used >= self.admitted.max_context_length

    def tokens_to_prefill(self) -> tuple[int, ...]:
        """The prompt of the next attempt: the original prompt plus the tokens sent."""
        return self.admitted.prompt_token_ids + tuple(self.sent)

    def block_hashes(self) -> tuple[BlockHash, ...]:
        """Chained block hashes of ``tokens_to_prefill()``: the admitted prompt's, or on a
        resume those of prompt + sent tokens (computed once per resume point)."""
        admitted = self.admitted
        if not self.sent:
            return admitted.block_hashes
        if self._resume_hashes is None or self._resume_hashes[0] != len(self.sent):
            hashes = prompt_block_hashes(
                self.tokens_to_prefill(), admitted.block_size, admitted.model_id
            )
            self._resume_hashes = (len(self.sent), tuple(hashes))
        return self._resume_hashes[1]

    def attempt_request(self, attempt_id: str) -> inference_pb2.GenerateRequest:
        """The request the next attempt sends to workers, under ``attempt_id``.

        Same fields as the client's; on a resume the prompt grows by the tokens
        sent and max_tokens / min_tokens shrink by their number.
        """
        request = inference_pb2.GenerateRequest()
        request.CopyFrom(self.admitted.template)
        request.request_id = attempt_id
        if self.sent:
            request.prompt_token_ids.extend(self.sent)
            params = self.admitted.params
            request.max_tokens = params.max_tokens - len(self.sent)
            if params.min_tokens:
                request.min_tokens = max(0, params.min_tokens - len(self.sent))
        return request

    def record_cached(self, cached_tokens: int) -> None:
        """Record the prefix-cache hits of an attempt that prefilled the original prompt
        (not of a resume, whose prompt includes generated tokens)."""
        self.cached_tokens = min(cached_tokens, len(self.admitted.prompt_token_ids))

    def chunk(self, token_ids: list[int], text: str) -> inference_pb2.GenerateResponse:
        """A non-final message carrying ``token_ids`` and ``text``; records them as sent.

        The first one also says the prompt's size (``usage.prompt_tokens``): a metering
        proxy whose stream ends early (a cancel, a failure) then charges the prompt
        exactly instead of estimating it from text."""
        first = not self.started
        self.sent.extend(token_ids)
        self.started = True
        message = inference_pb2.GenerateResponse(
            request_id=self.request_id, token_ids=token_ids, text=text
        )
        if first:
            message.usage.prompt_tokens = len(self.admitted.prompt_token_ids)
        return message

    def final(
        self,
        finish_reason: FinishReason,
        token_ids: list[int] | None = None,
        text: str = "",
        reported: inference_pb2.ServingInfo | None = None,
    ) -> inference_pb2.GenerateResponse:
        """The last message: its own tokens, the finish reason, usage and serving info.

        ``reported`` is the decode worker's ServingInfo: its KV figures are kept. The
        worker ids are the router's, except that prefill_worker becomes "" when the
        decode worker reports no kv_transport: it did not use the prefill's KV (its
        read failed and it prefilled locally).
        """
        message = self.chunk(list(token_ids or []), text)
        message.finish_reason = finish_reason
        message.usage.prompt_tokens = len(self.admitted.prompt_token_ids)
        message.usage.completion_tokens = len(self.sent)
        message.usage.cached_tokens = self.cached_tokens
        serving = message.serving
        if reported is not None:
            serving.CopyFrom(reported)
        used_prefill_kv = reported is None or bool(reported.kv_transport)
        serving.prefill_worker = self.prefill_worker if used_prefill_kv else ""
        serving.decode_worker = self.decode_worker
        serving.retries = self.retries
        serving.placement = self.placement
        serving.policy = self.policy
        return message

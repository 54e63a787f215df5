"""The Generate flow: place a request on workers, relay its stream, resume on failure.

One call of ``generate()`` runs attempts until one ends the request:

- Disaggregated (the model has prefill workers): pick a prefill worker P and
  call Prefill (bounded by ``prefill_timeout_s``); send the first token to the
  client at once; unless the prefill already finished the request, pick a
  decode worker D and call Decode with the first token and P's KV handle, then
  relay D's stream (it never repeats the first token). The handle's lease_ms is
  what is left of P's lease when Decode is sent (D counts it from its arrival);
  when less than ``KV_LEASE_MIN_LEFT_MS`` is left (the wait for a decode worker
  outlasted it, and P may have reused the blocks), no handle is sent: D prefills
  the prompt plus the first token itself. A prefill that ends the request must
  say STOP or LENGTH; CANCELLED and ERROR are failures (see below).
- Local prefill: call Decode without KV; D prefills locally. When the model
  has no prefill worker ("local-no-prefill-worker"), when every one failed this
  request ("local-prefill-failed"), and, under a prefix-aware policy
  (kv-aware), when the prompt is cheap to prefill on the chosen D: the part of
  it D does not hold is at most ``local_prefill_max_tokens``
  ("local-short-prompt"), or D holds at least ``local_prefill_min_cached`` of
  it ("local-cached-prefix"); and not when the prefill D has queued would make
  the first token later than on the least busy prefill worker by more than
  ``local_prefill_max_tokens``. Under such a policy D is looked at first, so the
  decision is made on a worker that could decode it; after a prefill the decode
  worker is picked again, from the pool as it is then.

Placement. The prompt's block hashes are computed once at admission (and again
on a resume, over prompt + sent tokens); each attempt looks them up once in the
prefix index (``kv_state.index(model)``, set by the server's wiring; none: no
worker holds anything) and gives every policy call the per-worker cached
prefix. The router counts the uncached prompt tokens of each prefill in flight
per worker (``WorkerState.in_flight_prefill_tokens``), because KV events and
heartbeats lag: a Prefill call until it is answered, and a local prefill (Decode
without KV) on its decode worker until the stream's first token (or its end, on
any path), so a burst arriving within one heartbeat does not all go local to one
decode worker. The final message's ServingInfo carries the placement and the
policy; ``placement_metrics.PLACEMENTS`` counts placements by reason.

An attempt that fails in a way another worker can make good (WorkerLost:
UNAVAILABLE, a hang past the prefill timeout, a worker removed for missing
heartbeats, a stream cut short or aborted by a shutting-down worker) excludes
that worker's registry entry (not its id: a process restarted under the same id
is a new entry, which may serve the request) and starts another attempt over the
prompt plus the tokens already sent (see progress.py), at most ``max_retries``
times. Every other failure ends the request with the worker's status. The
client sees each token once and exactly one final message, or a non-OK status;
when messages were already sent, a failure sends a final FINISH_REASON_ERROR
message first.

A client that cancels (or whose deadline passes) cancels the task running this
generator; the worker call in progress is cancelled with it, so workers free
the request's blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing

import grpc

from services.kv_transfer import layout as kv_layout
from services.router import placement_metrics as placements
from services.router.admission import TokenizerCache, admit
from services.router.channels import WorkerChannels
from services.router.config import RouterConfig
from services.router.errors import RouteError, WorkerLost
from services.router.placement_metrics import PLACEMENTS, RETRIES
from services.router.policies import Policy, RoutingRequest, prefill_work
from services.router.progress import Progress
from services.router.registry import (
    DECODE,
    PREFILL,
    ROLE_NAMES,
    InFlightPrefill,
    WorkerRegistry,
    WorkerState,
)
from services.stubs.tandem.v1 import inference_pb2, worker_pb2

log = logging.getLogger(__name__)

_FINISHED = (inference_pb2.FINISH_REASON_STOP, inference_pb2.FINISH_REASON_LENGTH)
_RESUMABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
"""Statuses from a worker that mean it (not the request) failed. CANCELLED here is the
worker's doing (e.g. it stopped); the client's own cancel arrives as asyncio.CancelledError."""
_WRONG_WORKER_CODES = (grpc.StatusCode.NOT_FOUND,)
"""A worker's Prefill/Decode NOT_FOUND: it does not serve the request's model (another
worker now listens at a stale registration's address). Not the client's fault, nor its to
see (the worker names its model): the request goes elsewhere."""
_NO_FINAL_CODES = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
"""Ended by the caller (cancel, deadline): no final message, as inference.proto says."""
_AFTER_MESSAGES_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
"""The statuses a stream may end with after its final FINISH_REASON_ERROR message."""
KV_LEASE_MIN_LEFT_MS = 500
"""A prefill's KV handle with less of its lease left than this when Decode is sent (or than
half its lease, when the lease is under twice this) is not sent: the decode worker keeps up
to 0.5 s of the lease unused (its LEASE_MARGIN_S), so a read would have next to no time;
it prefills the prompt itself. The half keeps a short lease (tests, tight pools) usable."""


class Orchestrator:
    """Runs Generate and ListModels over the registry's workers."""

    def __init__(
        self,
        registry: WorkerRegistry,
        policy: Policy,
        config: RouterConfig,
        tokenizers: TokenizerCache | None = None,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.config = config
        self.tokenizers = tokenizers or TokenizerCache()
        self.channels = WorkerChannels(config.tls)
        registry.add_remove_listener(self.channels.drop)
        self._attempt_seq = itertools.count(1)
        # Attempt ids are "<request_id>#<this router>.<n>": the router part keeps them unique
        # across router restarts and replicas, so a client's retry of one request_id never
        # meets the pin an earlier router left on a prefill worker (refused as a duplicate).
        self._attempt_prefix = uuid.uuid4().hex[:8]
        self._background: set[asyncio.Task[None]] = set()
        self.kv_state: object | None = None
        """The KV event stream's state, set by the server's wiring: ``index(model)`` gives
        the model's KVIndex or None. None here: no index, nothing counts as cached."""

    def list_models(self) -> inference_pb2.ListModelsResponse:
        """The models live workers serve."""
        return inference_pb2.ListModelsResponse(
            models=[
                inference_pb2.ModelCard(
                    id=m.model, max_context_length=m.max_context_length, vocab_size=m.vocab_size
                )
                for m in self.registry.models()
            ]
        )

    async def generate(
        self, request: inference_pb2.GenerateRequest, timeout: float | None = None
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Yield the client's messages; the last one yielded is the final one, unless this
        raises: a TandemError (InvalidRequestError, RouteError, ...) whose status the
        client must get. When messages were yielded before a RouteError, the last of
        them is a FINISH_REASON_ERROR message. ``timeout`` is the client's remaining
        deadline in seconds (None: none); it bounds every worker call."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        progress = Progress(await admit(request, self.registry, self.tokenizers))
        progress.policy = self.policy.name
        failed: set[WorkerState] = set()
        """Registry entries (not ids) that failed this request; never picked for it again."""
        try:
            while True:
                if progress.exhausted:
                    yield progress.final(inference_pb2.FINISH_REASON_LENGTH)
                    return
                try:
                    async with aclosing(self._attempt(progress, failed, deadline)) as messages:
                        async for message in messages:
                            yield message
                    return
                except WorkerLost as lost:
                    failed.add(lost.worker)
                    self._count_failure(progress, lost)
        except RouteError as error:
            if not progress.started or error.code in _NO_FINAL_CODES:
                raise
            yield progress.final(inference_pb2.FINISH_REASON_ERROR)
            if error.code in _AFTER_MESSAGES_CODES:
                raise
            # inference.proto: after messages, only INTERNAL or UNAVAILABLE.
            raise RouteError(grpc.StatusCode.INTERNAL, f"{error.code.name}: {error}") from error

    async def close(self) -> None:
        """Close worker channels and wait for background ReleaseKV calls."""
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.channels.close()

    # ---------------------------------------------------------------- attempts
    async def _attempt(
        self, progress: Progress, failed: set[WorkerState], deadline: float | None
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """One placement: prefill (when a prefill worker is left and needed) then decode."""
        model = progress.admitted.model
        fresh = not progress.sent
        attempt = f"{self._attempt_prefix}.{next(self._attempt_seq)}"
        request = progress.attempt_request(f"{progress.request_id}#{attempt}")
        decoders = await self._decoders(progress, failed, deadline)
        self._count_retry(progress)
        routing = self._routing(progress)
        prefill_worker: WorkerState | None = None
        decoder: WorkerState | None = None
        first: worker_pb2.PrefillResponse | None = None
        answered = 0.0  # when the prefill answered (time.monotonic): its lease counts from then
        progress.prefill_worker = progress.decode_worker = ""
        prefillers = self._candidates(progress, failed, PREFILL)
        if not prefillers:
            progress.placement = (
                placements.LOCAL_PREFILL_FAILED
                if self.registry.candidates(model, PREFILL)
                else placements.LOCAL_NO_PREFILL_WORKER
            )
        elif self.policy.prefix_aware:
            # The list _decoders checked is not empty; a fresh lookup could be (a worker's
            # heartbeat timing out in between), and an empty pick was an INTERNAL error.
            decoder = self._pick(decoders, routing, DECODE)
            local = self._local_reason(routing, decoder, prefillers)
            progress.placement = local or placements.DISAGGREGATED
        else:
            progress.placement = placements.DISAGGREGATED
        PLACEMENTS.labels(progress.placement).inc()
        if progress.placement == placements.DISAGGREGATED:
            prefill_worker = self._pick(prefillers, routing, PREFILL)
            progress.prefill_worker = prefill_worker.worker_id
            with InFlightPrefill(prefill_worker, routing.uncached_tokens(prefill_worker.worker_id)):
                first = await self._prefill(prefill_worker, request, deadline)
            answered = time.monotonic()
            if fresh:
                progress.record_cached(first.cached_tokens)
            if first.finish_reason:
                reason = _prefill_finish(prefill_worker, first)
                yield progress.final(reason, [first.first_token_id], first.first_text)
                return
        elif progress.placement == placements.LOCAL_PREFILL_FAILED:
            log.warning(
                "request %s: every prefill worker failed it; the decode worker prefills locally",
                progress.request_id,
            )
        released = first is None
        try:
            if first is not None:  # in the try: a client gone at this yield frees the KV too
                yield progress.chunk([first.first_token_id], first.first_text)
            # After a prefill, pick again: the early pick only chose the placement. Held
            # through the prefill, uncounted as load until Decode is sent, it sent every
            # request arriving within one prefill time to the same decode worker, and to
            # one that began draining meanwhile.
            if first is not None or decoder is None or decoder.gone.is_set() or decoder.draining:
                decoders = await self._decoders(progress, failed, deadline)
                if first is not None and prefill_worker is not None:
                    decoders = _kv_reachable(decoders, prefill_worker)
                decoder = self._pick(decoders, routing, DECODE)
            progress.decode_worker = decoder.worker_id
            handoff = first
            if first is not None and prefill_worker is not None:
                handoff = _lease_left(first, time.monotonic() - answered)
                if handoff is None:  # its blocks may hold another prompt's KV by now
                    self._release_kv(prefill_worker, first.kv)
                    released = True
                    request = self._expired_handoff(progress, prefill_worker, request)
                    fresh = False  # the prefill's cache hits are recorded; keep them
            local = 0 if handoff is not None else _local_prefill_tokens(progress, routing, decoder)
            async with aclosing(
                self._decode(progress, decoder, request, handoff, fresh, deadline, local)
            ) as messages:
                async for message in messages:
                    # A decode worker releases the prefill side before its first message
                    # (read or not): a second ReleaseKV from here only met NOT_FOUND.
                    released = True
                    yield message
            released = True
        finally:
            if not released and prefill_worker is not None and first is not None:
                self._release_kv(prefill_worker, first.kv)

    def _expired_handoff(
        self,
        progress: Progress,
        prefill_worker: WorkerState,
        request: inference_pb2.GenerateRequest,
    ) -> inference_pb2.GenerateRequest:
        """The Decode request once the prefill's KV lease ran out (the wait for a decode
        worker outlasted it): no handle, and the first token, already sent, becomes prompt,
        as on a resume, so the decode worker prefills it all and never repeats it."""
        log.warning(
            "request %s: the KV lease of prefill worker %s ran out before Decode was sent; "
            "the decode worker prefills locally",
            progress.request_id,
            prefill_worker.worker_id,
        )
        return progress.attempt_request(request.request_id)

    def _local_reason(
        self, routing: RoutingRequest, decoder: WorkerState, prefillers: list[WorkerState]
    ) -> str:
        """Why ``decoder`` should prefill this prompt itself, or "" to disaggregate.

        Never when the prefill already queued on it would make the first token later than
        on the least busy prefill worker by more than a short prompt's worth (what a KV
        handoff costs): a short prompt sent to a decode worker with 20,000 tokens of
        prefill queued waited behind them all while the prefill pool idled."""
        slack = self.config.local_prefill_max_tokens
        if routing.uncached_tokens(decoder.worker_id) <= slack:
            reason = placements.LOCAL_SHORT_PROMPT
        elif routing.cached_fraction(decoder.worker_id) >= self.config.local_prefill_min_cached:
            reason = placements.LOCAL_CACHED_PREFIX
        else:
            return ""
        pool = min(prefill_work(p, routing) for p in prefillers)
        return reason if prefill_work(decoder, routing) <= pool + slack else ""

    async def _prefill(
        self, worker: WorkerState, request: inference_pb2.GenerateRequest, deadline: float | None
    ) -> worker_pb2.PrefillResponse:
        timeout, own_limit = self._timeout(deadline, self.config.prefill_timeout_s)
        prefill_request = worker_pb2.PrefillRequest(
            request=request, lease_ms=self.config.kv_lease_ms
        )
        with worker.dispatched():
            call = self.channels.prefill(worker).Prefill(prefill_request, timeout=timeout)
            try:
                return await call
            except asyncio.CancelledError:
                if _vanished(worker):
                    raise WorkerLost(worker, "stopped heartbeating during prefill") from None
                self._release_unanswered(worker, request)
                raise
            except grpc.aio.AioRpcError as err:
                if err.code() in _GAVE_UP:
                    self._release_unanswered(worker, request)
                raise self._failure(worker, "prefill", err, own_limit) from None
            finally:
                if not call.done():
                    call.cancel()

    async def _decode(
        self,
        progress: Progress,
        worker: WorkerState,
        request: inference_pb2.GenerateRequest,
        first: worker_pb2.PrefillResponse | None,
        fresh: bool,
        deadline: float | None,
        local_tokens: int = 0,
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Relay one Decode stream; returns after relaying its final STOP/LENGTH message.

        ``local_tokens``: the prompt tokens ``worker`` prefills itself (no KV handle), counted
        in its in-flight prefill from here (no await since the placement) until its first
        token or final message arrives, or the stream ends any other way. Not until the
        stream's end: a decoding request is no prefill work, and counting it so made a
        decode worker with long generations look busy for as long as they ran."""
        decode_request = worker_pb2.DecodeRequest(
            request=request, kv_timeout_ms=self.config.kv_timeout_ms
        )
        if first is not None:
            decode_request.first_token_id = first.first_token_id
            decode_request.kv.CopyFrom(first.kv)
        timeout, _ = self._timeout(deadline, None)
        error_reported = False
        with worker.dispatched(), InFlightPrefill(worker, local_tokens) as prefilling:
            call = self.channels.decode(worker).Decode(decode_request, timeout=timeout)
            try:
                while True:
                    message = await self._read(worker, call)
                    if message is grpc.aio.EOF:
                        break
                    reason = message.finish_reason
                    tokens = list(message.token_ids)
                    if tokens or reason:  # prefilled (or failed): before a yield that may wait
                        prefilling.done()
                    if fresh and first is None and message.HasField("usage"):
                        # The worker's first token and its final say what its prefill of
                        # the prompt found cached: from the first, a stream that dies before
                        # its final still reports the hits after the resume.
                        progress.record_cached(message.usage.cached_tokens)
                    if reason in _FINISHED:
                        reported = message.serving if message.HasField("serving") else None
                        yield progress.final(reason, tokens, message.text, reported)
                        return
                    if tokens or message.text:
                        yield progress.chunk(tokens, message.text)
                    if reason == inference_pb2.FINISH_REASON_CANCELLED:
                        raise WorkerLost(worker, "aborted the request (shutting down?)")
                    error_reported = error_reported or reason == inference_pb2.FINISH_REASON_ERROR
            finally:
                if not call.done():
                    call.cancel()
        if error_reported:
            raise RouteError(
                grpc.StatusCode.INTERNAL, f"decode worker {worker.worker_id!r} failed the request"
            )
        raise WorkerLost(worker, "ended its stream without a final message")

    async def _read(
        self, worker: WorkerState, call: grpc.aio.UnaryStreamCall
    ) -> inference_pb2.GenerateResponse | object:
        """The next message, or grpc.aio.EOF once the stream ended with OK."""
        try:
            return await call.read()
        except asyncio.CancelledError:
            if _vanished(worker):
                raise WorkerLost(worker, "stopped heartbeating during decode") from None
            raise
        except grpc.aio.AioRpcError as err:
            raise self._failure(worker, "decode", err, own_limit=False) from None

    # ----------------------------------------------------------------- helpers
    async def _decoders(
        self, progress: Progress, failed: set[WorkerState], deadline: float | None
    ) -> list[WorkerState]:
        """The decode candidates. When none is left and the client already has tokens (no
        retry can replay them), wait for one to join (a decode worker restarting), up to
        ``decode_wait_s`` and the client's deadline, rather than end the stream half sent."""
        decoders = self._candidates(progress, failed, DECODE)
        if decoders:
            return decoders
        wait = self.config.decode_wait_s if progress.started else 0.0
        left = None if deadline is None else deadline - asyncio.get_running_loop().time()
        by_deadline = left is not None and left < wait
        if by_deadline:
            wait = left
        if wait <= 0:
            raise self._no_worker(progress, failed, DECODE, deadline_passed=by_deadline)
        log.warning(
            "request %s: no decode worker left after %d tokens sent; waiting up to %.1f s for "
            "one to join",
            progress.request_id,
            len(progress.sent),
            wait,
        )
        # A worker that failed this request and registers again (restarted under the same
        # id: compose, a Kubernetes container restart) is a new entry: taken.
        decoders = await self.registry.wait_for_candidates(
            progress.admitted.model, DECODE, lambda w: w not in failed, wait
        )
        if not decoders:
            waited = f"; waited {wait:.1f} s for one"
            raise self._no_worker(progress, failed, DECODE, waited, deadline_passed=by_deadline)
        return decoders

    def _candidates(
        self, progress: Progress, failed: set[WorkerState], role: int
    ) -> list[WorkerState]:
        """The registry's candidates but the entries that failed this request (by identity:
        a worker re-registered under a failed one's id is a new process)."""
        candidates = self.registry.candidates(progress.admitted.model, role)
        return [w for w in candidates if w not in failed]

    def _routing(self, progress: Progress) -> RoutingRequest:
        """The request's routing facts for this attempt, with one prefix-index lookup."""
        admitted = progress.admitted
        return RoutingRequest(
            request_id=progress.request_id,
            model=admitted.model,
            role=DECODE,
            prompt_token_ids=progress.tokens_to_prefill(),
            cached_blocks=self._cached_blocks(admitted.model, progress),
            block_size=admitted.block_size,
        )

    def _cached_blocks(self, model: str, progress: Progress) -> Mapping[str, int]:
        """Worker id → leading blocks of the attempt's prompt it holds ({} without an index)."""
        kv_state = getattr(self, "kv_state", None)
        index = kv_state.index(model) if kv_state is not None else None
        hashes = progress.block_hashes()
        if index is None or not hashes:
            return {}
        return index.longest_prefix(hashes)

    def _pick(
        self, candidates: list[WorkerState], routing: RoutingRequest, role: int
    ) -> WorkerState:
        return self.policy.pick(candidates, dataclasses.replace(routing, role=role))

    def _count_failure(self, progress: Progress, lost: WorkerLost) -> None:
        """Note ``lost`` (its worker is excluded by the caller) for the next attempt to
        count as a retry; RouteError once retries run out."""
        if progress.exhausted:
            return  # nothing left to generate: generate() ends with LENGTH
        if progress.retries >= self.config.max_retries:  # counts retries made, not failures
            raise RouteError(
                grpc.StatusCode.UNAVAILABLE,
                f"gave up after {self.config.max_retries} retries; last failure: {lost}",
            )
        progress.last_failure = str(lost)  # a retry once the next attempt finds a worker

    def _count_retry(self, progress: Progress) -> None:
        """The attempt after a failure found a worker: one retry made."""
        if progress.last_failure is None:
            return
        progress.retries += 1
        RETRIES.inc()
        log.warning(
            "request %s: %s; retrying elsewhere after %d tokens sent (retry %d)",
            progress.request_id,
            progress.last_failure,
            len(progress.sent),
            progress.retries,
        )
        progress.last_failure = None

    def _no_worker(
        self,
        progress: Progress,
        failed: set[WorkerState],
        role: int,
        waited: str = "",
        deadline_passed: bool = False,
    ) -> RouteError:
        """UNAVAILABLE naming what is missing; DEADLINE_EXCEEDED (no final message, as
        inference.proto says) when the client's deadline is what ended the wait for one."""
        model = progress.admitted.model
        message = f"no {ROLE_NAMES[role]} worker left for model {model!r}"
        failed_ids = sorted({w.worker_id for w in failed})
        if failed_ids:
            message += f" (failed for this request: {', '.join(failed_ids)})"
        draining = self.registry.draining(model, role)
        if draining:
            message += f" (draining, taking no new requests: {', '.join(draining)})"
        if deadline_passed:
            return RouteError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the request's deadline passed while waiting: {message}{waited}",
            )
        return RouteError(grpc.StatusCode.UNAVAILABLE, message + waited)

    def _timeout(self, deadline: float | None, limit: float | None) -> tuple[float | None, bool]:
        """The timeout of one worker call, and whether it is ``limit`` (ours) rather than
        the client's remaining deadline."""
        if deadline is None:
            return limit, limit is not None
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise RouteError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed")
        if limit is not None and limit < remaining:
            return limit, True
        return remaining, False

    def _failure(
        self, worker: WorkerState, stage: str, err: grpc.aio.AioRpcError, own_limit: bool
    ) -> Exception:
        """WorkerLost for failures another worker can make good, else the client's status."""
        code, details = err.code(), err.details() or ""
        if code in _RESUMABLE_CODES or code in _WRONG_WORKER_CODES:
            return WorkerLost(worker, f"failed {stage} with {code.name}: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            if own_limit:
                return WorkerLost(
                    worker, f"did not answer {stage} within {self.config.prefill_timeout_s:g} s"
                )
            return RouteError(code, f"the request's deadline passed during {stage}")
        return RouteError(code, f"{stage} worker {worker.worker_id!r}: {details}")

    def _release_unanswered(
        self, worker: WorkerState, request: inference_pb2.GenerateRequest
    ) -> None:
        """A prefill call given up (deadline, cancel) may have pinned blocks whose handle
        never arrived: the worker finished as the call ended, or its answer was lost in
        transit. Release them by the attempt's request id (unique to this call) rather
        than leave them pinned until the lease ends; NOT_FOUND when nothing was pinned."""
        self._release_kv(worker, worker_pb2.KVHandle(request_id=request.request_id))

    def _release_kv(self, worker: WorkerState, kv: worker_pb2.KVHandle) -> None:
        """Best effort: unpin blocks that no decode worker will read (else the lease does)."""
        if worker.gone.is_set() or not kv.request_id:
            return

        async def release() -> None:
            try:
                await self.channels.prefill(worker).ReleaseKV(
                    worker_pb2.ReleaseKVRequest(request_id=kv.request_id),
                    timeout=self.config.release_timeout_s,
                )
            except grpc.aio.AioRpcError as err:  # NOT_FOUND: already released or expired
                log.debug("ReleaseKV %s on %s: %s", kv.request_id, worker.worker_id, err.code())

        task = asyncio.get_running_loop().create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _local_prefill_tokens(progress: Progress, routing: RoutingRequest, decoder: WorkerState) -> int:
    """The prompt tokens ``decoder`` computes when it prefills this attempt itself: the
    attempt's prompt (with the first token, after an expired handoff) after its prefix."""
    return len(progress.tokens_to_prefill()) - routing.cached_tokens(decoder.worker_id)


def _kv_reachable(decoders: list[WorkerState], prefill_worker: WorkerState) -> list[WorkerState]:
    """The decode workers the prefill worker's KV can move to (same --kv-layout, KV dtype
    and release); all of them when none can, as while a rolling upgrade has replaced every
    decode worker but not yet this prefill worker: the pair then prefills again on the
    decode worker, which a hand-off to a mismatched one would do anyway, a handshake later."""
    reachable = [d for d in decoders if kv_layout.compatible(d.layout, prefill_worker.layout)]
    return reachable or decoders


def _lease_left(
    first: worker_pb2.PrefillResponse, elapsed_s: float
) -> worker_pb2.PrefillResponse | None:
    """``first`` with its KV lease reduced by ``elapsed_s`` since the prefill answered (the
    decode worker counts the lease from its own arrival), or None when too little is left
    (see KV_LEASE_MIN_LEFT_MS). A handle without a lease (lease_ms 0) goes as is."""
    lease_ms = first.kv.lease_ms
    if not lease_ms:
        return first
    left_ms = lease_ms - math.ceil(elapsed_s * 1000)
    if left_ms < min(KV_LEASE_MIN_LEFT_MS, lease_ms // 2):
        return None
    handoff = worker_pb2.PrefillResponse()
    handoff.CopyFrom(first)
    handoff.kv.lease_ms = left_ms
    return handoff


def _prefill_finish(worker: WorkerState, first: worker_pb2.PrefillResponse) -> int:
    """The finish reason of a prefill that ended its request: STOP or LENGTH. Any other
    comes with no real first token; they are failures, handled as a Decode stream's:
    CANCELLED (the worker aborted it, shutting down) resumes elsewhere, ERROR (its model
    step failed) and unknown reasons end the request with INTERNAL."""
    reason = first.finish_reason
    if reason in _FINISHED:
        return reason
    if reason == inference_pb2.FINISH_REASON_CANCELLED:
        raise WorkerLost(worker, "aborted the prefill (shutting down?)")
    name = _REASON_NAMES.get(reason, str(reason))
    raise RouteError(
        grpc.StatusCode.INTERNAL, f"prefill worker {worker.worker_id!r} failed the request ({name})"
    )


_REASON_NAMES = {number: name for name, number in inference_pb2.FinishReason.items()}

_GAVE_UP = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
"""Prefill call endings after which the worker may have pinned blocks nobody will read."""


def _vanished(worker: WorkerState) -> bool:
    """True when a call was cancelled because the registry removed its worker (its
    channel is closed on removal), not because this task itself is being cancelled."""
    task = asyncio.current_task()
    return worker.gone.is_set() and (task is None or task.cancelling() == 0)

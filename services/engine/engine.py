"""The inference engine: requests in, streamed token deltas out.

``LLMEngine`` wires the pieces together and runs one step at a time:
schedule → run the model → sample → update sequences → detokenize and check
stops → release what finished. It is synchronous and single-threaded; the
worker services drive it from one thread and hand results to asyncio.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

import torch

from services.engine.block_hash import BlockHash
from services.engine.block_pool import BlockPool
from services.engine.cpu_budget import usable_cpus
from services.engine.errors import InvalidRequestError, OutOfBlocksError
from services.engine.kv_cache import KVCache, KVLayoutName
from services.engine.kv_events import KVEventLog
from services.engine.model_config import load_model_config, model_identity
from services.engine.model_source import resolve_model
from services.engine.outputs import FinishReason, HeldKV, RequestOutput, Usage
from services.engine.runner import DTYPES, ModelRunner
from services.engine.sampler import Sampler
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import (
    ScheduledChunk,
    Scheduler,
    SchedulerConfig,
    SchedulingError,
)
from services.engine.sequence import SeqStatus, Sequence
from services.engine.text_stream import TextStream
from services.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    """Tokens per KV block; every worker a router pairs must use the same."""
    num_blocks: int | None = None
    """KV pool size in blocks; None sizes it from kv_cache_gib."""
    kv_cache_gib: float = 1.0
    """Memory for the KV pool when num_blocks is None."""
    max_num_seqs: int = 64
    """Most sequences decoding at once."""
    max_num_batched_tokens: int = 2048
    """Token budget per step (decode tokens + prefill chunks)."""
    max_model_len: int | None = None
    """Context length; None takes the model's (capped to Mistral's sliding window)."""
    dtype: str | None = None
    """float32, bfloat16 or float16; None keeps the checkpoint's."""
    device: str | None = None
    """cpu or cuda[:N]; None picks cuda when available."""
    enable_prefix_caching: bool = True
    """Reuse KV of full blocks shared with earlier prompts."""
    seed: int = 0
    """Seed for requests that give none."""
    num_threads: int | None = None
    """CPU threads for torch ops; None keeps torch's default (all cores). Several
    workers on one machine should split the cores, or they spin against each other."""
    kv_layout: KVLayoutName = "slot-major"
    """The KV pool's dimension order (services/engine/kv_cache.py): slot-major moves a
    run of blocks as one NIXL descriptor, layer-major as one per layer and K/V; workers
    that exchange KV must use the same."""


@dataclass(frozen=True)
class Completion:
    """A whole finished request, as ``generate`` returns it."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    usage: Usage


@dataclass(frozen=True)
class TransferTarget:
    """Local blocks reserved for a prompt's KV arriving from a prefill worker."""

    block_ids: tuple[int, ...]
    num_reused: int
    """Leading blocks this worker's prefix cache already held: not to be read."""


@dataclass
class _Request:
    seq: Sequence
    text: TextStream
    eos: frozenset[int]
    prefill_only: bool = False
    lease_s: float = 0.0


class LLMEngine:
    def __init__(self, model: str, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        elif torch.get_num_threads() > (budget := usable_cpus()):
            # torch counts the machine's cores; a container's CPU limit is what it gets
            torch.set_num_threads(budget)
        self.model_dir = resolve_model(model)
        self.model_config = mc = load_model_config(self.model_dir)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.model_id = model_identity(self.model_dir)
        self.max_model_len = self._max_model_len()
        self.device = torch.device(
            config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.dtype = _torch_dtype(config.dtype or default_dtype(mc.dtype, self.device))
        num_blocks = config.num_blocks or self._blocks_for_memory()
        # The KV pool first: one too big for memory is refused naming --kv-cache-gib
        # before its bookkeeping (a list per block) can fail as a bare MemoryError.
        self.runner = ModelRunner(
            self.model_dir,
            mc,
            dtype=self.dtype,
            device=self.device,
            num_blocks=num_blocks,
            block_size=config.block_size,
            max_model_len=self.max_model_len,
            kv_layout=config.kv_layout,
        )
        self.events = KVEventLog()
        self.pool = BlockPool(num_blocks, config.block_size, self.events)
        self.scheduler = Scheduler(
            self.pool,
            SchedulerConfig(
                config.max_num_seqs, config.max_num_batched_tokens, config.enable_prefix_caching
            ),
            self.model_id,
        )
        self.sampler = Sampler(self.device, config.seed)
        self._requests: dict[str, _Request] = {}
        self._held: dict[str, HeldKV] = {}
        self._arrivals = 0
        self.stalled = False
        """The last step scheduled nothing and preempted nothing: until something changes
        (a request added, aborted or released, a lease expiring, KV arriving) another step
        would do nothing. The engine loop then waits for its next command or tick instead
        of stepping again (it spun at ~240,000 empty steps a second, a core and the GIL,
        while a prompt waited for blocks held by leases)."""
        self.num_lease_expiries = 0
        self.num_kept_blocks = 0
        """Blocks ``keep_blocks`` holds out of use (a transfer that may still write them)."""

    # ------------------------------------------------------------------ public
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        prefill_only: bool = False,
        lease_s: float = 30.0,
    ) -> None:
        """Queue a request; raises InvalidRequestError / OutOfBlocksError and changes nothing.

        With ``prefill_only`` the request stops after its first token: unless that
        token finishes it, its final output has no finish reason and its prompt's
        blocks stay pinned for ``lease_s`` seconds (``held``) for a decode worker.
        """
        self._validate(request_id, prompt_token_ids, params)
        req = self._new_request(request_id, list(prompt_token_ids), params)
        req.prefill_only, req.lease_s = prefill_only, lease_s
        with self._registered_only_if_queued(request_id):
            self.scheduler.add(req.seq)

    def add_transferred_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token: int,
        params: SamplingParams,
        wait_for_room: bool = False,
    ) -> TransferTarget | None:
        """Admit a request prefilled elsewhere, whose first token is known.

        Reserves blocks for the prompt's KV (reusing this worker's prefix cache)
        and returns them; the caller copies the KV in, then calls
        ``transfer_done``. Returns None when the pool cannot hold it now, or the batch
        already has ``max_num_seqs`` sequences (running or receiving): the
        request is then queued to be prefilled here instead, or, with
        ``wait_for_room``, queued to receive its KV once there is room
        (``admit_awaiting``), which spares this worker the prefill.
        """
        self._validate(request_id, list(prompt_token_ids), params, first_token)
        req = self._new_request(request_id, list(prompt_token_ids), params, first_token)
        seq = req.seq
        with self._registered_only_if_queued(request_id):
            reused = self.scheduler.reserve_for_transfer(seq, len(prompt_token_ids), wait_for_room)
            if reused is None:
                if not wait_for_room:
                    self.scheduler.add(seq)
                return None
        return TransferTarget(tuple(seq.block_table), reused)

    @contextlib.contextmanager
    def _registered_only_if_queued(self, request_id: str) -> Iterator[None]:
        """Undo ``_new_request`` when queueing it fails: a request registered but in no
        queue never finishes, keeps ``has_unfinished`` true and its id taken for ever."""
        try:
            yield
        except BaseException:
            self._requests.pop(request_id, None)
            raise

    def admit_awaiting(self, give_up: Collection[str] = ()) -> dict[str, TransferTarget]:
        """Reserve blocks for requests waiting for room to receive their KV, first come
        first served, while they fit; then queue those in ``give_up`` still waiting to be
        prefilled here. Returns the admitted ones' targets (copy, then ``transfer_done``)."""
        admitted = {
            seq.request_id: TransferTarget(tuple(seq.block_table), reused)
            for seq, reused in self.scheduler.admit_awaiting()
        }
        for request_id in give_up:
            req = self._requests.get(request_id)
            if req is not None and req.seq.status == SeqStatus.AWAITING_ROOM:
                self.scheduler.give_up_awaiting(req.seq)
        return admitted

    @property
    def num_awaiting_room(self) -> int:
        """Requests prefilled elsewhere waiting for room to receive their KV."""
        return len(self.scheduler.awaiting_room)

    def transfer_done(self, request_id: str, ok: bool) -> None:
        """The KV copy for ``add_transferred_request`` finished; on failure, prefill here."""
        req = self._requests.get(request_id)
        if req is not None and req.seq.status == SeqStatus.AWAITING_KV:
            self.scheduler.transfer_done(req.seq, req.seq.num_prompt_tokens, ok)

    def held(self, request_id: str) -> HeldKV | None:
        """The pinned blocks of a finished prefill-only request, if still pinned."""
        return self._held.get(request_id)

    def release_held(self, request_id: str) -> bool:
        """Unpin a prefill's blocks (the decode side has them); False if none are pinned."""
        held = self._held.pop(request_id, None)
        if held is None:
            return False
        self.pool.release(list(reversed(held.block_ids)))
        return True

    def expire_held(self, now: float | None = None) -> list[str]:
        """Release every lease that ran out; returns their request ids."""
        now = time.monotonic() if now is None else now
        expired = [rid for rid, h in self._held.items() if h.expires_at <= now]
        for rid in expired:
            self.release_held(rid)
        self.num_lease_expiries += len(expired)
        return expired

    def kv_snapshot(self) -> tuple[list[BlockHash], int]:
        """(every cached block hash, the seq of the next event), consistently.

        Buffered events are dropped: the snapshot already contains their effect,
        and a subscriber resumes from the returned seq.
        """
        self.events.drain()
        return self.pool.cached_hashes(), self.events.next_seq

    def has_schedulable(self) -> bool:
        """True when a step would do work (requests awaiting KV are not scheduled)."""
        return self.scheduler.has_work()

    def keep_blocks(self, block_ids: Collection[int]) -> list[int]:
        """Take a reference on each block in use, so none returns to the free pool when its
        request lets go (a transfer may still write them); returns those taken, for
        ``unkeep_blocks``. Free blocks are skipped: too late to guard them."""
        kept = [b for b in block_ids if self.pool.ref_count(b) > 0]
        self.pool.acquire(kept)
        self.num_kept_blocks += len(kept)
        return kept

    def unkeep_blocks(self, kept: list[int]) -> None:
        """Drop the references ``keep_blocks`` took."""
        self.pool.release(list(reversed(kept)))
        self.num_kept_blocks -= len(kept)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; returns its final CANCELLED delta."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        return self._finish(req, FinishReason.CANCELLED, "")

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    @property
    def num_held(self) -> int:
        """Finished prefills whose blocks stay pinned for a decode worker to read."""
        return len(self._held)

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns a delta for every request that produced output.

        A failure is contained to the requests it concerns: one request's sampling or
        appending failing ends that request alone with an ERROR output (its blocks freed);
        a failure of the forward pass or of the bookkeeping after it ends every request in
        the step the same way; a failure while scheduling a request ends that request, and
        the step runs nothing else (the next one does). The others carry on as if nothing
        had happened.
        """
        preemptions = self.scheduler.num_preemptions
        self.stalled = False
        try:
            chunks = self.scheduler.schedule()
        except SchedulingError as e:
            # The chunks scheduled before it simply run on the next pass: their blocks stay
            # allocated and their tokens uncomputed, which the scheduler picks up again.
            log.exception("%s; failing that request", e)
            return [self._fail(e.seq)]
        if not chunks:
            self.stalled = self.scheduler.num_preemptions == preemptions
            return []
        sampling = [c for c in chunks if c.samples]  # before postprocess moves the counters
        try:
            logits = self.runner.execute(chunks)
            self.scheduler.postprocess(chunks)
        except Exception:
            log.exception("model step failed; failing the %d requests in it", len(chunks))
            return [self._fail(c.seq) for c in chunks]
        outputs: list[RequestOutput] = []
        for chunk, token in zip(sampling, self._sample_each(logits, sampling), strict=True):
            if token is None:
                outputs.append(self._fail(chunk.seq))
                continue
            try:
                out = self._append(chunk, token)
            except Exception:
                log.exception("appending a token to request %r failed", chunk.seq.request_id)
                out = self._fail(chunk.seq)
            if out is not None:
                outputs.append(out)
        return outputs

    def fail_running(self) -> list[RequestOutput]:
        """End every request in the running batch with ERROR and free its blocks.

        For a step that failed in a way nothing could attribute to a request (the engine
        loop calls it): their streams end instead of waiting forever, and the requests
        waiting or receiving KV are served next as usual."""
        return [self._fail(seq) for seq in list(self.scheduler.running)]

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        on_progress: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """Run prompts to completion together (continuous batching); results in input order."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{self._arrivals + i}" for i in range(len(prompts))]
        added: list[str] = []
        try:  # all or nothing: a bad later prompt must not leave the earlier ones running
            for rid, prompt, p in zip(ids, prompts, per_prompt, strict=True):
                self.add_request(rid, prompt, p)
                added.append(rid)
        except BaseException:
            for rid in added:
                self.abort(rid)
            raise
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        texts: dict[str, list[str]] = {rid: [] for rid in ids}
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.step():
                if out.request_id not in tokens:
                    continue  # another caller's request, added with add_request
                tokens[out.request_id] += out.token_ids
                texts[out.request_id].append(out.text)
                if out.finished:
                    done[out.request_id] = out
                    if on_progress:
                        on_progress(1)
        return [
            Completion(tuple(tokens[r]), "".join(texts[r]), done[r].finish_reason, done[r].usage)
            for r in ids
        ]

    # --------------------------------------------------------------- internals
    def _new_request(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        first_token: int | None = None,
    ) -> _Request:
        """The request's state; ``first_token``: one a prefill worker already sampled (and
        sent), which counts as the first of ``max_tokens``."""
        seq = Sequence(
            request_id=request_id,
            token_ids=prompt if first_token is None else [*prompt, first_token],
            params=params,
            max_total_tokens=min(len(prompt) + params.max_tokens, self.max_model_len),
            arrival=self._arrivals,
        )
        seq.num_prompt_tokens = len(prompt)
        self._arrivals += 1
        eos = frozenset() if params.ignore_eos else self.tokenizer.eos_token_ids
        # The prompt is the detokenizer's context: the first token's text keeps the
        # leading space a SentencePiece decoder would strip at the start of a text.
        req = _Request(seq, TextStream(self.tokenizer, params.stop, prompt), eos)
        if first_token is not None:  # its text went out from the prefill worker
            req.text.push(first_token, check_stop=False)
        self._requests[request_id] = req
        return req

    def _validate_first_token(self, first_token: int, params: SamplingParams) -> None:
        """A token a prefill worker sampled: in the vocabulary, and not the last one allowed
        (then the prefill's answer was the whole completion, and decoding would exceed it)."""
        vocab = self.model_config.vocab_size
        if type(first_token) is not int or not 0 <= first_token < vocab:
            raise InvalidRequestError("first_token_id", _bad_token(first_token, vocab))
        if params.max_tokens < 2:
            raise InvalidRequestError(
                "max_tokens",
                f"is {params.max_tokens}, and the prefill's first token already is the whole "
                "completion: there is nothing left to decode (the prefill's answer is final)",
            )

    def _validate(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        first_token: int | None = None,
    ) -> None:
        """Raise what is wrong with a request before anything changes; ``first_token`` as
        in ``_new_request`` (checked like a prompt token, sized as an output)."""
        if request_id in self._requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        if request_id in self._held:  # a second pin would orphan the first one's blocks
            raise InvalidRequestError(
                "request_id",
                f"{request_id!r} already holds KV for a decode worker; release it (ReleaseKV) "
                "or wait for its lease to expire before reusing the id",
            )
        params.validate()
        if not prompt:
            raise InvalidRequestError("prompt", "is empty; give at least one token")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt if type(t) is not int or not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError("prompt_token_ids", _bad_token(bad, vocab))
        tokens = prompt
        if first_token is not None:
            self._validate_first_token(first_token, params)
            tokens = [*prompt, first_token]
        if len(tokens) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt",
                f"has {len(tokens)} tokens; the model's context holds {self.max_model_len}, "
                f"so a prompt may have at most {self.max_model_len - 1}",
            )
        total = min(len(prompt) + params.max_tokens, self.max_model_len)
        needed = -(-total // self.config.block_size)
        if needed > self.pool.num_blocks:
            raise OutOfBlocksError(
                f"the request needs {needed} KV blocks ({total} tokens) but this worker's pool "
                f"holds {self.pool.num_blocks}; lower max_tokens or shorten the prompt"
            )

    def _sample(self, logits: torch.Tensor, chunks: list[ScheduledChunk]) -> list[int]:
        reqs = [self._requests[c.seq.request_id] for c in chunks]
        suppress = [
            r.eos if r.seq.num_output_tokens < r.seq.params.min_tokens else () for r in reqs
        ]
        return self.sampler.sample(
            logits,
            [r.seq.request_id for r in reqs],
            [r.seq.params for r in reqs],
            suppress,
            # A seeded draw depends on (seed, index) only: a decode worker continuing a
            # request prefilled elsewhere draws index 1 just as a single worker would.
            [r.seq.num_output_tokens for r in reqs],
        )

    def _sample_each(self, logits: torch.Tensor, chunks: list[ScheduledChunk]) -> list[int | None]:
        """Next token per chunk, None for a chunk whose sampling failed.

        The whole batch is sampled at once; if that fails, row by row, to find the rows
        that fail. Redrawing is safe: a seeded row's draw depends on (seed, index) only."""
        try:
            return list(self._sample(logits, chunks))
        except Exception as e:
            log.warning("sampling the batch failed (%s); sampling row by row", e)
        tokens: list[int | None] = []
        for row, chunk in enumerate(chunks):
            try:
                tokens.append(self._sample(logits[row : row + 1], [chunk])[0])
            except Exception:
                log.exception("sampling failed for request %r", chunk.seq.request_id)
                tokens.append(None)
        return tokens

    def _fail(self, seq: Sequence) -> RequestOutput:
        """End ``seq``'s request with ERROR, freeing its blocks, whatever state a failure
        half-way through a step left it in; never raises."""
        request_id = seq.request_id
        req = self._requests.get(request_id)
        if req is not None and req.seq is seq:
            try:
                return self._finish(req, FinishReason.ERROR, "")
            except Exception:
                log.exception("cleaning up failed request %r failed", request_id)
        # Whatever is left: take it out of the engine so no later step touches it.
        if self._requests.get(request_id) is req and req is not None:
            del self._requests[request_id]
        self.sampler.forget(request_id)
        if seq in self.scheduler.running:
            self.scheduler.running.remove(seq)
        if seq in self.scheduler.waiting:
            self.scheduler.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        usage = Usage(seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_tokens or 0)
        return RequestOutput(request_id, (), "", FinishReason.ERROR, usage)

    def _append(self, chunk: ScheduledChunk, token: int) -> RequestOutput | None:
        req = self._requests[chunk.seq.request_id]
        seq = req.seq
        seq.token_ids.append(token)
        past_min = seq.num_output_tokens >= seq.params.min_tokens
        is_eos = token in req.eos
        delta, stopped = ("", False) if is_eos else req.text.push(token, check_stop=past_min)
        if stopped:
            return self._finish(req, FinishReason.STOP, delta, token)
        if is_eos and past_min:  # the EOS token has no text; release what was held back
            return self._finish(req, FinishReason.STOP, delta + req.text.finish(), token)
        if (
            seq.num_output_tokens >= seq.params.max_tokens
            or len(seq.token_ids) >= seq.max_total_tokens
        ):
            return self._finish(req, FinishReason.LENGTH, delta + req.text.finish(), token)
        if req.prefill_only:
            return self._hold(req, delta, token)
        usage = None
        if seq.num_output_tokens == 1:  # the first: what the prompt's prefill found cached
            usage = Usage(seq.num_prompt_tokens, 1, seq.num_cached_tokens or 0)
        return RequestOutput(seq.request_id, (token,), delta, None, usage)

    def _finish(
        self, req: _Request, reason: FinishReason, delta: str, token: int | None = None
    ) -> RequestOutput:
        seq = req.seq
        self.scheduler.finish(seq)
        self.sampler.forget(seq.request_id)
        del self._requests[seq.request_id]
        usage = Usage(seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_tokens or 0)
        tokens = (token,) if token is not None else ()
        return RequestOutput(seq.request_id, tokens, delta, reason, usage)

    def _hold(self, req: _Request, delta: str, token: int) -> RequestOutput:
        seq = req.seq
        self.scheduler.hold(seq)
        del self._requests[seq.request_id]
        self.sampler.forget(seq.request_id)
        held = HeldKV(
            seq.request_id,
            tuple(seq.block_table),
            seq.num_prompt_tokens,
            time.monotonic() + req.lease_s,
        )
        self._held[seq.request_id] = held
        usage = Usage(seq.num_prompt_tokens, 1, seq.num_cached_tokens or 0)
        return RequestOutput(seq.request_id, (token,), delta, None, usage, held)

    def _max_model_len(self) -> int:
        mc = self.model_config
        limit = mc.max_position_embeddings
        if mc.sliding_window:
            limit = min(limit, mc.sliding_window)
        wanted = self.config.max_model_len
        if wanted is not None and not 1 < wanted <= limit:
            raise InvalidRequestError(
                "max_model_len", f"must be in [2, {limit}] for this model, got {wanted}"
            )
        return wanted or limit

    def _blocks_for_memory(self) -> int:
        mc = self.model_config
        per_token = KVCache.bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype)
        blocks = int(self.config.kv_cache_gib * 2**30) // (per_token * self.config.block_size)
        if blocks < 1:
            raise InvalidRequestError("kv_cache_gib", "is too small to hold one block")
        return blocks


def default_dtype(checkpoint: str, device: torch.device) -> str:
    """The dtype to compute in when none is asked for: the checkpoint's, except half
    precision on a CPU without oneDNN kernels for it (no AVX512-BF16/FP16 or AMX), where
    torch's matmul falls back to scalar code: 0.8 GFLOP/s in bfloat16 against 64 in float32
    on an AVX2 EPYC core, a 1,024-token prefill of tandem-tiny 6.7 s. There the engine
    computes in float32 (twice the memory for weights and KV; ``dtype`` overrides)."""
    if device.type != "cpu" or checkpoint not in ("bfloat16", "float16"):
        return checkpoint
    probe = "_is_mkldnn_bf16_supported" if checkpoint == "bfloat16" else "_is_mkldnn_fp16_supported"
    try:
        fast = getattr(torch.ops.mkldnn, probe)()
    except (AttributeError, RuntimeError):  # a torch build without oneDNN: cannot tell
        return checkpoint
    if fast:
        return checkpoint
    log.info("this CPU has no %s matmul kernels: computing in float32", checkpoint)
    return "float32"


def _torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InvalidRequestError("dtype", f"must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _bad_token(token: object, vocab: int) -> str:
    if type(token) is not int:
        return f"token ids must be integers, got {type(token).__name__} {token!r}"
    return f"token id {token} is outside the vocabulary [0, {vocab})"

"""WorkerRegistry: which workers serve which model, how loaded they are, and who is alive.

Workers register (RegisterRequest) and then heartbeat (WorkerLoad) every
``heartbeat_interval``. A worker silent for longer than ``heartbeat_timeout_s``
is removed, by a periodic ``sweep()`` and by every lookup, so a dead worker is
never routed to after its timeout even between sweeps. Registering an id that is
already present replaces the entry (the worker restarted): the old entry counts
as removed.

Removal sets the entry's ``gone`` event, then calls the registry's listeners.
The orchestrator's listener closes the worker's channel, which cancels the
calls in flight to it; seeing ``gone`` set, the orchestrator resumes those
requests elsewhere instead of waiting on a worker that died silently.

A worker shutting down gracefully heartbeats with ``draining`` set: it stays registered
(the calls in flight to it go on; it serves its prefills' KV reads) but is no
longer a candidate for new requests.

Load has two sources: the worker's own report (lags by up to one heartbeat)
and ``in_flight``, the router's count of calls it has dispatched to the worker
and not yet seen end, which is exact and immediate.

All methods run on the event loop thread; none blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from services.engine.errors import InvalidRequestError
from services.kv_transfer import layout as kv_layout
from services.kv_transfer.errors import IncompatiblePeerError
from services.router.errors import (
    IncompatibleWorkerError,
    SupersededWorkerError,
    UnknownWorkerError,
)
from services.stubs.tandem.v1 import worker_pb2

log = logging.getLogger(__name__)

PREFILL = worker_pb2.WORKER_ROLE_PREFILL
DECODE = worker_pb2.WORKER_ROLE_DECODE
ROLE_NAMES = {PREFILL: "prefill", DECODE: "decode"}


@dataclass(eq=False)
class WorkerState:
    """One registered worker: what it registered with, its last load, the router's count."""

    worker_id: str
    role: int
    """worker_pb2.WORKER_ROLE_PREFILL or WORKER_ROLE_DECODE."""
    address: str
    """host:port serving its PrefillWorker / DecodeWorker service."""
    model: str
    """The model name clients ask for (ModelCard.id)."""
    layout: worker_pb2.KVLayout
    max_context_length: int
    vocab_size: int
    last_heartbeat: float
    """Registry clock time of the registration or the last heartbeat."""
    load: worker_pb2.WorkerLoad = field(default_factory=worker_pb2.WorkerLoad)
    """The last reported load; zeros until the first heartbeat."""
    in_flight: int = 0
    """Calls the router has dispatched here and not yet seen end."""
    in_flight_prefill_tokens: int = 0
    """Prompt tokens (beyond the worker's cached prefix) the router has sent here to prefill
    and not yet seen prefilled: Prefill calls not yet answered, and on a decode worker the
    local prefills (Decode without KV) whose first token has not arrived. Queued work no
    heartbeat shows yet; counted by ``InFlightPrefill``."""
    draining: bool = False
    """The worker is shutting down gracefully: finishing its calls, taking no new ones."""
    instance: str = ""
    """RegisterRequest.instance: the registering process ("" from workers too old to say)."""
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the entry is removed (expired, or replaced by a re-registration)."""

    @property
    def role_name(self) -> str:
        return ROLE_NAMES.get(self.role, "unknown")

    @contextmanager
    def dispatched(self) -> Iterator[None]:
        """Count one call to this worker for as long as the block runs."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


class InFlightPrefill:
    """Counts ``tokens`` in ``worker.in_flight_prefill_tokens`` from creation until ``done()``
    or the end of its ``with`` block, whichever comes first: exactly once, so no exit path
    (answer, error, cancel, retry elsewhere) can leave the count drifting."""

    def __init__(self, worker: WorkerState, tokens: int) -> None:
        self.worker = worker
        self.tokens = tokens
        worker.in_flight_prefill_tokens += tokens

    def done(self) -> None:
        """The prefill is over (or will never run): stop counting it. Idempotent."""
        self.worker.in_flight_prefill_tokens -= self.tokens
        self.tokens = 0

    def __enter__(self) -> InFlightPrefill:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.done()


@dataclass(frozen=True)
class ModelInfo:
    """What ListModels says about a model its live workers serve."""

    model: str
    max_context_length: int
    """The smallest of its workers' (a request must fit wherever it lands)."""
    vocab_size: int


RemoveListener = Callable[[WorkerState], None]


class WorkerRegistry:
    """The live workers, keyed by worker id."""

    def __init__(
        self, heartbeat_timeout_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """``clock`` returns seconds (monotonic); tests pass a fake one to step time exactly."""
        if not heartbeat_timeout_s > 0:
            raise ValueError(f"heartbeat_timeout_s must be above 0, got {heartbeat_timeout_s}")
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._clock = clock
        self._started = clock()
        self._workers: dict[str, WorkerState] = {}
        self._served_once: set[str] = set()
        self._listeners: list[RemoveListener] = []
        self._joined = asyncio.Event()
        """Set (and replaced) at every registration: wakes ``wait_for_candidates``."""

    def add_remove_listener(self, listener: RemoveListener) -> None:
        """Call ``listener(worker)`` after each removal (expiry or replacement)."""
        self._listeners.append(listener)

    # ------------------------------------------------------------ worker side
    def register(self, request: worker_pb2.RegisterRequest) -> WorkerState:
        """Add the worker, replacing an entry with the same id; returns the new entry.

        Raises InvalidRequestError naming a missing or malformed field, and
        IncompatibleWorkerError when another live worker serving the same model
        name uses a different block size or model identity: block hashes would
        never match across them (a silent 0% prefix hit rate) and KV handoff
        between them would be wrong.
        """
        _check_registration(request)
        self.sweep()
        others = [
            w
            for w in self._workers.values()
            if w.model == request.model and w.worker_id != request.worker_id
        ]
        _check_compatible(request, others)
        _warn_if_kv_cannot_move(request, others)
        old = self._workers.get(request.worker_id)
        if old is not None:
            self._remove(old, "re-registered (restarted)")
        worker = WorkerState(
            worker_id=request.worker_id,
            role=request.role,
            address=request.address,
            model=request.model,
            layout=_copy(request.layout),
            max_context_length=request.max_context_length,
            vocab_size=request.vocab_size,
            last_heartbeat=self._clock(),
            instance=request.instance,
        )
        self._workers[worker.worker_id] = worker
        self._served_once.add(worker.model)
        self._joined.set()
        self._joined = asyncio.Event()
        log.info(
            "registered %s worker %s at %s for model %s (block_size %d)",
            worker.role_name,
            worker.worker_id,
            worker.address,
            worker.model,
            worker.layout.block_size,
        )
        return worker

    def heartbeat(
        self,
        worker_id: str,
        load: worker_pb2.WorkerLoad,
        draining: bool = False,
        instance: str = "",
    ) -> None:
        """Record ``load`` and that the worker is alive; ``draining``: it is shutting down
        gracefully, and no new request goes to it from now on (a worker never stops
        draining: a process that serves again registers again).

        Raises UnknownWorkerError when the id is not registered or has expired
        (the worker must register again), and SupersededWorkerError when ``instance`` is
        not the process that registered the id (:meth:`check_instance`).
        """
        worker = self._live(worker_id)
        if worker is None:
            raise UnknownWorkerError(
                f"worker {worker_id!r} is not registered (never, or removed after missing "
                f"heartbeats for {self.heartbeat_timeout_s:g} s); register again"
            )
        check_instance(worker, instance)
        worker.load = _copy(load)
        worker.last_heartbeat = self._clock()
        if draining and not worker.draining:
            worker.draining = True
            log.info(
                "%s worker %s is draining: no new requests go to it",
                worker.role_name,
                worker.worker_id,
            )

    # ------------------------------------------------------------ router side
    def sweep(self) -> list[WorkerState]:
        """Remove every worker silent for longer than the timeout; returns them."""
        now = self._clock()
        expired = [w for w in self._workers.values() if self._expired(w, now)]
        for worker in expired:
            self._expire(worker, now)
        return expired

    def candidates(self, model: str, role: int, exclude: Iterable[str] = ()) -> list[WorkerState]:
        """Live workers of ``role`` serving ``model`` that take new requests (not draining),
        minus ``exclude`` (ids), by id."""
        excluded = set(exclude)
        return [
            w for w in self._serving(model, role) if not w.draining and w.worker_id not in excluded
        ]

    def draining(self, model: str, role: int) -> list[str]:
        """Ids of the live workers of ``role`` serving ``model`` that are draining."""
        return [w.worker_id for w in self._serving(model, role) if w.draining]

    async def wait_for_candidates(
        self, model: str, role: int, accept: Callable[[WorkerState], bool], timeout_s: float
    ) -> list[WorkerState]:
        """The ``candidates(model, role)`` that ``accept`` takes, waiting up to ``timeout_s``
        for a worker to register when there are none; [] when none came."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        while True:
            found = [w for w in self.candidates(model, role) if accept(w)]
            left = until - loop.time()
            if found or left <= 0:
                return found
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancellation
            # that lands as the event is set, and the request went on for a gone client.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._joined.wait()

    def get(self, worker_id: str) -> WorkerState | None:
        """The live entry for ``worker_id``, or None."""
        return self._live(worker_id)

    def workers(self) -> list[WorkerState]:
        """Every live worker, by id."""
        self.sweep()
        return sorted(self._workers.values(), key=lambda w: w.worker_id)

    def model_info(self, model: str) -> ModelInfo | None:
        """Facts about ``model`` from its live workers; None when none serves it."""
        serving = [w for w in self.workers() if w.model == model]
        if not serving:
            return None
        return ModelInfo(
            model=model,
            max_context_length=min(w.max_context_length for w in serving),
            vocab_size=serving[0].vocab_size,
        )

    def models(self) -> list[ModelInfo]:
        """Every model some live worker serves, by name."""
        names = sorted({w.model for w in self.workers()})
        return [info for name in names if (info := self.model_info(name)) is not None]

    def was_served(self, model: str) -> bool:
        """Whether any worker ever registered for ``model`` (tells UNAVAILABLE from NOT_FOUND)."""
        return model in self._served_once

    def settling_s(self) -> float | None:
        """Seconds since this registry started while workers may still be registering: one
        heartbeat timeout (a worker of a router restarted on its address finds it within a
        heartbeat and a reconnect); None after that. An unknown model is then only not
        known *yet*, and a client told NOT_FOUND by a freshly restarted router would stop
        retrying."""
        age = self._clock() - self._started
        return age if age < self.heartbeat_timeout_s else None

    # --------------------------------------------------------------- internals
    def _serving(self, model: str, role: int) -> list[WorkerState]:
        return [w for w in self.workers() if w.model == model and w.role == role]

    def _live(self, worker_id: str) -> WorkerState | None:
        worker = self._workers.get(worker_id)
        now = self._clock()
        if worker is not None and self._expired(worker, now):
            self._expire(worker, now)
            return None
        return worker

    def _expired(self, worker: WorkerState, now: float) -> bool:
        return now - worker.last_heartbeat > self.heartbeat_timeout_s

    def _expire(self, worker: WorkerState, now: float) -> None:
        silent = now - worker.last_heartbeat
        self._remove(worker, f"no heartbeat for {silent:.1f} s")

    def _remove(self, worker: WorkerState, reason: str) -> None:
        if self._workers.get(worker.worker_id) is worker:
            del self._workers[worker.worker_id]
        worker.gone.set()
        log.warning(
            "removed %s worker %s at %s: %s",
            worker.role_name,
            worker.worker_id,
            worker.address,
            reason,
        )
        for listener in self._listeners:
            listener(worker)


_Message = TypeVar("_Message", worker_pb2.KVLayout, worker_pb2.WorkerLoad)


def _copy(message: _Message) -> _Message:
    copied = type(message)()
    copied.CopyFrom(message)
    return copied


def check_instance(worker: WorkerState, instance: str) -> None:
    """Raise SupersededWorkerError when a message from process ``instance`` names
    ``worker``'s id but another process registered it since: its heartbeats would keep
    the new entry alive (or mark it draining for good) and its KV events would stand for
    blocks the new process does not hold. Either side empty (an older worker): passes."""
    if instance and worker.instance and instance != worker.instance:
        raise SupersededWorkerError(
            f"worker id {worker.worker_id!r} was registered again by another process "
            f"(at {worker.address}), which replaced this one; give each worker process its "
            "own --worker-id"
        )


def _check_registration(request: worker_pb2.RegisterRequest) -> None:
    for name in ("worker_id", "address", "model"):
        if not getattr(request, name):
            raise InvalidRequestError(name, "is required")
    if request.role not in ROLE_NAMES:
        raise InvalidRequestError("role", "must be WORKER_ROLE_PREFILL or WORKER_ROLE_DECODE")
    if not request.HasField("layout") or request.layout.block_size < 1:
        raise InvalidRequestError("layout.block_size", "must be at least 1")
    if not request.layout.model_id:
        raise InvalidRequestError("layout.model_id", "is required (block hashes include it)")
    for name in ("max_context_length", "vocab_size"):
        if getattr(request, name) < 1:
            raise InvalidRequestError(name, "must be at least 1")


def _warn_if_kv_cannot_move(request: worker_pb2.RegisterRequest, others: list[WorkerState]) -> None:
    """Log (once per registration) when KV cannot move between this worker and workers of
    the other role serving its model: a different --kv-layout, KV dtype or release. Not
    refused, unlike a block size: a rolling upgrade must be able to run old and new side by
    side, and a request whose prefill and decode workers differ so is prefilled again on
    the decode worker."""
    for other in (w for w in others if w.role != request.role):
        try:
            kv_layout.check_compatible(request.layout, other.layout)
        except IncompatiblePeerError as exc:
            log.warning(
                "worker %s (model %s) cannot exchange KV with %s: %s. Requests that pair "
                "them prefill again on the decode worker",
                request.worker_id,
                request.model,
                other.worker_id,
                exc,
            )
            return


def _check_compatible(request: worker_pb2.RegisterRequest, others: list[WorkerState]) -> None:
    for name in ("block_size", "model_id"):
        theirs = {getattr(w.layout, name) for w in others}
        mine = getattr(request.layout, name)
        if theirs and theirs != {mine}:
            ids = ", ".join(w.worker_id for w in others)
            raise IncompatibleWorkerError(
                f"worker {request.worker_id!r} registers model {request.model!r} with "
                f"{name} {mine!r}, but the workers already serving it ({ids}) use "
                f"{name} {sorted(theirs)[0]!r}: their block hashes would never match "
                f"(0% prefix hits) and KV could not move between them. Start it with "
                f"the same {name}, or serve it under another model name"
            )

"""The NIXL KV transport: one-sided READs of a peer's registered pool (UCX backend).

Each worker creates one agent and registers its whole pool tensor once; peers learn the
agent's metadata, the pool's address and size at the Handshake. A pull is one transfer
request with one descriptor per (run of consecutive blocks, plane): layout.paired_spans.
Host memory ("DRAM") on CPU machines, device memory ("VRAM") on GPUs, chosen from the
tensor's device.

NIXL calls block, some for milliseconds (a post over shared memory copies inline), so
agent calls run on the agent's own thread (agent_thread.py, which also keeps the agent
progressing in place of NIXL's spinning progress thread): the event loop never blocks for
long, and every wait on that thread has a deadline. The exception is a READ whose post
does not copy (device memory) or copies little: it runs on the caller's thread, which
saves two thread hops (~45-70 µs) per pull (AgentThread.run_inline, inline_max_bytes).

A peer without NIXL (empty metadata at the Handshake) is read over gRPC instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np

from services.engine.kv_cache import KVCache
from services.kv_transfer import layout as kv_layout
from services.kv_transfer.agent_thread import PROGRESS_INTERVAL_S, AgentThread, Transfer
from services.kv_transfer.errors import IncompatiblePeerError, KVTransferError
from services.kv_transfer.grpc_transport import GrpcTransport
from services.kv_transfer.transport import HandshakePayload, KVTransport, PeerInfo
from services.rpc.tls import TlsConfig

log = logging.getLogger(__name__)

MAX_ACCEPTED = 256
"""Callers' agents a prefill worker keeps loaded (most recent handshakes); an older caller
that reads again re-handshakes first if its read fails, as after any peer change."""
T = TypeVar("T")

RELEASE_TIMEOUT_S = 1.0
"""How long an abandoned pull waits for its transfer handle to be released."""

INLINE_WAIT_S = 0.0002
"""How long a pull run on the event loop's thread checks its READ before handing it to the
agent thread: a device copy of a 2,048-token prompt's KV (16 MiB) ends within ~30 µs of its
post on an H200, a 256 MiB one does not."""

INLINE_DRAM_MAX_BYTES = 256 * 1024
"""Largest pull of host memory run on the event loop's thread: over shared memory the post
copies the bytes itself (~10 GB/s here), so a larger one would hold up the loop."""


@functools.cache
def nixl_available() -> bool:
    """Whether NIXL imports and an agent with the UCX backend can be created (cached)."""
    try:
        from nixl._api import nixl_agent

        name = f"tandem-probe-{uuid.uuid4().hex[:8]}"
        agent = nixl_agent(name, agent_config())
        return "UCX" in agent.backends
    except Exception as e:  # ImportError, missing plugins, UCX failing to start
        log.info("NIXL is not available: %s", e)
        return False


def agent_config() -> Any:
    """UCX, without NIXL's progress thread (it spins a core; AgentThread progresses)."""
    from nixl._api import nixl_agent_config

    return nixl_agent_config(enable_prog_thread=False, backends=["UCX"])


def allow_cuda_ipc_reads() -> None:
    """Let UCX READ device memory over CUDA IPC on hosts without NVLink.

    UCX's cuda_ipc transport disables GET by default ("auto") unless it finds NVLink, and
    the decode side pulls with READ (GET): on a single-GPU or PCIe-only host every block
    then went through software emulation over loopback TCP (0.56 GB/s measured on an
    H200, bench/gpu/README.md). An operator's own setting wins (setdefault); UCX reads
    it when the agent's UCX context is created, which happens after this call.
    """
    os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")


def thread_initializer(kv: KVCache) -> Callable[[], None] | None:
    """For a pool in device memory: make its device current on the agent thread.

    UCX's CUDA transports work in the calling thread's current CUDA context, and the agent
    thread has none of its own (torch made the device current on the thread that built
    the pool). A suspect, not yet measured, for the 0.5 ms a pull spent above NIXL's own
    0.11 ms floor on an H200: bench/gpu/README.md says how to check.
    """
    device = kv.tensor.device
    if device.type != "cuda":
        return None
    import torch

    return functools.partial(torch.cuda.set_device, device)


async def await_transfer(
    transfer: Transfer,
    timeout_s: float,
    what: str,
    on_unreleased: Callable[[Future[None]], None] | None = None,
) -> str:
    """The final state of ``transfer`` (``DONE``/``ERR``) within ``timeout_s``.

    Raises KVTransferError when it fails, misses the deadline, or the agent thread stops
    under it; a transfer left behind (deadline, the caller cancelled) is abandoned, and this
    returns or raises once it can no longer write local memory, or after RELEASE_TIMEOUT_S
    having told ``on_unreleased`` (with the future set once it can no longer write).
    """
    try:
        # No shield: a timeout or the caller's cancellation cancels the wrapped future,
        # which cancels transfer.state, which is what abandons the transfer anyway.
        async with asyncio.timeout(max(0.0, timeout_s)):
            return await asyncio.wrap_future(transfer.state)
    except TimeoutError:
        raise KVTransferError(f"{what} did not finish within {timeout_s:.3g} s") from None
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the caller's own cancellation
        # Nobody cancelled us: the agent thread stopped (the transport is closing) and
        # abandoned the transfer. A CancelledError here would cancel the caller's task.
        raise KVTransferError(f"{what}: the NIXL agent thread stopped") from None
    except Exception as e:
        raise KVTransferError(f"{what} failed: {type(e).__name__}: {e}") from None
    finally:
        if transfer.state.cancel():  # abandoned, by us or by the stopping thread
            await _until_released(transfer, what, on_unreleased)


async def _until_released(
    transfer: Transfer, what: str, on_unreleased: Callable[[Future[None]], None] | None
) -> None:
    """Wait (a bounded while) until an abandoned READ can no longer write our blocks: the
    caller frees them next, and another request may get them.

    Not cut short by a cancellation arriving meanwhile (the caller's, then its deadline's:
    ``wait_for(pull, timeout)`` cancels twice): the pull returned while the READ still
    wrote, and the blocks it freed were another request's by then. Such a cancellation is
    raised once the wait is over. Past RELEASE_TIMEOUT_S (an agent thread stuck in a post)
    it returns all the same, and ``on_unreleased`` keeps the blocks out of use instead."""
    released = asyncio.wrap_future(transfer.released)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RELEASE_TIMEOUT_S
    cancelled = False
    while not released.done() and (left := deadline - loop.time()) > 0:
        try:
            await asyncio.wait((released,), timeout=left)  # never cancels ``released``
        except asyncio.CancelledError:
            cancelled = True
    if not released.done():
        kept = "its blocks kept out of use until it is" if on_unreleased else "nothing guards"
        log.error("%s: abandoned and not released within %ss; %s", what, RELEASE_TIMEOUT_S, kept)
        if on_unreleased is not None:
            on_unreleased(transfer.released)
    if cancelled:
        raise asyncio.CancelledError


def _descriptors(spans: np.ndarray, side: int, base: int, device_id: int) -> np.ndarray:
    """NIXL's (address, length, device) rows for one side (0 local, 1 remote) of
    ``layout.paired_spans``, as uint64 (a view, no copy)."""
    rows = spans.take((side, 2, 2), axis=1)  # C-contiguous, as NIXL requires
    rows[:, 0] += base
    rows[:, 2] = device_id
    return rows.view(np.uint64)


def memory_type(kv: KVCache) -> tuple[str, int]:
    """NIXL memory type and device id of the pool: ("DRAM", 0) or ("VRAM", cuda index)."""
    device = kv.tensor.device
    if device.type == "cpu":
        return "DRAM", 0
    if device.type == "cuda":
        return "VRAM", device.index or 0
    raise ValueError(f"NIXL cannot register a KV pool on {device}: use cpu or cuda")


class NixlTransport(KVTransport):
    name = "nixl"

    def __init__(
        self,
        kv: KVCache,
        worker_id: str,
        progress_interval_s: float = PROGRESS_INTERVAL_S,
        tls: TlsConfig | None = None,
        inline_max_bytes: int | None = None,
    ) -> None:
        """Creates the agent and registers ``kv.tensor`` with it, once. ``tls`` secures only
        the gRPC fallback's channels: the handshake is the KVReader's, and UCX moves the
        blocks themselves unencrypted (keep workers on a trusted network).

        ``inline_max_bytes``: largest pull run on the caller's thread rather than the agent
        thread's (AgentThread.run_inline); by default any pull of device memory, whose post
        only queues CUDA IPC copies, and INLINE_DRAM_MAX_BYTES of host memory. 0: none."""
        from nixl._api import nixl_agent

        super().__init__(kv)
        self.memory_type, self.device_id = memory_type(kv)
        if self.memory_type == "VRAM":
            allow_cuda_ipc_reads()
        self.agent_name = f"tandem-{worker_id}-{uuid.uuid4().hex[:8]}"
        self._agent = nixl_agent(self.agent_name, agent_config())
        if "UCX" not in self._agent.backends:
            raise RuntimeError("NIXL's UCX backend is missing: use the grpc transport")
        self._registration = self._agent.register_memory(kv.tensor)
        self._metadata: bytes = self._agent.get_agent_metadata()
        self._initializer = thread_initializer(kv)
        self._thread = AgentThread(
            self._agent, f"nixl-{worker_id}", progress_interval_s, self._initializer
        )
        if inline_max_bytes is None:
            inline_max_bytes = INLINE_DRAM_MAX_BYTES if self.memory_type == "DRAM" else 2**63
        self.inline_max_bytes = inline_max_bytes
        self._peers: dict[str, PeerInfo] = {}  # address -> peer read over NIXL
        self._accepted: dict[str, str] = {}  # caller worker id -> its agent name, oldest first
        self._reading: collections.Counter[str] = collections.Counter()  # READs by agent
        self._forget_after: set[str] = set()  # replaced agents waiting for their READs
        self._forgetting: set[asyncio.Task[None]] = set()
        self._grpc = GrpcTransport(kv, tls=tls)  # for peers without NIXL

    @property
    def remote_agents(self) -> frozenset[str]:
        """Names of the remote agents currently loaded (peers read from, callers accepted)."""
        return frozenset(p.nixl_agent for p in self._peers.values()) | frozenset(
            self._accepted.values()
        )

    async def handshake_payload(self) -> HandshakePayload:
        return HandshakePayload(
            nixl_metadata=self._metadata,
            nixl_agent=self.agent_name,
            pool_address=self.kv.tensor.data_ptr(),
            pool_bytes=self.kv.tensor.numel() * self.kv.tensor.element_size(),
            memory_type=self.memory_type,
            device_id=self.device_id,
        )

    async def accept(self, worker_id: str, nixl_metadata: bytes) -> None:
        if not nixl_metadata:
            return
        name = await self._call(
            self._agent.add_remote_agent, nixl_metadata, what=f"loading {worker_id}'s metadata"
        )
        name = name.decode() if isinstance(name, bytes) else name
        stale = self._accepted.pop(worker_id, None)
        self._accepted[worker_id] = name  # the most recent last
        if stale is not None and stale != name:
            await self._forget_agent(stale)
        # Callers come and go (a restarted decode worker has a new id: a random suffix),
        # and nothing says when one left: keep the most recent MAX_ACCEPTED, so the agent's
        # table of remote agents cannot grow with every restart for the worker's lifetime.
        while len(self._accepted) > MAX_ACCEPTED:
            oldest = next(iter(self._accepted))
            await self._forget_agent(self._accepted.pop(oldest))

    async def connect(self, peer: PeerInfo) -> None:
        kv_layout.check_same_geometry(self.layout, peer.layout)
        if not peer.has_nixl:
            log.warning("%s has no NIXL agent: reading its blocks over gRPC", peer)
            await self._grpc.connect(peer)
            if (old := self._peers.pop(peer.address, None)) is not None:
                await self._forget_agent(old.nixl_agent)
            return
        if peer.pool_bytes != kv_layout.pool_bytes(peer.layout):
            raise IncompatiblePeerError(
                f"{peer} registered {peer.pool_bytes} bytes with NIXL, its layout says "
                f"{kv_layout.pool_bytes(peer.layout)}; run the same Tandem release on both"
            )
        if peer.memory_type not in ("DRAM", "VRAM"):
            raise IncompatiblePeerError(f"{peer} has NIXL memory type {peer.memory_type!r}")
        old = self._peers.get(peer.address)
        if old == peer:
            return
        name = await self._call(
            self._agent.add_remote_agent, peer.nixl_metadata, what=f"loading {peer}'s metadata"
        )
        name = name.decode() if isinstance(name, bytes) else name
        if name != peer.nixl_agent:
            await self._forget_agent(name)
            raise IncompatiblePeerError(
                f"{peer} announced agent {peer.nixl_agent!r} but its metadata names {name!r}"
            )
        self._peers[peer.address] = peer
        if old is not None and old.nixl_agent != name:
            # The peer restarted: a stale agent left loaded is a known crash source.
            await self._forget_agent(old.nixl_agent)

    async def disconnect(self, address: str) -> None:
        old = self._peers.pop(address, None)  # before any await: a new connect stays
        await self._grpc.disconnect(address)
        if old is not None:
            await self._forget_agent(old.nixl_agent)  # once its last READ is released

    async def pull(
        self,
        peer: PeerInfo,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        request_id: str,
        timeout_s: float,
    ) -> int:
        if not peer.has_nixl:
            return await self._grpc.pull(
                peer, remote_block_ids, local_block_ids, request_id, timeout_s
            )
        spans = kv_layout.paired_spans(self.layout, local_block_ids, peer.layout, remote_block_ids)
        known = self._peers.get(peer.address)
        if known is not peer and known != peer:  # `is` first: the equality compares metadata
            raise KVTransferError(f"not connected to {peer}: call connect(peer) first")
        if len(spans) == 0:
            return 0
        what = f"NIXL read of {len(remote_block_ids)} blocks of {request_id!r} from {peer}"
        local = _descriptors(spans, 0, self.kv.tensor.data_ptr(), self.device_id)
        remote = _descriptors(spans, 1, peer.pool_address, peer.device_id)
        read = functools.partial(self._make_read, local, remote, peer.memory_type, peer.nixl_agent)
        nbytes = int(spans[:, 2].sum())
        self._reading[peer.nixl_agent] += 1  # its agent stays loaded until the READ is over
        transfer: Transfer | None = None
        try:
            outcome = self._read_inline(read, what) if nbytes <= self.inline_max_bytes else None
            if isinstance(outcome, str):
                state = outcome
            else:
                try:
                    transfer = outcome or self._thread.transfer(read)
                except RuntimeError as e:  # the agent thread has stopped (closing)
                    raise KVTransferError(f"{what}: {e}") from None
                # timeout_s counts from here: what ran since the call took microseconds
                hold = self.on_unreleased
                keep = None if hold is None else functools.partial(hold, list(local_block_ids))
                state = await await_transfer(transfer, timeout_s, what, keep)
        finally:
            self._done_reading(peer.nixl_agent, transfer)
        if state != "DONE":
            raise KVTransferError(f"{what} failed: NIXL reported {state}")
        return nbytes

    def _done_reading(self, agent: str, transfer: Transfer | None) -> None:
        """A pull from ``agent`` returned; its READ (``transfer``, if one was made) counts
        until released. The last READ from an agent ``connect`` replaced removes it: removed
        under a READ in flight (device memory: the post only queues the copies), NIXL would
        tear down what the copy still uses."""
        if transfer is not None and not transfer.released.done():
            loop = asyncio.get_running_loop()

            def later(_: object) -> None:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(self._done_reading, agent, None)

            transfer.released.add_done_callback(later)
            return
        self._reading[agent] -= 1
        if self._reading[agent] > 0:
            return
        del self._reading[agent]
        if agent in self._forget_after:
            self._forget_after.discard(agent)
            task = asyncio.ensure_future(self._forget_agent(agent))
            self._forgetting.add(task)
            task.add_done_callback(self._forgetting.discard)

    def _read_inline(self, read: Callable[[], Any], what: str) -> str | Transfer | None:
        """The READ run on this thread (AgentThread.run_inline): its state, the Transfer the
        agent thread took over, or None when the agent was busy."""
        try:
            if self._initializer is not None:
                # UCX's CUDA transports post in the calling thread's current device, which
                # other code on this thread (another pool's transport) may have changed.
                self._initializer()
            return self._thread.run_inline(read, INLINE_WAIT_S)
        except Exception as e:
            raise KVTransferError(f"{what} failed: {type(e).__name__}: {e}") from None

    async def close(self) -> None:
        await self._grpc.close()
        agents = self.remote_agents
        self._peers.clear()
        self._accepted.clear()
        for name in agents:
            await self._forget_agent(name)
        await asyncio.gather(*self._forgetting, return_exceptions=True)
        try:
            await self._call(self._agent.deregister_memory, self._registration)
        except KVTransferError as e:
            log.warning("deregistering the KV pool from NIXL: %s", e)
        await asyncio.to_thread(self._thread.stop)

    # -- on the NIXL thread --------------------------------------------------------------

    def _make_read(
        self, local: np.ndarray, remote: np.ndarray, remote_memory_type: str, remote_agent: str
    ) -> Any:
        """The READ's handle, without a notification: a notified READ is complete only when
        the target has progressed to take the message (up to its 1 ms tick, measured +0.9 ms
        on a GPU), and the reader releases the prefill's blocks over gRPC anyway."""
        local_descs = self._agent.get_xfer_descs(local, self.memory_type)
        remote_descs = self._agent.get_xfer_descs(remote, remote_memory_type)
        return self._agent.initialize_xfer("READ", local_descs, remote_descs, remote_agent)

    # -- helpers -------------------------------------------------------------------------

    async def _call(
        self,
        fn: Callable[..., T],
        *args: Any,
        deadline: float | None = None,
        what: str = "a NIXL call",
    ) -> T:
        """Run ``fn(*args)`` on the NIXL thread; KVTransferError on error or at ``deadline``."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            job = self._thread.submit(fn, *args)
        except RuntimeError as e:
            raise KVTransferError(f"{what}: {e}") from None
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(asyncio.wrap_future(job))
        except TimeoutError:
            job.cancel()  # not yet started: never runs
            raise KVTransferError(f"{what} did not finish by its deadline") from None
        except Exception as e:
            raise KVTransferError(f"{what} failed: {type(e).__name__}: {e}") from None

    async def _forget_agent(self, name: str) -> None:
        if name in self.remote_agents:
            return  # still in use under another address or worker id
        if self._reading[name] > 0:
            self._forget_after.add(name)  # removed by the last READ's _done_reading
            return
        try:
            await self._call(self._agent.remove_remote_agent, name, what="remove_remote_agent")
        except KVTransferError as e:
            log.warning("removing stale NIXL agent %s: %s", name, e)

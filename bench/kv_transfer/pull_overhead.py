"""Where a KVReader.pull spends its time above the NIXL READ it makes, layer by layer.

    python bench/kv_transfer/pull_overhead.py [--blocks 128] [--device cuda] [--json FILE]

One peer process (bench_transfer.py's, NIXL, pools on ``--device``) and, in this process,
the same pull timed through each layer Tandem puts around the READ, innermost last:

- ``pull``: ``KVReader.pull`` on the event loop (uvloop, as every service), what a decode
  worker pays;
- ``pull_synced``: the same between two ``torch.cuda.synchronize()`` calls, as
  bench_transfer.py times it, and ``synchronize`` one such call alone (both as ``pull``
  and nothing on CPU);
- ``transport``: ``NixlTransport.pull`` (no peer lookup), which runs a READ of device
  memory (or a short one of host memory) on the calling thread, and ``transport_threaded``:
  the same through the agent thread (``inline_max_bytes=0``), as every READ went before;
- ``thread_loop`` / ``thread_sync``: the READ as one ``AgentThread.transfer`` job, awaited
  from the loop / waited for with ``Future.result`` (descriptors made beforehand);
- ``hop_loop`` / ``hop_sync``: an empty job's round trip to the agent thread;
- ``bare_*``: the READ's NIXL calls run back to back on the agent thread (describe, init,
  post, wait until done, release) and their ``bare_total``;
- ``spans``: ``layout.paired_spans`` alone (one run each side: its shortcut), and
  ``spans_general``: the same ids as numpy arrays, which take its general path.

Medians in microseconds over ``--reps`` rounds, each running every row once (the bare
phases after). The gaps between rows are what each layer costs: ``pull - thread_loop`` is
the Python on the loop, ``thread_loop - bare_total`` the two hops and the thread's own
bookkeeping.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_transfer as bt  # this folder's peer and pools

from services.kv_transfer import layout as kv_layout
from services.kv_transfer.client import KVReader
from services.kv_transfer.nixl_transport import NixlTransport, _descriptors


async def _medians_us(
    rows: dict[str, Callable[[], Awaitable[Any]]], reps: int, warmup: int = 10
) -> dict[str, float]:
    """Each row once per round, rounds rotating which goes first, so every row meets the
    same disturbances (and no row is the one that warms the pools up)."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    order = list(rows)
    for i in range(warmup + reps):
        shift = i % len(order)
        for name in order[shift:] + order[:shift]:
            start = time.perf_counter()
            await rows[name]()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def _bare_phases(transport: NixlTransport, local: Any, remote: Any, peer: Any) -> list[float]:
    """The READ's NIXL calls back to back (run on the agent thread): seconds per phase."""
    agent, marks = transport._agent, [time.perf_counter()]
    local_descs = agent.get_xfer_descs(local, transport.memory_type)
    remote_descs = agent.get_xfer_descs(remote, peer.memory_type)
    marks.append(time.perf_counter())
    handle = agent.initialize_xfer("READ", local_descs, remote_descs, peer.nixl_agent)
    marks.append(time.perf_counter())
    state = agent.transfer(handle)
    marks.append(time.perf_counter())
    while state == "PROC":
        state = agent.check_xfer_state(handle)
    marks.append(time.perf_counter())
    agent.release_xfer_handle(handle)
    marks.append(time.perf_counter())
    if state != "DONE":
        raise RuntimeError(f"NIXL reported {state}")
    return [b - a for a, b in itertools.pairwise(marks)]


async def measure(blocks: int, reps: int) -> dict[str, float]:
    process, address = bt.start_peer("nixl", blocks, seed=0)
    kv = bt.make_kv(bt.pool_sizes(blocks)[1])
    transport = bt.make_transport("nixl", kv, "bench-overhead")
    assert isinstance(transport, NixlTransport)
    threaded = NixlTransport(
        bt.make_kv(bt.pool_sizes(blocks)[1]), "bench-threaded", inline_max_bytes=0
    )
    try:
        reader = KVReader("bench-overhead", kv_layout.describe(kv, bt.MODEL_ID), transport)
        peer = await reader.peer(address, timeout_s=30)
        remote_ids, local_ids = bt.block_sets(blocks)["contiguous"]
        spans = kv_layout.paired_spans(transport.layout, local_ids, peer.layout, remote_ids)
        local = _descriptors(spans, 0, kv.tensor.data_ptr(), transport.device_id)
        remote = _descriptors(spans, 1, peer.pool_address, peer.device_id)
        read = functools.partial(
            transport._make_read, local, remote, peer.memory_type, peer.nixl_agent
        )
        thread = transport._thread
        threaded_peer = await KVReader(
            "bench-threaded", kv_layout.describe(threaded.kv, bt.MODEL_ID), threaded
        ).peer(address, timeout_s=30)

        async def thread_sync() -> None:
            thread.transfer(read).state.result()

        async def hop_sync() -> None:
            thread.submit(int).result()

        async def spans_only() -> None:
            kv_layout.paired_spans(transport.layout, local_ids, peer.layout, remote_ids)

        local_np, remote_np = np.array(local_ids), np.array(remote_ids)

        async def spans_general() -> None:
            kv_layout.paired_spans(transport.layout, local_np, peer.layout, remote_np)

        async def pull_synced() -> None:
            bt.synchronize()
            await reader.pull(address, remote_ids, local_ids, "bench", 30)
            bt.synchronize()

        async def synchronize() -> None:
            bt.synchronize()

        rows = {
            "pull": lambda: reader.pull(address, remote_ids, local_ids, "bench", 30),
            "pull_synced": pull_synced,
            "synchronize": synchronize,
            "transport": lambda: transport.pull(peer, remote_ids, local_ids, "bench", 30),
            "transport_threaded": lambda: threaded.pull(
                threaded_peer, remote_ids, local_ids, "bench", 30
            ),
            "thread_loop": lambda: asyncio.wrap_future(thread.transfer(read).state),
            "thread_sync": thread_sync,
            "hop_loop": lambda: asyncio.wrap_future(thread.submit(int)),
            "hop_sync": hop_sync,
            "spans": spans_only,
            "spans_general": spans_general,
        }
        figures = await _medians_us(rows, reps)
        phases = [
            thread.submit(_bare_phases, transport, local, remote, peer).result()
            for _ in range(reps)
        ]
        for i, name in enumerate(("describe", "init", "post", "wait", "release")):
            figures[f"bare_{name}"] = statistics.median(p[i] for p in phases) * 1e6
        figures["bare_total"] = statistics.median(sum(p) for p in phases) * 1e6
        return figures
    finally:
        await transport.close()
        await threaded.close()
        if process.stdin is not None:
            process.stdin.close()
        process.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--blocks", type=int, default=128, help="blocks per pull (default 128: 2,048 tokens)"
    )
    p.add_argument("--reps", type=int, default=200, help="timed pulls per row (default 200)")
    p.add_argument("--device", default="cpu", help="cpu (NIXL DRAM) or cuda[:N] (VRAM)")
    p.add_argument(
        "--kv-layout",
        choices=bt.KV_LAYOUTS,
        default="slot-major",
        help="both pools' dimension order (default slot-major, as workers)",
    )
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()
    bt.DEVICE, bt.KV_LAYOUT = args.device, args.kv_layout
    figures = uvloop.run(measure(args.blocks, args.reps))
    print(f"{args.device}, {args.kv_layout}: {args.blocks} blocks per pull; median us")
    for name, us in figures.items():
        print(f"  {name:<19}{us:>9.1f}")
    if args.json:
        record = {
            "device": args.device,
            "kv_layout": args.kv_layout,
            "blocks": args.blocks,
            "reps": args.reps,
            **figures,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

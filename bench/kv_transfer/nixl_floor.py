"""Where a NIXL READ's time goes, without Tandem around it: the floor under KVReader.pull.

    python bench/kv_transfer/nixl_floor.py --device cuda --json FILE

Two processes, the same 16 MiB as ``bench_transfer.py --kv-layout layer-major`` (2,048
tokens of tandem-tiny KV: 16 planes x 128 consecutive blocks of 8 KiB, 16 descriptors; its
``single`` row is the slot-major pool's one descriptor). A peer process registers its
pool and progresses its agent every millisecond; this process reads from it in a tight
loop on one thread (no event loop, no thread hops), timing each phase:

- describe: ``get_xfer_descs`` for both sides (what NixlTransport does per pull);
- init: ``initialize_xfer``; post: ``transfer``; wait: ``check_xfer_state`` until DONE;
  release: ``release_xfer_handle``;

and three variants: ``repost`` (one handle made once and posted again each time: the
transfer alone), ``single`` (the same number of bytes as one descriptor, every phase: how
much of the READ is per descriptor) and ``prepped`` (descriptor lists prepared once, one
descriptor per block and plane, ``make_prepped_xfer`` with block indices per pull, as vLLM's
NIXL connector does). Medians in microseconds.

--notify adds a notification to each READ (a notified READ completes only once the peer has
progressed); --reader-thread reads from a thread other than the one that made the pool
(as Tandem's agent thread does), with or without making the CUDA device current on it.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch

PLANES, POOL_BLOCKS, BLOCKS, BLOCK_PLANE_BYTES = 16, 256, 128, 8192
FIRST = 64  # the prompt's first block in both pools


def make_agent(device: str) -> Any:
    from nixl._api import nixl_agent, nixl_agent_config

    if device.startswith("cuda"):
        os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")  # as NixlTransport
    config = nixl_agent_config(enable_prog_thread=False, backends=["UCX"])
    return nixl_agent(f"floor-{uuid.uuid4().hex[:8]}", config)


def make_pool(device: str) -> torch.Tensor:
    return torch.zeros((PLANES, POOL_BLOCKS, BLOCK_PLANE_BYTES), dtype=torch.uint8, device=device)


def serve(device: str, interval_s: float) -> None:
    agent, pool = make_agent(device), make_pool(device)
    pool.copy_(torch.randint(0, 256, pool.shape, dtype=torch.uint8).to(device))
    agent.register_memory(pool)
    print(json.dumps({"meta": agent.get_agent_metadata().hex(), "addr": pool.data_ptr()}))
    sys.stdout.flush()
    # Until the reader closes our stdin (or dies): EOF makes it readable.
    while not select.select([sys.stdin], [], [], interval_s)[0]:
        agent.get_new_notifs()


def descs(base: int, device_id: int) -> list[tuple[int, int, int]]:
    run = BLOCKS * BLOCK_PLANE_BYTES
    stride = POOL_BLOCKS * BLOCK_PLANE_BYTES
    return [(base + p * stride + FIRST * BLOCK_PLANE_BYTES, run, device_id) for p in range(PLANES)]


def block_descs(base: int, device_id: int) -> list[tuple[int, int, int]]:
    stride = POOL_BLOCKS * BLOCK_PLANE_BYTES
    return [
        (base + p * stride + b * BLOCK_PLANE_BYTES, BLOCK_PLANE_BYTES, device_id)
        for p in range(PLANES)
        for b in range(POOL_BLOCKS)
    ]


def wait(agent: Any, handle: Any) -> None:
    while (state := agent.check_xfer_state(handle)) == "PROC":
        pass
    if state != "DONE":
        raise RuntimeError(f"NIXL reported {state}")


def measure(
    device: str, reps: int, peer_interval_s: float, notif: bytes, reader_thread: str
) -> dict[str, dict]:
    peer = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            f"--device={device}",
            f"--peer-interval-s={peer_interval_s}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        hello = next(json.loads(line) for line in peer.stdout if line.startswith("{"))
        args = (device, reps, bytes.fromhex(hello["meta"]), hello["addr"], notif)
        if reader_thread == "main":
            return read_loop(*args)
        result: list[dict] = []

        def body() -> None:
            if reader_thread == "device-current":
                torch.cuda.set_device(torch.device(device).index or 0)
            result.append(read_loop(*args))

        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
        return result[0]
    finally:
        peer.stdin.close()
        peer.wait(timeout=30)


def read_loop(
    device: str, reps: int, meta: bytes, remote_addr: int, notif: bytes
) -> dict[str, dict]:
    agent, pool = make_agent(device), make_pool(device)
    agent.register_memory(pool)
    name = agent.add_remote_agent(meta)
    name = name.decode() if isinstance(name, bytes) else name
    kind = "VRAM" if device.startswith("cuda") else "DRAM"
    dev = torch.device(device).index or 0
    phases: dict[str, list[float]] = {}

    def note(phase: str, start: float) -> float:
        now = time.perf_counter()
        phases.setdefault(phase, []).append((now - start) * 1e6)
        return now

    for rep in range(reps + 3):
        t = start = time.perf_counter()
        local = agent.get_xfer_descs(descs(pool.data_ptr(), dev), kind)
        remote = agent.get_xfer_descs(descs(remote_addr, dev), kind)
        t = note("describe", t)
        handle = agent.initialize_xfer("READ", local, remote, name, notif)
        t = note("init", t)
        agent.transfer(handle)
        t = note("post", t)
        wait(agent, handle)
        t = note("wait", t)
        agent.release_xfer_handle(handle)
        note("release", t)
        note("total", start)
        if rep < 3:  # warm-up
            for times in phases.values():
                times.pop()

    handle = agent.initialize_xfer("READ", local, remote, name, notif)
    for rep in range(reps + 3):
        start = time.perf_counter()
        agent.transfer(handle)
        wait(agent, handle)
        if rep >= 3:
            note("repost", start)
    agent.release_xfer_handle(handle)

    # The same bytes as one descriptor (the pool's first 16 MiB): what a layout keeping a
    # prompt's blocks contiguous across planes would pay, i.e. how much of post is per
    # descriptor.
    one = [(0, PLANES * BLOCKS * BLOCK_PLANE_BYTES, dev)]
    for rep in range(reps + 3):
        start = time.perf_counter()
        local_one = agent.get_xfer_descs([(pool.data_ptr() + o, n, d) for o, n, d in one], kind)
        remote_one = agent.get_xfer_descs([(remote_addr + o, n, d) for o, n, d in one], kind)
        handle = agent.initialize_xfer("READ", local_one, remote_one, name, notif)
        agent.transfer(handle)
        wait(agent, handle)
        agent.release_xfer_handle(handle)
        if rep >= 3:
            note("single", start)

    local_side = agent.prep_xfer_dlist("NIXL_INIT_AGENT", block_descs(pool.data_ptr(), dev), kind)
    remote_side = agent.prep_xfer_dlist(name, block_descs(remote_addr, dev), kind)
    indices = [p * POOL_BLOCKS + b for p in range(PLANES) for b in range(FIRST, FIRST + BLOCKS)]
    for rep in range(reps + 3):
        start = time.perf_counter()
        handle = agent.make_prepped_xfer("READ", local_side, indices, remote_side, indices, notif)
        agent.transfer(handle)
        wait(agent, handle)
        agent.release_xfer_handle(handle)
        if rep >= 3:
            note("prepped", start)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {
        phase: {"median_us": statistics.median(times), "min_us": min(times)}
        for phase, times in phases.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (NIXL DRAM) or cuda[:N] (VRAM)")
    p.add_argument("--reps", type=int, default=50, help="timed reads per variant (default 50)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument(
        "--peer-interval-s",
        type=float,
        default=0.001,
        help="how often the peer progresses its agent (default 0.001, as a Tandem worker)",
    )
    p.add_argument(
        "--notify",
        action="store_true",
        help="READ with a notification to the peer (Tandem's READs carry none: with one, a "
        "READ completes only once the peer progresses)",
    )
    p.add_argument(
        "--reader-thread",
        choices=["main", "plain", "device-current"],
        default="main",
        help="read from the main thread (default), from a new thread, or from a new thread "
        "that first makes the CUDA device current (as Tandem's agent thread does)",
    )
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.device, args.peer_interval_s)
        return
    notif = b"request-id" if args.notify else b""
    figures = measure(args.device, args.reps, args.peer_interval_s, notif, args.reader_thread)
    nbytes = PLANES * BLOCKS * BLOCK_PLANE_BYTES
    print(
        f"{args.device}: {nbytes >> 20} MiB in {PLANES} descriptors, peer progress every "
        f"{args.peer_interval_s * 1e6:.0f} us, notification {bool(notif)}, reader thread "
        f"{args.reader_thread}; median (min) us"
    )
    for phase, f in figures.items():
        print(f"  {phase:<9}{f['median_us']:>10.1f} ({f['min_us']:.1f})")
    if args.json:
        report = {
            "device": args.device,
            "bytes": nbytes,
            "reps": args.reps,
            "peer_interval_s": args.peer_interval_s,
            "notification": bool(notif),
            "reader_thread": args.reader_thread,
            "phases": figures,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

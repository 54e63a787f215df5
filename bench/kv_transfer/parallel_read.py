"""Does one host-memory READ get faster split over several NIXL agents on several threads?

    python bench/kv_transfer/parallel_read.py [--lanes 1 2 4] [--reps 40] [--json FILE]

Between two processes on one host UCX copies host memory with the kernel's cross-memory
attach, inside the post, on the posting thread: one core's worth. Here the same 16 MiB as
nixl_floor.py (16 plane spans, as a layer-major pool) is read by ``N`` agents in this
process, each with its own UCX worker and its own thread, each posting 1/N of the
descriptors at the same moment (a
barrier), against one libc memcpy of 16 MiB, rounds interleaved. One agent per thread
rather than one agent with N workers: NIXL picks an agent's worker by hashing the calling
thread's id, so two threads may share one worker, which is not safe (it hung here).

Raw NIXL, no event loop, pools on 4 KiB pages (as nixl_floor.py): the ceiling for a
Tandem reader with N lanes. Every group reads into the same local pool: with one pool per
group (two pools registered by agents of one process) the process crashed in UCX here.
Medians in ms; results and what they meant in bench/kv_transfer/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nixl_floor as floor

NBYTES = floor.PLANES * floor.BLOCKS * floor.BLOCK_PLANE_BYTES


class Lane(threading.Thread):
    """An agent over the local pool that reads its share of the descriptors each round."""

    def __init__(self, pool: torch.Tensor, meta: bytes, remote_addr: int, share: slice) -> None:
        super().__init__(daemon=True)
        self.agent = floor.make_agent("cpu")
        self.agent.register_memory(pool)
        name = self.agent.add_remote_agent(meta)
        self.remote = name.decode() if isinstance(name, bytes) else name
        self.local_descs = floor.descs(pool.data_ptr(), 0)[share]
        self.remote_descs = floor.descs(remote_addr, 0)[share]
        self.go, self.done = threading.Event(), threading.Event()
        self.rounds = 0

    def read(self) -> None:
        local = self.agent.get_xfer_descs(self.local_descs, "DRAM")
        remote = self.agent.get_xfer_descs(self.remote_descs, "DRAM")
        handle = self.agent.initialize_xfer("READ", local, remote, self.remote)
        self.agent.transfer(handle)
        floor.wait(self.agent, handle)
        self.agent.release_xfer_handle(handle)

    def run(self) -> None:
        for _ in range(self.rounds):
            while not self.go.wait(0.001):
                self.agent.get_new_notifs()  # keep the agent progressing, as a worker does
            self.go.clear()
            self.read()
            self.done.set()


def measure(lane_counts: list[int], reps: int) -> dict[str, float]:
    peer = subprocess.Popen(
        [sys.executable, floor.__file__, "--serve", "--device=cpu"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        hello = next(json.loads(line) for line in peer.stdout if line.startswith("{"))
        return _rounds(lane_counts, reps, bytes.fromhex(hello["meta"]), hello["addr"])
    finally:
        peer.stdin.close()
        peer.wait(timeout=30)


def _rounds(lane_counts: list[int], reps: int, meta: bytes, addr: int) -> dict[str, float]:
    groups: dict[int, list[Lane]] = {}
    pool = floor.make_pool("cpu")  # one local pool: the groups take turns
    for n in lane_counts:
        per = floor.PLANES // n
        groups[n] = [Lane(pool, meta, addr, slice(i * per, (i + 1) * per)) for i in range(n)]
    # Threads start once every agent exists: making a UCX context while another agent
    # progresses on another thread crashed here.
    for lane in (lane for lanes in groups.values() for lane in lanes):
        lane.rounds = reps + 3
        lane.start()
    src, dst = torch.ones(NBYTES, dtype=torch.uint8), torch.zeros(NBYTES, dtype=torch.uint8)
    times: dict[str, list[float]] = {"memcpy": [], **{f"{n}_lanes": [] for n in lane_counts}}
    for rep in range(reps + 3):
        start = time.perf_counter()
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), NBYTES)
        _note(times["memcpy"], rep, start)
        for n, lanes in groups.items():
            start = time.perf_counter()
            for lane in lanes:
                lane.go.set()
            for lane in lanes:
                lane.done.wait()
                lane.done.clear()
            _note(times[f"{n}_lanes"], rep, start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _note(times: list[float], rep: int, start: float) -> None:
    if rep >= 3:  # warm-up
        times.append(time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--lanes",
        type=int,
        nargs="+",
        default=[1, 2],
        help="agent/thread counts to compare, each a divisor of 16 (default: 1 2)",
    )
    p.add_argument("--reps", type=int, default=40, help="timed rounds (default 40)")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()
    if any(n < 1 or floor.PLANES % n for n in args.lanes):
        p.error(f"--lanes: each count must divide {floor.PLANES}")
    figures = measure(args.lanes, args.reps)
    report: dict[str, Any] = {"bytes": NBYTES, "reps": args.reps, "median_ms": figures}
    print(f"{NBYTES >> 20} MiB, median ms and x memcpy (1 thread)")
    for name, ms in figures.items():
        print(f"  {name:<10}{ms:>8.2f}{figures['memcpy'] / ms:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

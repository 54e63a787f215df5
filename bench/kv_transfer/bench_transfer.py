"""Bytes/s moving one prompt's KV between two processes: NIXL and gRPC beside memcpy.

    python bench/kv_transfer/bench_transfer.py --json bench/kv_transfer/results.json

The prompt is 2,048 tokens of tandem-tiny KV (8 layers x K/V x 4 heads x 64 dims x bf16
= 8 KiB per token, 16 MiB in all, 128 blocks of 16 tokens). A peer process (this script
with --serve) holds it pinned in a 256-block pool; this process pulls it into a 512-block
pool through services.kv_transfer (KVReader: handshake once, then pulls), and, in the
same run, copies the same bytes within one process as the baselines:

- memcpy: the C library's ``memcpy`` of the same 16 MiB between two buffers of the
  same kind of memory as the pools (huge pages on CPU; on a GPU, the device copy);
- torch_copy: ``dst.copy_(src)`` of those buffers, which torch splits over its threads
  (2 here): a bound a one-sided kernel copy cannot reach, reported beside;
- gather: the same blocks copied block by block between two pools in one process
  (pools viewed as [planes, blocks, span]; ``dst[:, l].copy_(src[:, r])`` per block);
- nixl: NIXL READ of 128 consecutive blocks (one descriptor; 16 with --kv-layout
  layer-major);
- nixl_scattered: NIXL READ of 128 blocks, every other block on both sides (128
  descriptors, 2,048 layer-major: the worst case for a fragmented pool);
- grpc: KVTransfer.ReadBlocks byte stream (4 MiB chunks).

Each figure is the median of --reps timed repetitions after --warmup untimed ones, in
two orders (interleaved, the headline, and grouped: see ``run``); every method's bytes
are checked against its source before anything is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib.metadata
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from services.bench.environment import describe_environment  # noqa: E402
from services.engine.host_memory import host_zeros  # noqa: E402
from services.engine.kv_cache import KV_LAYOUTS, KVCache  # noqa: E402
from services.kv_transfer import layout as kv_layout  # noqa: E402
from services.kv_transfer.client import KVReader  # noqa: E402
from services.kv_transfer.factory import make_transport  # noqa: E402
from services.kv_transfer.nixl_transport import NixlTransport  # noqa: E402
from services.kv_transfer.service import PinCheck, servicer  # noqa: E402
from services.kv_transfer.transport import KVTransport  # noqa: E402
from services.rpc.event_loop import run as run_loop  # noqa: E402
from services.rpc.server import start_server  # noqa: E402

LIBC = ctypes.CDLL(None)
LIBC.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
LIBC.memcpy.restype = ctypes.c_void_p
MODEL_ID = "tandem-tiny"
GEOMETRY = dict(num_layers=8, block_size=16, num_kv_heads=4, head_dim=64, dtype=torch.bfloat16)
READY = "BENCH PEER READY "
DEVICE = "cpu"
"""Where every pool lives (--device): host memory, or GPU memory for NIXL's VRAM path."""
KV_LAYOUT = "slot-major"
"""Every pool's dimension order (--kv-layout): layer-major moves a run of blocks as one
NIXL descriptor per layer and K/V (16 for tandem-tiny), slot-major as one."""


def pool_sizes(num_blocks: int) -> tuple[int, int]:
    """(remote, local) pool blocks: room for both access patterns of ``block_sets``."""
    return max(256, 2 * num_blocks), max(512, 3 * num_blocks + 128)


def make_kv(num_blocks: int) -> KVCache:
    return KVCache(num_blocks=num_blocks, device=DEVICE, layout=KV_LAYOUT, **GEOMETRY)


def synchronize() -> None:
    """Wait for queued GPU copies, so a timed copy is a finished copy."""
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def block_sets(num_blocks: int) -> dict[str, tuple[list[int], list[int]]]:
    """(remote ids, local ids) per access pattern, ``num_blocks`` each; the patterns'
    local ids do not overlap (one pool receives both)."""
    _, local_blocks = pool_sizes(num_blocks)
    return {
        "contiguous": (list(range(64, 64 + num_blocks)), list(range(100, 100 + num_blocks))),
        "scattered": (
            list(range(0, 2 * num_blocks, 2)),
            list(range(local_blocks - 2 * num_blocks + 1, local_blocks, 2)),
        ),
    }


# -- the peer process -------------------------------------------------------------------


async def serve(args: argparse.Namespace) -> None:
    kv = make_kv(pool_sizes(args.num_blocks)[0])
    fill(kv, args.seed)
    transport = make_transport(args.transport, kv, f"bench-peer-{args.transport}")
    pins = {name: remote for name, (remote, _) in block_sets(args.num_blocks).items()}

    def pinned(request_id: str, block_ids: list[int]) -> PinCheck:
        return PinCheck.of(pins.get(request_id), block_ids)

    layout = kv_layout.describe(kv, MODEL_ID)
    server = await start_server([servicer(layout, transport, pinned, "bench-peer")])
    print(f"{READY}{server.port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until closed
    await server.stop(0)
    await transport.close()


def start_peer(transport: str, num_blocks: int, seed: int) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            f"--transport={transport}",
            f"--num-blocks={num_blocks}",
            f"--seed={seed}",
            f"--device={DEVICE}",
            f"--kv-layout={KV_LAYOUT}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith(READY):
            return process, f"127.0.0.1:{int(line.removeprefix(READY))}"
    raise RuntimeError(f"the {transport} peer exited with {process.wait()}")


# -- measuring --------------------------------------------------------------------------


class Method:
    """One way of moving the prompt's bytes: ``run`` moves them once, ``check`` verifies."""

    def __init__(
        self,
        name: str,
        run: Callable[[], Awaitable[None]],
        check: Callable[[], bool],
        nbytes: int,
        descriptors: int | None = None,
    ) -> None:
        self.name, self.run, self.check = name, run, check
        self.nbytes, self.descriptors = nbytes, descriptors
        self.times: dict[str, list[float]] = {"interleaved": [], "grouped": []}

    async def timed(self) -> float:
        synchronize()
        start = time.perf_counter()
        await self.run()
        synchronize()
        return time.perf_counter() - start

    def summary(self, order: str) -> dict[str, Any]:
        times = self.times[order]
        median = statistics.median(times)
        out: dict[str, Any] = {
            "bytes": self.nbytes,
            "reps": len(times),
            "median_s": median,
            "min_s": min(times),
            "max_s": max(times),
            "median_gb_per_s": self.nbytes / median / 1e9,
        }
        if self.descriptors is not None:
            out["nixl_descriptors"] = self.descriptors
        return out


def local_methods(num_blocks: int) -> list[Method]:
    remote_blocks, local_blocks = pool_sizes(num_blocks)
    src_kv, dst_kv = make_kv(remote_blocks), make_kv(local_blocks)
    fill(src_kv, seed=1)
    nbytes = num_blocks * src_kv.bytes_per_block
    if DEVICE == "cpu":  # the same kind of host memory as the pools (huge pages)
        src, dst = host_zeros((nbytes,), torch.uint8), host_zeros((nbytes,), torch.uint8)
        src.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    else:
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).to(DEVICE)
        dst = torch.empty_like(src)

    async def memcpy() -> None:  # the C library's memcpy: one call, one thread
        LIBC.memcpy(dst.data_ptr(), src.data_ptr(), nbytes)

    async def torch_copy() -> None:  # torch splits the copy over its threads (2 here)
        dst.copy_(src)

    def copied() -> bool:
        return torch.equal(dst, src)

    methods = [Method("torch_copy", torch_copy, copied, nbytes)]
    if DEVICE == "cpu":  # on a GPU the device copy is the memcpy
        methods.insert(0, Method("memcpy", memcpy, copied, nbytes))
    else:
        methods[0].name = "memcpy"

    remote, local = block_sets(num_blocks)["contiguous"]
    src_planes, dst_planes = src_kv.planes(), dst_kv.planes()

    async def gather() -> None:  # block by block, every plane of a block in one copy
        for r, loc in zip(remote, local, strict=True):
            dst_planes[:, loc].copy_(src_planes[:, r])

    def gathered() -> bool:
        return torch.equal(
            dst_planes[:, local].view(torch.uint8), src_planes[:, remote].view(torch.uint8)
        )

    return [*methods, Method("gather", gather, gathered, nbytes)]


async def remote_methods(
    kind: str,
    patterns: list[str],
    address: str,
    args: argparse.Namespace,
    source: KVCache,
    threaded: bool = False,
) -> tuple[list[Method], KVTransport]:
    """``source``: a copy of what every peer holds (they fill with the same seed), made once
    for all readers. ``threaded``: a NIXL reader whose every READ goes through its agent
    thread (two thread hops), as all did before short ones ran on the caller's thread."""
    _, local_blocks = pool_sizes(args.num_blocks)
    kv = make_kv(local_blocks)
    if threaded:
        transport: KVTransport = NixlTransport(kv, "bench-reader-threaded", inline_max_bytes=0)
    else:
        transport = make_transport(kind, kv, f"bench-reader-{kind}")
    reader = KVReader("bench-reader", kv_layout.describe(kv, MODEL_ID), transport)
    peer = await reader.peer(address, timeout_s=30)
    methods = []
    for pattern in patterns:
        remote, local = block_sets(args.num_blocks)[pattern]
        nbytes = len(remote) * kv.bytes_per_block

        async def pull(remote=remote, local=local, pattern=pattern, nbytes=nbytes) -> None:
            moved = await reader.pull(address, remote, local, pattern, timeout_s=30)
            if moved != nbytes:
                raise RuntimeError(f"{kind} moved {moved} bytes, expected {nbytes}")

        def pulled(remote=remote, local=local) -> bool:
            got = kv.planes()[:, local].view(torch.uint8)
            return torch.equal(got, source.planes()[:, remote].view(torch.uint8))

        descriptors = len(kv_layout.paired_spans(reader.layout, local, peer.layout, remote))
        name = kind if pattern == "contiguous" else f"{kind}_{pattern}"
        name += "_threaded" if threaded else ""
        methods.append(Method(name, pull, pulled, nbytes, descriptors if kind == "nixl" else None))
    return methods, transport


def fill(kv: KVCache, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    data = kv.tensor.view(-1).view(torch.uint8)
    data.copy_(torch.randint(0, 256, (data.numel(),), dtype=torch.uint8, generator=g).to(DEVICE))


async def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Figures for two orders of the same repetitions.

    interleaved (the headline): every method once per round, rounds rotating which goes
    first, so every method meets the same disturbances on this noisy machine, and caches
    hold what the other methods left, as in a worker doing other work.
    grouped: each method's repetitions back to back, caches warm: the best case.
    """
    from services.kv_transfer.nixl_transport import nixl_available

    kinds = {"nixl": ["contiguous", "scattered"], "grpc": ["contiguous"]}
    if not nixl_available():
        del kinds["nixl"]
    processes, transports = [], []
    methods = local_methods(args.num_blocks)
    source = make_kv(pool_sizes(args.num_blocks)[0])
    fill(source, args.seed)  # what every peer holds
    try:
        for kind, patterns in kinds.items():
            process, address = start_peer(kind, args.num_blocks, args.seed)
            processes.append(process)
            more, transport = await remote_methods(kind, patterns, address, args, source)
            methods += more
            transports.append(transport)
            if kind == "nixl":  # the same peer read the way every READ went until 2026-11-27
                more, transport = await remote_methods(
                    kind, ["contiguous"], address, args, source, threaded=True
                )
                methods += more
                transports.append(transport)
        for round_ in range(args.warmup + args.reps):
            shift = round_ % len(methods)
            for method in methods[shift:] + methods[:shift]:
                elapsed = await method.timed()
                if round_ >= args.warmup:
                    method.times["interleaved"].append(elapsed)
        for method in methods:
            for rep in range(args.warmup + args.reps):
                elapsed = await method.timed()
                if rep >= args.warmup:
                    method.times["grouped"].append(elapsed)
        for method in methods:
            if not method.check():
                raise RuntimeError(f"{method.name}: the copied bytes differ from the source")
    finally:
        for transport in transports:
            await transport.close()
        for process in processes:
            if process.stdin is not None:
                process.stdin.close()
            process.wait(timeout=30)
    results = {}
    for order in ("interleaved", "grouped"):
        results[order] = {m.name: m.summary(order) for m in methods}
        memcpy = results[order]["memcpy"]["median_gb_per_s"]
        for figures in results[order].values():
            figures["ratio_to_memcpy"] = figures["median_gb_per_s"] / memcpy
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=2048,
        help="tokens of tandem-tiny KV moved per transfer, in blocks of 16 (default 2048: 16 MiB)",
    )
    p.add_argument(
        "--reps",
        type=int,
        default=30,
        help="timed repetitions per method and order; figures are their median (default 30)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed repetitions before the timed ones (default 3)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the random KV bytes the peer holds (default 0)"
    )
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument(
        "--device",
        default="cpu",
        help="where the KV pools live: cpu (NIXL DRAM) or cuda[:N] (NIXL VRAM); default cpu",
    )
    p.add_argument(
        "--kv-layout",
        choices=KV_LAYOUTS,
        default="slot-major",
        help="both pools' dimension order (default slot-major: one descriptor per run of "
        "blocks; layer-major: 16)",
    )
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--transport", default="nixl", help=argparse.SUPPRESS)
    p.add_argument("--num-blocks", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    global DEVICE, KV_LAYOUT
    DEVICE, KV_LAYOUT = args.device, args.kv_layout
    if args.serve:
        asyncio.run(serve(args))
        return
    args.num_blocks = args.prompt_tokens // GEOMETRY["block_size"]
    results = run_loop(run(args))  # uvloop, as every service's pull
    environment = describe_environment(["python", *sys.argv])
    environment |= {
        name.replace("-", "_") + "_version": importlib.metadata.version(name)
        for name in ("nixl", "grpcio")
    }
    report = {
        "benchmark": "kv_transfer",
        "environment": environment,
        "config": {
            "prompt_tokens": args.prompt_tokens,
            "blocks": args.num_blocks,
            "bytes_per_token": KVCache.bytes_per_token(8, 4, 64, torch.bfloat16),
            "geometry": {k: str(v) for k, v in GEOMETRY.items()},
            "device": DEVICE,
            "kv_layout": KV_LAYOUT,
            "remote_pool_blocks": pool_sizes(args.num_blocks)[0],
            "local_pool_blocks": pool_sizes(args.num_blocks)[1],
            "reps": args.reps,
            "warmup": args.warmup,
        },
        "results": results,
        "targets": {
            "nixl_ratio_to_memcpy": {
                "target": 0.7,
                "measured": {
                    order: figures.get("nixl", {}).get("ratio_to_memcpy")
                    for order, figures in results.items()
                },
                "met": all(
                    figures.get("nixl", {}).get("ratio_to_memcpy", 0) >= 0.7
                    for figures in results.values()
                ),
            }
        },
    }
    for order, figures in results.items():
        print(f"{order:<16}{'median ms':>10}{'GB/s':>8}{'x memcpy':>10}")
        for name, r in figures.items():
            print(
                f"  {name:<14}{r['median_s'] * 1e3:>10.2f}{r['median_gb_per_s']:>8.2f}"
                f"{r['ratio_to_memcpy']:>10.2f}"
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""What a slot-major KV pool costs attention: the two pool orders' attention alone.

    python bench/kv_transfer/slot_major_attention.py [--device cpu|cuda] [--reps 5]

(Written before the engine took the slot-major order; since 2026-11-27 it is the default,
``--kv-layout`` picks either, and bench/gpu/README.md has the whole engine's figures.)
A NIXL READ costs ~7.5 µs per descriptor on an H100 (bench/gpu/README.md), and a
layer-major pool, ``[layers, K/V, slots, kv_heads, head_dim]``, spreads a run of
blocks over ``2 * layers`` planes: 16 descriptors for tandem-tiny. A slot-major pool,
``[slots, layers, K/V, kv_heads, head_dim]``, makes a run of blocks one contiguous
range (one descriptor) and still gives attention each layer's keys as a uniformly strided
view (the stride becomes a whole slot of every layer), so no copy; but attention then
reads memory with a larger stride. This times the engine's two attention shapes on both
layouts, interleaved, with tandem-tiny's geometry: decode (16 sequences × 1,024 cached
keys, one SDPA call each) and a 512-token prefill chunk (index_copy_ of its K/V, causal
SDPA). Medians in ms per pass over all layers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

LAYERS, KV_HEADS, HEADS, HEAD_DIM, SLOTS = 8, 4, 8, 64, 4096


def pools(device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    shapes = {
        "layer-major": (LAYERS, 2, SLOTS, KV_HEADS, HEAD_DIM),
        "slot-major": (SLOTS, LAYERS, 2, KV_HEADS, HEAD_DIM),
    }
    return {name: torch.randn(shape, dtype=dtype, device=device) for name, shape in shapes.items()}


def layer_views(pool: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one layer as ``[slots, kv_heads, head_dim]`` views."""
    if pool.shape[0] == LAYERS:
        return pool[layer, 0], pool[layer, 1]
    return pool[:, layer, 0], pool[:, layer, 1]


def decode_pass(pool: torch.Tensor, sequences: int = 16, cached: int = 1024) -> None:
    for layer in range(LAYERS):
        k, v = layer_views(pool, layer)
        for s in range(sequences):
            start = (s * 200) % (SLOTS - cached)
            keys = k[start : start + cached].transpose(0, 1).unsqueeze(0)
            values = v[start : start + cached].transpose(0, 1).unsqueeze(0)
            q = torch.randn(1, HEADS, 1, HEAD_DIM, dtype=pool.dtype, device=pool.device)
            F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)


def prefill_pass(pool: torch.Tensor, tokens: int = 512, first: int = 1000) -> None:
    slots = torch.arange(first, first + tokens, device=pool.device)
    new = torch.randn(tokens, KV_HEADS, HEAD_DIM, dtype=pool.dtype, device=pool.device)
    for layer in range(LAYERS):
        k, v = layer_views(pool, layer)
        k.index_copy_(0, slots, new)
        v.index_copy_(0, slots, new)
        keys = k[first : first + tokens].transpose(0, 1).unsqueeze(0)
        values = v[first : first + tokens].transpose(0, 1).unsqueeze(0)
        q = torch.randn(1, HEADS, tokens, HEAD_DIM, dtype=pool.dtype, device=pool.device)
        F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)


def timed_ms(fn: Callable[[], None], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="pool and query dtype (default float32, the CPU engine's)",
    )
    p.add_argument("--reps", type=int, default=5, help="timed rounds per row (default 5)")
    args = p.parse_args()
    layouts = pools(args.device, getattr(torch, args.dtype))
    times: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.reps + 1):  # round 0 warms up
        for shape, fn in (("decode", decode_pass), ("prefill", prefill_pass)):
            order = list(layouts) if rep % 2 else list(reversed(layouts))
            for name in order:
                elapsed = timed_ms(lambda fn=fn, name=name: fn(layouts[name]), args.device)
                if rep:
                    times.setdefault((shape, name), []).append(elapsed)
    print(f"{args.device}, {args.dtype}: median ms per pass over {LAYERS} layers")
    for shape in ("decode", "prefill"):
        base = statistics.median(times[(shape, "layer-major")])
        other = statistics.median(times[(shape, "slot-major")])
        ratio = other / base
        print(f"  {shape:<8} layer-major {base:8.2f}  slot-major {other:8.2f}  ({ratio:.2f}x)")


if __name__ == "__main__":
    main()

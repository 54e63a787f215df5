"""Flags that choose the model and configure an in-process engine, shared by subcommands.

Defaults are left to EngineConfig (flags default to None and are omitted) so the CLI
never restates them, and the engine (with torch) is imported only when a command runs:
``tandem --help`` and services that hold no model stay fast to start.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from services.cli import arg_types
from services.engine.errors import InvalidRequestError

if TYPE_CHECKING:
    from services.engine.engine import EngineConfig

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
"""The engine's dtypes (services.engine.runner.DTYPES; a test keeps the two equal)."""
KV_LAYOUTS = ("layer-major", "slot-major")
"""services.engine.kv_cache.KV_LAYOUTS, without importing torch (a test keeps them equal)."""

_BATCHING_FLAGS = ("max_num_seqs", "max_num_batched_tokens")
_COMMON_FLAGS = ("dtype", "device", "kv_cache_gib", "num_threads", "block_size", "kv_layout")


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR|tandem-tiny",
        help="a Hugging Face-format model directory (config.json, *.safetensors, "
        "tokenizer.json) or 'tandem-tiny', the built-in model created on first use",
    )


def add_engine_args(parser: argparse.ArgumentParser, *, batching: bool = False) -> None:
    """Add --dtype, --device, --kv-cache-gib and, with ``batching``, the batch limits."""
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        help="weights and KV cache dtype (default: the checkpoint's; float32 on a CPU without "
        "bfloat16/float16 kernels, where half precision runs ~80x slower)",
    )
    group.add_argument(
        "--device",
        type=arg_types.device,
        metavar="cpu|cuda[:N]",
        help="where the model runs (default: cuda when available, else cpu)",
    )
    group.add_argument(
        "--kv-cache-gib",
        type=arg_types.positive_float,
        metavar="GIB",
        help="memory for the paged KV cache in GiB (default: 1.0)",
    )
    group.add_argument(
        "--block-size",
        type=arg_types.positive_int,
        metavar="TOKENS",
        help="tokens per KV block (default 16); every worker serving a model behind one "
        "router must use the same, or prefix hashes would never match",
    )
    group.add_argument(
        "--kv-layout",
        choices=KV_LAYOUTS,
        help="the KV pool's dimension order (default: slot-major). slot-major keeps each "
        "block's keys and values of every layer together, so a prompt's KV crosses to a "
        "decode worker as one NIXL descriptor per run of blocks; layer-major (the order "
        "before 2026-11-27) needs one per layer and K/V. Workers that exchange KV must "
        "use the same",
    )
    group.add_argument(
        "--num-threads",
        type=arg_types.positive_int,
        metavar="N",
        help="CPU threads for the model (default: torch's, at most the CPUs this process "
        "may use: its affinity and its container's CPU limit); give each of several "
        "workers on one machine its share",
    )
    if batching:
        group.add_argument(
            "--max-num-seqs",
            type=arg_types.positive_int,
            metavar="N",
            help="most sequences decoding at once (default: 64)",
        )
        group.add_argument(
            "--max-num-batched-tokens",
            type=arg_types.positive_int,
            metavar="N",
            help="token budget per engine step, decode tokens plus prefill chunks (default: 2048)",
        )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from the flags given; unset flags keep EngineConfig's defaults."""
    from services.engine.engine import EngineConfig

    names = _COMMON_FLAGS + _BATCHING_FLAGS
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    _check_device(given.get("device"))
    return EngineConfig(**given)


def _check_device(device: str | None) -> None:
    # torch's own error for a missing GPU surfaces deep inside model loading; say it up front.
    if device is None or not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise InvalidRequestError(
            "--device", f"{device} was asked for but torch sees no CUDA device; use --device cpu"
        )

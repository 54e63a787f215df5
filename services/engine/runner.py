"""Turns a scheduled step into tensors, runs the model and returns logits.

Owns the model weights and the KV pool tensor; the scheduler never sees either.
"""

from __future__ import annotations

from pathlib import Path

import torch

from services.engine.attention import SeqSlice, plan_attention
from services.engine.errors import InvalidRequestError
from services.engine.kv_cache import KVCache, KVLayoutName, block_runs
from services.engine.model import CausalLM, StepBatch
from services.engine.model_config import ModelConfig
from services.engine.rope import RotaryTable
from services.engine.scheduler import ScheduledChunk
from services.engine.weights import load_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelRunner:
    def __init__(
        self,
        model_dir: Path,
        config: ModelConfig,
        *,
        dtype: torch.dtype,
        device: torch.device,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        kv_layout: KVLayoutName = "slot-major",
    ) -> None:
        self.device = device
        self.block_size = block_size
        # Built on meta (no memory, no random init), then given the checkpoint's tensors.
        # Nothing is computed or allocated on meta: torch's reference ops for meta tensors
        # import torch._dynamo and sympy, 4 s of every worker's start on a slow CPU.
        rotary = RotaryTable(config.rope, config.head_dim, max_model_len, device)
        with torch.device("meta"):
            model = CausalLM(config, rotary)
        load_weights(model, model_dir, dtype, device)
        self.model = model.eval()
        try:
            self.kv_cache = KVCache(
                config.num_layers,
                num_blocks,
                block_size,
                config.num_kv_heads,
                config.head_dim,
                dtype,
                device,
                kv_layout,
            )
        except (MemoryError, torch.OutOfMemoryError) as e:  # a traceback before
            need = (
                KVCache.bytes_per_token(
                    config.num_layers, config.num_kv_heads, config.head_dim, dtype
                )
                * block_size
                * num_blocks
            )
            raise InvalidRequestError(
                "kv_cache_gib",
                f"a KV pool of {num_blocks:,} blocks ({need / 2**30:,.1f} GiB) does not fit in "
                f"this {device}'s free memory ({e}): lower --kv-cache-gib",
            ) from None

    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run one step; logits ``[S, vocab]`` (float32) for the chunks that sample, in order."""
        batch = self._build_batch(chunks)
        return self.model(batch, self.kv_cache)

    def _build_batch(self, chunks: list[ScheduledChunk]) -> StepBatch:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seqs: list[SeqSlice] = []
        logits_rows: list[int] = []
        for chunk in chunks:
            seq, n = chunk.seq, chunk.num_tokens
            start = seq.num_computed_tokens
            table = seq.block_table
            q_start = len(input_ids)
            kv_len = start + n
            if n == 1:  # decoding: no ranges or comprehensions for one token
                input_ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                input_ids += seq.token_ids[start:kv_len]
                pos = range(start, kv_len)
                positions += pos
                slots += [table[p // bs] * bs + p % bs for p in pos]
            seqs.append(SeqSlice(q_start, n, kv_len, _slot_runs(table, kv_len, bs)))
            if chunk.samples:
                logits_rows.append(len(input_ids) - 1)
        dev = self.device
        return StepBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            attention=plan_attention(seqs, self.kv_cache.num_slots, dev),
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=dev),
        )


def _slot_runs(table: list[int], kv_len: int, block_size: int) -> tuple[tuple[int, int], ...]:
    """Slot runs covering the first ``kv_len`` tokens of a block table."""
    num_blocks = -(-kv_len // block_size)
    first = table[0]
    # The common case, one run of consecutive ids (the block pool arranges it), checked at C
    # speed rather than walked block by block every step.
    if table[num_blocks - 1] - first == num_blocks - 1 and table[:num_blocks] == list(
        range(first, first + num_blocks)
    ):
        return ((first * block_size, kv_len),)
    runs = []
    remaining = kv_len
    for first, count in block_runs(table[:num_blocks]):
        length = min(count * block_size, remaining)
        runs.append((first * block_size, length))
        remaining -= length
    return tuple(runs)

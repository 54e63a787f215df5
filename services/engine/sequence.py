"""One request's state inside the engine: its tokens, blocks and progress. No tensors."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from services.engine.block_hash import ROOT_PARENT, BlockHash, hash_block
from services.engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    """Queued, holding no blocks (new, or preempted and waiting to be recomputed)."""
    RUNNING = "running"
    """Holding blocks; prefilling in chunks or decoding one token per step."""
    AWAITING_ROOM = "awaiting_room"
    """Prefilled elsewhere; queued, holding no blocks, until the pool has room to receive
    its KV."""
    AWAITING_KV = "awaiting_kv"
    """Holding blocks that another worker's KV is being copied into; not scheduled."""
    HELD = "held"
    """Prefill done; its blocks stay pinned for a decode worker to read."""
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    """Prompt, then every generated token."""
    params: SamplingParams
    max_total_tokens: int
    """Prompt + max_tokens, capped at the model's context length."""
    arrival: int
    """Admission order; earlier requests are scheduled first and preempted last."""
    num_prompt_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose K/V are in this sequence's blocks."""
    num_committed_blocks: int = 0
    """Leading full blocks already registered with the prefix cache."""
    num_cached_tokens: int | None = None
    """Prompt tokens served from the prefix cache at first admission (for usage)."""
    num_preemptions: int = 0
    num_cached_when_queued: int = 0
    """Leading tokens the prefix cache held when it joined the queue: work it will likely
    skip, left out of the queued prefill a worker reports (``Scheduler.queued_prefill``)."""
    _block_hashes: list[BlockHash] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def block_hashes(self, num_blocks: int, block_size: int, model_id: str) -> list[BlockHash]:
        """Chained hashes of the first ``num_blocks`` full blocks, memoised."""
        while len(self._block_hashes) < num_blocks:
            i = len(self._block_hashes)
            parent = self._block_hashes[-1] if i else ROOT_PARENT
            tokens = self.token_ids[i * block_size : (i + 1) * block_size]
            self._block_hashes.append(hash_block(parent, tokens, model_id))
        return self._block_hashes[:num_blocks]

    def reset_for_recompute(self) -> None:
        """Forget computed state after preemption; the tokens are prefilled again later."""
        self.status = SeqStatus.WAITING
        self.block_table = []
        self.num_computed_tokens = 0
        self.num_committed_blocks = 0
        self.num_preemptions += 1

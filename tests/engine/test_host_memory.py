"""Host memory for KV pools: zeroed, aligned, on huge pages where the kernel allows, freed."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from services.engine.host_memory import HUGE_PAGE_BYTES, host_zeros
from services.engine.kv_cache import KVCache

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def mapping_of(address: int) -> dict[str, str] | None:
    """The /proc/self/smaps entry (its fields) of the mapping holding ``address``."""
    entry: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            if entry is not None:
                return entry
            if start <= address < end:
                entry = {}
        elif entry is not None and ":" in head:
            entry[head.rstrip(":")] = " ".join(line.split()[1:])
    return entry


def test_a_large_tensor_is_zeroed_aligned_and_shaped() -> None:
    t = host_zeros((8, 2, 4096, 4, 64), torch.bfloat16)
    assert t.shape == (8, 2, 4096, 4, 64) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % HUGE_PAGE_BYTES == 0
    assert not t.view(torch.uint8).any()
    t.view(-1)[-1] = 1.5  # the whole extent is writable
    assert t.view(-1)[-1].item() == 1.5


def test_a_small_tensor_comes_from_torch() -> None:
    t = host_zeros((16, 16), torch.float32)
    assert t.shape == (16, 16) and not t.any()
    assert t._base is None  # torch's own storage, not a view of a mapping
    assert host_zeros((HUGE_PAGE_BYTES,), torch.uint8)._base is not None  # a mapping's view


@pytest.mark.skipif(
    not THP.exists() or "[never]" in THP.read_text(),
    reason="transparent huge pages are off on this kernel: pools use plain pages",
)
def test_the_pool_gets_huge_pages() -> None:
    kv = KVCache(8, 512, 16, 4, 64, torch.bfloat16)  # 64 MiB
    entry = mapping_of(kv.tensor.data_ptr())
    assert entry is not None
    assert int(entry["AnonHugePages"].split()[0]) > 0, entry


def is_mapped(address: int) -> bool:
    """Whether /proc/self/maps has a mapping holding ``address``.

    By address, not by range: the kernel merges a neighbouring anonymous mapping made
    later with the same flags into one entry, so a range read earlier may not be listed
    any more although the memory is still there."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        if start <= address < end:
            return True
    return False


def test_the_mapping_goes_with_the_tensor() -> None:
    t = host_zeros((32 << 20,), torch.uint8)
    first, last = t.data_ptr(), t.data_ptr() + t.numel() - 1
    view = t[1024:]
    del t
    gc.collect()
    assert is_mapped(first) and is_mapped(last)  # a view keeps the whole mapping
    del view
    gc.collect()
    assert not is_mapped(first) and not is_mapped(last)

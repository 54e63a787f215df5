"""Host memory for KV pools: zeroed, 2 MiB aligned, on transparent huge pages where the kernel can.

A KV pool is large, lives as long as its worker and is read in long runs, by attention and,
between processes on one host, by NIXL over CMA: there the kernel pins and copies the
peer's pages one by one inside ``process_vm_readv``, and with 4 KiB pages that walk is a
large part of a pull (bench/kv_transfer/README.md measures both). Linux hands out huge
pages only to regions that ask (``madvise`` is the common THP setting), and torch's CPU
allocator does not ask, so CPU pools are mapped here instead. Where the kernel has THP off
or no huge page free, the region is plain pages and works the same. On a fragmented host
the kernel may compact memory while the pool is first touched (THP ``defrag=madvise``):
a one-time cost when the worker starts, paid here rather than during the first prefill.
"""

from __future__ import annotations

import contextlib
import errno
import math
import mmap

import torch

HUGE_PAGE_BYTES = 2 << 20
"""The x86-64 and arm64 (4 KiB base) transparent huge page size; also the alignment."""


def host_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor on its own anonymous mapping, advised for huge pages.

    Small tensors (under one huge page) come from torch. The mapping is released when the
    tensor's storage is (the tensor holds the mmap object's buffer).
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE_BYTES:
        return torch.zeros(shape, dtype=dtype)
    # Private: the kernel gives huge pages to private anonymous memory under the common
    # `madvise` setting, not to shared mappings (shmem has its own switch, usually off).
    size = _round_up(nbytes, HUGE_PAGE_BYTES) + HUGE_PAGE_BYTES
    try:
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as e:
        if e.errno != errno.ENOMEM:
            raise
        raise MemoryError(f"mapping {size / 2**30:,.1f} GiB: {e.strerror}") from None
    with contextlib.suppress(AttributeError, OSError):  # no MADV_HUGEPAGE: plain pages
        region.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE_BYTES
    tensor = raw[start : start + nbytes].view(dtype).view(shape)
    tensor.zero_()  # fault every page in now, not during the first prefill
    return tensor


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple

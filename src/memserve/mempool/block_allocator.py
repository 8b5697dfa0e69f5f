"""Block allocator of one memory tier: a free list and per-block reference counts, plain ints.

Contract: ``allocate`` hands out distinct free blocks with refcount 1 (or raises
``NoFreeBlocksError`` and changes nothing); ``share`` adds a reference; ``free`` drops one reference
per id and returns a block to the free list when its count reaches zero. Freed blocks are reused
oldest-freed first. ``check_integrity`` asserts the conservation law: free + referenced == total.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

import numpy as np


class NoFreeBlocksError(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refcount = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block_id: int) -> int:
        return self._refcount[block_id]

    def allocate(self, num_blocks: int) -> list[int]:
        free, refcount = self._free, self._refcount
        if num_blocks > len(free):
            raise NoFreeBlocksError(f"need {num_blocks} blocks, {len(free)} free")
        block_ids = [free.popleft() for _ in range(num_blocks)]
        for b in block_ids:
            refcount[b] = 1
        return block_ids

    def share(self, block_ids: Iterable[int]) -> None:
        refcount = self._refcount
        for b in block_ids:
            if refcount[b] < 1:
                raise ValueError(f"cannot share free block {b}")
            refcount[b] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        free, refcount = self._free, self._refcount
        for b in block_ids:
            count = refcount[b]
            if count < 1:
                raise ValueError(f"double free of block {b}")
            refcount[b] = count - 1
            if count == 1:
                free.append(b)

    def refcounts(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        """Every block's reference count, as an array (integrity checks)."""
        return np.asarray(self._refcount, dtype=np.int64)

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` unless free + referenced == total and the free list is exact:
        it holds each block with refcount 0 once, and nothing else."""
        refcount = self.refcounts()
        if (negative := np.flatnonzero(refcount < 0)).size:
            b = int(negative[0])
            raise AssertionError(f"block {b} has refcount {refcount[b]}")
        in_free = np.bincount(np.asarray(self._free, dtype=np.int64), minlength=self.num_blocks)
        if (in_free > 1).any():
            raise AssertionError("a block appears twice in the free list")
        if (bad := np.flatnonzero((refcount == 0) != (in_free == 1))).size:
            b = int(bad[0])
            raise AssertionError(f"block {b}: refcount {refcount[b]} but free={bool(in_free[b])}")

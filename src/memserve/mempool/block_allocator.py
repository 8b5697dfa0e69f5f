"""Block allocator of one memory tier: a free list and per-block reference counts, plain ints.

Contract: ``allocate`` hands out distinct free blocks with refcount 1 (or raises
``NoFreeBlocksError`` and changes nothing); ``share`` adds a reference; ``free`` drops one reference
per id and returns a block to the free list when its count reaches zero. Freed blocks are reused
oldest-freed first. ``check_integrity`` asserts the conservation law: free + referenced == total.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


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
        if num_blocks > len(self._free):
            raise NoFreeBlocksError(f"need {num_blocks} blocks, {len(self._free)} free")
        block_ids = [self._free.popleft() for _ in range(num_blocks)]
        for b in block_ids:
            self._refcount[b] = 1
        return block_ids

    def share(self, block_ids: Iterable[int]) -> None:
        for b in block_ids:
            if self._refcount[b] < 1:
                raise ValueError(f"cannot share free block {b}")
            self._refcount[b] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        for b in block_ids:
            if self._refcount[b] < 1:
                raise ValueError(f"double free of block {b}")
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                self._free.append(b)

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` unless free + referenced == total and the free list is exact."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block appears twice in the free list")
        for b, count in enumerate(self._refcount):
            if count < 0:
                raise AssertionError(f"block {b} has refcount {count}")
            if (count == 0) != (b in free):
                raise AssertionError(f"block {b}: refcount {count} but free={b in free}")

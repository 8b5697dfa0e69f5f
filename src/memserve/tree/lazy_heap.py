"""A min-heap whose entries may go stale: the radix tree's LRU order of reclaim candidates.

Contract: ``push(item)`` files the item under its key *now* (``key(item)``). An entry is live when
the item's key is still the filed one and the caller's predicate holds; ``pop`` / ``peek`` drop dead
entries as they surface, so a push costs O(log n) and a pop O(log n) amortized, and nothing is ever
searched for. The owner must push an item again whenever its key changes or it may have become a
candidate (a lock released, a child gone, a tier changed): an item is only found through an entry
made after the last such change. Duplicate entries are harmless (equal items sort by push order,
never by the item). The heap compacts itself (drops dead entries) when it has doubled since the last
compaction, so stale entries cost O(1) memory amortized per live candidate.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
Key = tuple[int, int]

MIN_COMPACT_SIZE = 256


class LazyHeap(Generic[T]):
    def __init__(self, key: Callable[[T], Key], live: Callable[[T], bool]) -> None:
        """``key``: the item's order now (smallest first); ``live``: whether it is a candidate
        at all (checked on pop and at compaction; ``pop`` can narrow it further)."""
        self._key = key
        self._live = live
        self._entries: list[tuple[Key, int, T]] = []
        self._seq = 0
        self._compact_at = MIN_COMPACT_SIZE

    def __len__(self) -> int:
        """Entries, dead ones included (for tests and sizing)."""
        return len(self._entries)

    def push(self, item: T) -> None:
        self._seq += 1
        heapq.heappush(self._entries, (self._key(item), self._seq, item))
        if len(self._entries) > self._compact_at:
            self._compact()

    def peek(self, live: Callable[[T], bool] | None = None) -> tuple[Key, T] | None:
        """The smallest live entry (its key and item), dropping dead ones above it; None if empty.
        ``live`` replaces the heap's own predicate for this call (it must imply it)."""
        check = live or self._live
        entries = self._entries
        while entries:
            key, _, item = entries[0]
            if key == self._key(item) and check(item):
                return key, item
            heapq.heappop(entries)
        return None

    def pop(self, live: Callable[[T], bool] | None = None) -> T | None:
        """Remove and return the smallest live item, or None."""
        top = self.peek(live)
        if top is None:
            return None
        heapq.heappop(self._entries)
        return top[1]

    def _compact(self) -> None:
        kept: dict[tuple[Key, int], tuple[Key, int, T]] = {}
        for key, seq, item in self._entries:
            if key == self._key(item) and self._live(item):
                kept.setdefault((key, id(item)), (key, seq, item))
        self._entries = list(kept.values())
        heapq.heapify(self._entries)
        self._compact_at = max(MIN_COMPACT_SIZE, 2 * len(self._entries))

"""Requests' block tables on top of the MemPool, with prefix caching.

A request's ``block_ids`` holds token positions ``[i * bs, (i + 1) * bs)`` in block ``i``, and the
request holds one reference on each of them. With caching on:

- ``admit`` looks the request up in the prompt tree, locks the hit, swaps its DRAM part in, and
  starts the table with the cached blocks, so only the suffix is prefilled. The hit is capped one
  token short of the request, rounded down to whole blocks: at least one token is always
  computed (it yields the logits), and a cached block is never written.
- ``publish`` inserts the request's computed whole blocks into the tree (after each prompt chunk,
  so that requests running at the same time share a prefix as soon as one has computed it) and
  swaps the table over to the canonical blocks where the prefix was cached meanwhile.
- ``release`` publishes what was computed (prompt and output: the next turn of a chat hits it)
  and drops the request's references and lock; its blocks become historical, or free.

With caching off the tree stays empty and ``release`` frees the blocks (the old behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass

from memserve.engine.request import Request
from memserve.mempool.pool import Hold, MemPool, Tier


def hand_off_key(request_id: str) -> str:
    """The in-flight key of a finished ``keep_kv`` request's blocks."""
    return f"out/{request_id}"


@dataclass
class CacheCounters:
    """Monotonic counters of prefix-cache lookups, in tokens."""

    query_tokens: int = 0
    hit_tokens_device: int = 0
    hit_tokens_dram: int = 0


class KVCacheManager:
    def __init__(self, pool: MemPool, enable_caching: bool = True) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.enable_caching = enable_caching
        self.counters = CacheCounters()

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def admit(
        self, request: Request, max_new_tokens: int, max_swap_in_blocks: int | None = None
    ) -> int | None:
        """Give a request with no blocks its cached prefix plus blocks for its first chunk
        (``min(uncached tokens, max_new_tokens)``), swapping the hit's DRAM part in if it is at
        most ``max_swap_in_blocks`` (None: any). Returns the number of blocks swapped in, or None,
        changing nothing, if there is no room or the swap-in is over budget."""
        assert not request.block_ids and request.prefix_node is None
        if not self.enable_caching:
            num_new = min(request.num_tokens, max_new_tokens)
            return 0 if self.grow(request, num_new) else None
        pool = self.pool
        bs = self.block_size
        hit = pool.match(request.token_ids[: (request.num_tokens - 1) // bs * bs])
        pool.lock(hit.node)
        num_dram = sum(ref.tier is Tier.DRAM for ref in hit.blocks)
        num_new = min(request.num_tokens - hit.num_tokens, max_new_tokens)
        need = num_dram + self.blocks_for(hit.num_tokens + num_new) - len(hit.blocks)
        over_budget = max_swap_in_blocks is not None and num_dram > max_swap_in_blocks
        if over_budget or need > pool.num_available(Tier.DEVICE):
            pool.unlock(hit.node)
            return None
        pool.swap_in(hit.node)
        cached = [ref.block_id for node in pool.tree.path(hit.node) for ref in node.blocks]
        pool.share_mem(cached)
        request.block_ids = cached
        request.prefix_node = hit.node
        request.num_published_blocks = len(cached)
        request.num_computed_tokens = hit.num_tokens
        if request.num_preemptions == 0:
            request.num_cached_tokens = hit.num_tokens
            request.num_cached_tokens_dram = num_dram * bs
        self._count_lookup(request.num_tokens, hit.num_tokens, num_dram * bs)
        grown = self.grow(request, num_new)
        assert grown, "room was checked before the swap-in"
        return num_dram

    def grow(self, request: Request, num_new_tokens: int) -> bool:
        """Grow ``request.block_ids`` to hold ``num_computed_tokens + num_new_tokens`` tokens,
        reclaiming historical blocks if needed. False, changing nothing, if there is no room."""
        total = self.blocks_for(request.num_computed_tokens + num_new_tokens)
        missing = total - len(request.block_ids)
        if missing <= 0:
            return True
        if missing > self.pool.num_available(Tier.DEVICE):
            return False
        request.block_ids.extend(self.pool.alloc_mem(missing))
        return True

    def publish(self, request: Request) -> None:
        """Index the request's computed whole blocks; use the canonical blocks from now on."""
        num_full = request.num_computed_tokens // self.block_size
        if not self.enable_caching or num_full <= request.num_published_blocks:
            return
        pool = self.pool
        table = request.block_ids
        hit = pool.insert(request.token_ids[: num_full * self.block_size], table[:num_full])
        for i, ref in enumerate(hit.blocks):
            if ref.block_id != table[i]:  # computed twice: keep the cached copy, free ours
                pool.share_mem((ref.block_id,))
                pool.free_mem((table[i],))
                table[i] = ref.block_id
        pool.lock(hit.node)
        if request.prefix_node is not None:
            pool.unlock(request.prefix_node)
        request.prefix_node = hit.node
        request.num_published_blocks = num_full

    def hand_off(self, request: Request) -> None:
        """Publish what the request computed, then pass its blocks and lock to a transfer: an
        in-flight ``Hold`` under ``hand_off_key(request_id)`` covering its computed tokens. The
        transfer's owner must ``MemPool.release`` it."""
        self.publish(request)
        tokens = tuple(request.token_ids[: request.num_computed_tokens])
        hold = Hold(request.block_ids, Tier.DEVICE, request.prefix_node, tokens)
        self.pool.hold(hand_off_key(request.request_id), hold)
        request.block_ids = []
        request.prefix_node = None
        request.num_published_blocks = 0

    def release(self, request: Request) -> None:
        """Publish what the request computed, then drop its blocks and lock."""
        self.publish(request)
        self.pool.free_mem(request.block_ids)
        if request.prefix_node is not None:
            self.pool.unlock(request.prefix_node)
        request.block_ids = []
        request.prefix_node = None
        request.num_published_blocks = 0

    def _count_lookup(self, num_tokens: int, num_hit: int, num_dram: int) -> None:
        self.counters.query_tokens += num_tokens
        self.counters.hit_tokens_device += num_hit - num_dram
        self.counters.hit_tokens_dram += num_dram

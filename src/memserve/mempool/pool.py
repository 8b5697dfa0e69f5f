"""MemPool: one instance's KV memory in two tiers (device, host DRAM) plus the prompt index.

The paper's API, in plain ints (block ids are per tier; ``BlockRef`` names a tier and an id):

- memory: ``alloc_mem(n, tier)``, ``free_mem(ids, tier)``, ``share_mem(ids, tier)``,
  ``swap_out(n)`` (device -> DRAM), ``swap_in(node)`` (DRAM -> device);
- index: ``insert(tokens, ids)``, ``match(tokens)``, ``delete(tokens)``, ``lock`` / ``unlock``;
- data: ``read_blocks`` / ``write_blocks`` gather and scatter whole aggregated blocks;
- in flight: ``holds`` (``hold`` / ``take`` / ``release``), ``reserve`` (a receiver's cached
  prefix + fresh blocks as one hold) and ``insert_hold``: what the distributed calls
  (``mempool/distributed.py``) build on. A block owned by a transfer is **in flight**, the fourth
  state; ``check_integrity`` counts holds like requests.

Ownership is reference counting. The prompt tree holds one reference on every block it indexes;
a request holds one reference on every block of its block table. Hence a block is

- **free**: no reference;
- **active**: referenced by at least one request (its tree node, if any, is locked);
- **historical**: referenced by the tree only — cached, and reclaimable when its node is unlocked.

Reclaiming (inside ``alloc_mem``): device blocks are swapped out to DRAM, coldest first, while the
DRAM tier exists; DRAM makes room by dropping its own coldest blocks; without DRAM, cold device
leaves are dropped. Locked blocks are never moved or dropped. Two invariants keep this simple:
every tree node lives in one tier, and DRAM is closed downward (a DRAM node's children are DRAM),
so a hit is a device prefix followed by a DRAM part, and swap-in moves whole nodes.

Not thread-safe: one owner (the engine) serialises every call.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter

import numpy as np
import torch

from memserve.mempool.block_allocator import BlockAllocator, NoFreeBlocksError
from memserve.mempool.kv_cache import KVCache
from memserve.tree.radix import BlockRef, Match, NodeHandle, RadixTree, Tier

__all__ = ["Hold", "MemPool", "NoFreeBlocksError", "PoolCounters", "Tier"]


@dataclass
class Hold:
    """Blocks **in flight**: owned by a transfer (being sent or received) rather than by a request
    or the tree. The hold has one reference on each of ``block_ids`` (of ``tier``) and, when
    ``node`` is set, one lock on it (a cached prefix it relies on). ``tokens``: the tokens whose
    KV the blocks hold, when known (what a sender offers to insert at the peer)."""

    block_ids: list[int]
    tier: Tier = Tier.DEVICE
    node: NodeHandle | None = None
    tokens: tuple[int, ...] = ()


@dataclass
class PoolCounters:
    """Monotonic counters (blocks, or tokens where named) since the pool was made."""

    swap_out_blocks: int = 0
    swap_in_blocks: int = 0
    evicted_device_blocks: int = 0
    evicted_dram_blocks: int = 0


class MemPool:
    def __init__(self, device: KVCache, dram: KVCache | None = None) -> None:
        if dram is not None and dram.block_size != device.block_size:
            raise ValueError("both tiers must use the same block size")
        self.block_size = device.block_size
        self.caches: dict[Tier, KVCache] = {Tier.DEVICE: device}
        self.allocators = {Tier.DEVICE: BlockAllocator(device.num_blocks)}
        if dram is not None:
            self.caches[Tier.DRAM] = dram
            self.allocators[Tier.DRAM] = BlockAllocator(dram.num_blocks)
        self.tree = RadixTree(self.block_size)
        self.counters = PoolCounters()
        self.holds: dict[str, Hold] = {}  # in-flight blocks by transfer key

    # ---- in flight -----------------------------------------------------------------------

    def hold(self, key: str, hold: Hold) -> None:
        """Register blocks (and a lock) that ``hold`` already owns as in flight under ``key``."""
        if key in self.holds:
            raise ValueError(f"transfer key {key!r} is in use")
        self.holds[key] = hold

    def take(self, key: str) -> Hold:
        """Unregister a hold; its references and lock pass to the caller (e.g. a request)."""
        return self.holds.pop(key)

    def reserve(self, key: str, tokens: Sequence[int], use_cache: bool = True) -> int:
        """Receiver side of a transfer: hold device blocks for the KV of ``tokens`` under ``key``.

        The hold covers ``ceil(len(tokens) / block_size)`` blocks: first the whole blocks of
        ``tokens`` already cached here (matched, locked, swapped in from DRAM; only when
        ``use_cache``), then fresh blocks for the rest, which the sender fills. Returns how many
        leading blocks were cached. Raises ``NoFreeBlocksError``, changing nothing, if there is
        no room."""
        hit = self.match(tokens if use_cache else ())
        self.lock(hit.node)
        num_new = -(-len(tokens) // self.block_size) - len(hit.blocks)
        num_dram = sum(ref.tier is Tier.DRAM for ref in hit.blocks)
        try:
            if num_new + num_dram > self.num_available(Tier.DEVICE):
                raise NoFreeBlocksError(f"no room to receive {num_new} blocks")
            self.swap_in(hit.node)
            new_ids = self.alloc_mem(num_new)
        except NoFreeBlocksError:
            self.unlock(hit.node)
            raise
        cached = [ref.block_id for n in self.tree.path(hit.node) for ref in n.blocks]
        self.share_mem(cached)
        self.hold(key, Hold(cached + new_ids, Tier.DEVICE, hit.node, tuple(tokens)))
        return len(cached)

    def insert_hold(self, key: str) -> int:
        """Publish a completed receive: insert the hold's whole blocks under its tokens, then
        release it (the tree keeps what it indexed). Returns the number of blocks indexed."""
        hold = self.holds[key]
        match = self.insert(hold.tokens, hold.block_ids)
        self.release(key)
        return len(match.blocks)

    def release(self, key: str) -> bool:
        """Drop a hold's references and lock (blocks go back to historical or free). False if
        ``key`` is not held (released already)."""
        hold = self.holds.pop(key, None)
        if hold is None:
            return False
        self.free_mem(hold.block_ids, hold.tier)
        if hold.node is not None:
            self.unlock(hold.node)
        return True

    @property
    def has_dram(self) -> bool:
        return Tier.DRAM in self.allocators

    def num_blocks(self, tier: Tier) -> int:
        allocator = self.allocators.get(tier)
        return 0 if allocator is None else allocator.num_blocks

    def num_free(self, tier: Tier) -> int:
        allocator = self.allocators.get(tier)
        return 0 if allocator is None else allocator.num_free

    def num_historical(self, tier: Tier) -> int:
        """Blocks only the tree references (exact when locks mirror request holdings)."""
        return self.tree.num_blocks(tier) - self.tree.num_locked_blocks(tier)

    def num_available(self, tier: Tier = Tier.DEVICE) -> int:
        """Blocks ``alloc_mem`` can hand out now: free plus reclaimable (unlocked, in the tree)."""
        return self.num_free(tier) + self.num_historical(tier)

    # ---- memory --------------------------------------------------------------------------

    def alloc_mem(self, num_blocks: int, tier: Tier = Tier.DEVICE) -> list[int]:
        """``num_blocks`` distinct blocks of ``tier``, refcount 1, reclaiming historical blocks as
        needed. Raises ``NoFreeBlocksError`` (having reclaimed nothing) if even that is not enough."""
        allocator = self.allocators[tier]
        if num_blocks > allocator.num_free:
            if num_blocks > self.num_available(tier):
                raise NoFreeBlocksError(
                    f"need {num_blocks} {tier.value} blocks, {self.num_available(tier)} available"
                )
            self._reclaim(num_blocks - allocator.num_free, tier)
        return allocator.allocate(num_blocks)

    def free_mem(self, block_ids: Iterable[int], tier: Tier = Tier.DEVICE) -> None:
        """Drop one reference per id; a block with none left becomes free."""
        self.allocators[tier].free(block_ids)

    def share_mem(self, block_ids: Iterable[int], tier: Tier = Tier.DEVICE) -> None:
        """Add one reference per id (a request starts using a cached block)."""
        self.allocators[tier].share(block_ids)

    def swap_out(self, num_blocks: int) -> int:
        """Move up to ``num_blocks`` historical device blocks to free DRAM blocks, coldest first.
        Returns how many moved (0 without a DRAM tier, or when DRAM or candidates run out)."""
        if not self.has_dram:
            return 0
        nodes = self.tree.select_swap_out(min(num_blocks, self.num_free(Tier.DRAM)))
        src = [ref.block_id for node in nodes for ref in node.blocks]
        if not src:
            return 0
        dst = self.allocators[Tier.DRAM].allocate(len(src))
        self._copy(Tier.DEVICE, src, Tier.DRAM, dst)
        self._retier(nodes, Tier.DRAM, dst)
        self.allocators[Tier.DEVICE].free(src)
        self.counters.swap_out_blocks += len(src)
        return len(src)

    def swap_in(self, node: NodeHandle) -> int:
        """Move the DRAM blocks on root..``node`` to device. ``node`` must be locked (so nothing
        on the path is reclaimed meanwhile). Returns the number of blocks moved; raises
        ``NoFreeBlocksError`` (changing nothing) if the device has no room for them."""
        if node.lock_ref == 0:
            raise ValueError("swap_in needs a locked node")
        nodes = [n for n in self.tree.path(node) if n.blocks[0].tier is Tier.DRAM]
        src = [ref.block_id for n in nodes for ref in n.blocks]
        if not src:
            return 0
        dst = self.alloc_mem(len(src), Tier.DEVICE)
        self._copy(Tier.DRAM, src, Tier.DEVICE, dst)
        self._retier(nodes, Tier.DEVICE, dst)
        self.allocators[Tier.DRAM].free(src)
        self.counters.swap_in_blocks += len(src)
        return len(src)

    # ---- index ---------------------------------------------------------------------------

    def match(self, tokens: Sequence[int]) -> Match:
        """Longest cached prefix of ``tokens`` in whole blocks (any tier; see ``swap_in``)."""
        return self.tree.match(tokens)

    def lock(self, node: NodeHandle) -> None:
        self.tree.lock(node)

    def unlock(self, node: NodeHandle) -> None:
        self.tree.unlock(node)

    def insert(self, tokens: Sequence[int], block_ids: Sequence[int]) -> Match:
        """Publish device blocks ``block_ids`` (one per whole block of ``tokens``) as the KV of
        ``tokens``. The caller keeps its own references; the tree takes one on every block it
        newly indexes. Where the prefix is already cached on device the cached block wins; where it
        is cached in DRAM the caller's device block replaces it (a free swap-in). Returns the match
        of the whole inserted prefix: the canonical device blocks, which the caller should use
        (and reference) instead of its own, and the node to lock."""
        block_ids = block_ids[: len(tokens) // self.block_size]
        tokens = tokens[: len(block_ids) * self.block_size]
        refs = [BlockRef(Tier.DEVICE, b) for b in block_ids]
        before = self.tree.match(tokens)
        self._promote(before.node, refs)
        self.tree.insert(tokens, refs)
        self.allocators[Tier.DEVICE].share(block_ids[len(before.blocks) :])
        return self.tree.match(tokens)

    def delete(self, tokens: Sequence[int]) -> int:
        """Drop the cached last block of ``tokens`` and everything cached after it. Raises
        ``ValueError`` if any of it is locked. Returns the number of blocks dropped."""
        removed = self.tree.delete(tokens)
        self._release(removed, evicted=False)
        return len(removed)

    # ---- data (transfer seam) ------------------------------------------------------------

    def read_blocks(self, block_ids: Sequence[int], tier: Tier = Tier.DEVICE) -> torch.Tensor:
        """A contiguous copy of whole blocks, ``[n, L, 2, block_size, H_kv, D]``."""
        return self.caches[tier].block_view(list(block_ids))

    def write_blocks(
        self, block_ids: Sequence[int], data: torch.Tensor, tier: Tier = Tier.DEVICE
    ) -> None:
        cache = self.caches[tier]
        index = torch.tensor(block_ids, dtype=torch.long, device=cache.data.device)
        # Blocking on purpose: a freed source block may be reused right after this returns.
        cache.data.index_copy_(0, index, data.to(cache.data.device))

    # ---- integrity -----------------------------------------------------------------------

    def check_integrity(self, held: Iterable[int] = ()) -> None:
        """Raise ``AssertionError`` unless, per tier, every block's refcount equals its tree
        reference plus the requests holding it (``held``: device block ids, one entry per
        holding) plus the in-flight holds (so free + active + historical + in flight == total),
        no unlocked tree block is held, nodes are single-tier and DRAM is closed downward."""
        self.tree.check_integrity()
        for tier in Tier:
            if tier not in self.allocators and self.tree.num_blocks(tier):
                raise AssertionError(
                    f"the tree indexes {tier.value} blocks but there is no such tier"
                )
        tree_ids: dict[Tier, list[int]] = {tier: [] for tier in Tier}
        unlocked: list[int] = []  # device blocks of unlocked nodes
        for node in self.tree.nodes():
            tier = self._check_node_tiers(node)
            ids = list(map(itemgetter(1), node.blocks))
            tree_ids[tier].extend(ids)
            if tier is Tier.DEVICE and node.lock_ref == 0:
                unlocked.extend(ids)
        held = list(held)
        in_flight = {
            tier: [b for h in self.holds.values() if h.tier is tier for b in h.block_ids]
            for tier in Tier
        }
        held += in_flight[Tier.DEVICE]
        if both := set(held).intersection(unlocked):
            ref = BlockRef(Tier.DEVICE, min(both))
            raise AssertionError(f"{ref} is held by a request but its node is unlocked")
        for tier, allocator in self.allocators.items():
            allocator.check_integrity()
            ids = tree_ids[tier] + (held if tier is Tier.DEVICE else in_flight[tier])
            if ids and not 0 <= min(ids) <= max(ids) < allocator.num_blocks:
                raise AssertionError(
                    f"a {tier.value} block id is out of range: {min(ids), max(ids)}"
                )
            expected = np.bincount(np.asarray(ids, dtype=np.int64), minlength=allocator.num_blocks)
            actual = allocator.refcounts()
            if (bad := np.flatnonzero(expected != actual)).size:
                b = int(bad[0])
                raise AssertionError(
                    f"{tier.value} block {b}: refcount {actual[b]}, expected {expected[b]}"
                )

    def _check_node_tiers(self, node: NodeHandle) -> Tier:
        """The node's one tier; raises if it mixes tiers or is DRAM above a device child."""
        tier = node.blocks[0].tier
        if len(set(map(itemgetter(0), node.blocks))) > 1:
            raise AssertionError(f"{node!r} mixes tiers")
        if tier is Tier.DRAM and any(
            c.blocks[0].tier is not Tier.DRAM for c in node.children.values()
        ):
            raise AssertionError(f"{node!r} is in DRAM but has a device child")
        return tier

    # ---- internals -----------------------------------------------------------------------

    def _reclaim(self, num_blocks: int, tier: Tier) -> None:
        """Make ``num_blocks`` more blocks of ``tier`` free (the caller checked they exist). The
        tree's candidate heaps make this O(log n) per node taken, so it reclaims exactly what is
        needed and keeps the rest of the cache."""
        allocator = self.allocators[tier]
        target = allocator.num_free + num_blocks
        while allocator.num_free < target:
            need = target - allocator.num_free
            if self._demote(need, tier):
                continue
            dropped = self.tree.evict(need, tier)
            if not dropped:
                raise AssertionError(f"{need} {tier.value} blocks counted reclaimable, none found")
            self._release(dropped)

    def _demote(self, need: int, tier: Tier) -> int:
        """Swap up to ``need`` device blocks out to DRAM (making DRAM room first); 0 if none."""
        if tier is not Tier.DEVICE or not self.has_dram or not self._make_dram_room(need):
            return 0
        return self.swap_out(need)

    def _make_dram_room(self, want: int) -> bool:
        """Free DRAM blocks for a swap-out (dropping the coldest DRAM leaves if DRAM is full)."""
        if self.num_free(Tier.DRAM) == 0:
            self._release(self.tree.evict(want, Tier.DRAM))
        return self.num_free(Tier.DRAM) > 0

    def _release(self, refs: Sequence[BlockRef], evicted: bool = True) -> None:
        """Drop the tree's reference on blocks it no longer indexes."""
        for ref in refs:
            self.allocators[ref.tier].free((ref.block_id,))
            if not evicted:
                continue
            if ref.tier is Tier.DEVICE:
                self.counters.evicted_device_blocks += 1
            else:
                self.counters.evicted_dram_blocks += 1

    def _promote(self, node: NodeHandle, refs: Sequence[BlockRef]) -> None:
        """Replace the DRAM nodes on root..``node`` by the caller's device copies ``refs``."""
        pos = 0
        for n in self.tree.path(node):
            if n.blocks[0].tier is Tier.DRAM:
                old = [ref.block_id for ref in n.blocks]
                new = refs[pos : pos + len(n.blocks)]
                self.tree.set_tier(n, new)
                self.allocators[Tier.DEVICE].share(ref.block_id for ref in new)
                self.allocators[Tier.DRAM].free(old)
            pos += len(n.blocks)

    def _retier(self, nodes: Sequence[NodeHandle], tier: Tier, block_ids: Sequence[int]) -> None:
        pos = 0
        for node in nodes:
            n = len(node.blocks)
            self.tree.set_tier(node, [BlockRef(tier, b) for b in block_ids[pos : pos + n]])
            pos += n

    def _copy(self, src_tier: Tier, src: Sequence[int], dst_tier: Tier, dst: Sequence[int]) -> None:
        """Copy whole aggregated blocks between tiers. Between host tensors: one ``copy_`` per run
        of blocks adjacent on both sides, no staging (measured 2-4x faster per block than a gather
        plus a scatter through a staging buffer, which costs two extra passes over the bytes).
        With a GPU involved: one gather and one scatter (few large transfers beat many small ones)."""
        src_data, dst_data = self.caches[src_tier].data, self.caches[dst_tier].data
        if src_data.device.type != "cpu" or dst_data.device.type != "cpu":
            self.write_blocks(dst, self.read_blocks(src, src_tier), dst_tier)
            return
        for s, d, n in adjacent_runs(src, dst):
            dst_data[d : d + n].copy_(src_data[s : s + n])


def adjacent_runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(src_start, dst_start, length)`` of the maximal runs where both ids go up by one."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs

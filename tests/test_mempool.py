"""``MemPool``: exact reclaim order and tiers on tiny pools, swaps that keep the data, the integrity
check, and a stateful model check of requests, pressure and swaps against a reference model.

Every block's content is a tag: a tree block holds ``tag(prefix)`` of the tokens up to its end, a
block held outside the tree a unique negative tag. Whatever moved, a block must still carry its tag.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from memserve.mempool.kv_cache import KVCache
from memserve.mempool.pool import MemPool, NoFreeBlocksError, PoolCounters
from memserve.tree import BlockRef, NodeHandle, Tier

DEVICE, DRAM = Tier.DEVICE, Tier.DRAM
BS = 2
ROW = 1 * 2 * BS * 1 * 2  # floats per block: layers * (K, V) * block_size * kv_heads * head_dim
Prefix = tuple[int, ...]


def make_pool(num_device: int, num_dram: int | None) -> MemPool:
    def cache(num_blocks: int) -> KVCache:
        return KVCache(num_blocks, 1, BS, 1, 2, torch.float32, torch.device("cpu"))

    return MemPool(cache(num_device), None if num_dram is None else cache(num_dram))


def D(b: int) -> BlockRef:
    return BlockRef(DEVICE, b)


def R(b: int) -> BlockRef:
    return BlockRef(DRAM, b)


def tag(prefix: Prefix) -> list[float]:
    """The content of the block that ends ``prefix``: unique per prefix (digits t + 1, base 3)."""
    code = sum((t + 1) * 3**i for i, t in enumerate(prefix))
    return [float(code * ROW + j) for j in range(ROW)]


def private_tag(uid: int) -> list[float]:
    return [float(-(uid * ROW + j + 1)) for j in range(ROW)]


def write(pool: MemPool, block_ids: Sequence[int], rows: list[list[float]], tier: Tier) -> None:
    data = torch.tensor(rows, dtype=torch.float32).view(len(rows), 1, 2, BS, 1, 2)
    pool.write_blocks(block_ids, data, tier)


def read(pool: MemPool, block_ids: Sequence[int], tier: Tier) -> list[list[float]]:
    rows: list[list[float]] = pool.read_blocks(block_ids, tier).view(len(block_ids), ROW).tolist()
    return rows


def cached_blocks(pool: MemPool) -> dict[Prefix, BlockRef]:
    """Every cached whole-block prefix -> the block that ends it, read without touching the LRU."""
    prefix_of: dict[int, Prefix] = {pool.tree.root.node_id: ()}
    out: dict[Prefix, BlockRef] = {}
    for node in pool.tree.nodes():  # parents before children
        assert node.parent is not None
        base = prefix_of[node.parent.node_id]
        for i, ref in enumerate(node.blocks):
            out[base + node.token_ids[: (i + 1) * BS]] = ref
        prefix_of[node.node_id] = base + node.token_ids
    return out


def tree_state(pool: MemPool) -> list[tuple[int, Prefix, tuple[BlockRef, ...], int, int]]:
    """Everything a failed call must leave as it was: edges, blocks, LRU stamps, locks."""
    nodes = [pool.tree.root, *pool.tree.nodes()]
    return sorted((n.node_id, n.token_ids, n.blocks, n.last_access, n.lock_ref) for n in nodes)


def check_data(pool: MemPool) -> None:
    """Every cached block carries the tag of its prefix."""
    for tier in pool.allocators:
        cached = {k: r.block_id for k, r in cached_blocks(pool).items() if r.tier is tier}
        rows = read(pool, list(cached.values()), tier) if cached else []
        assert rows == [tag(k) for k in cached], f"{tier.value} data lost"


def cache(pool: MemPool, tokens: Sequence[int]) -> list[int]:
    """A finished request: compute ``tokens`` into fresh blocks, publish them, drop its references."""
    block_ids = pool.alloc_mem(len(tokens) // BS)
    rows = [tag(tuple(tokens[: (i + 1) * BS])) for i in range(len(block_ids))]
    write(pool, block_ids, rows, DEVICE)
    pool.insert(tokens, block_ids)
    pool.free_mem(block_ids)
    return block_ids


def counts(pool: MemPool) -> tuple[int, int, int, int]:
    c = pool.counters
    return (c.swap_out_blocks, c.swap_in_blocks, c.evicted_device_blocks, c.evicted_dram_blocks)


# -- exact examples on tiny pools ----------------------------------------------------------------


def test_pressure_swaps_the_coldest_device_nodes_out_tail_first_then_drops_dram_lru() -> None:
    pool = make_pool(4, 3)
    assert cache(pool, [1, 1, 2, 2]) == [0, 1]
    assert cache(pool, [3, 3]) == [2]
    assert cache(pool, [4, 4]) == [3]
    pool.match([1, 1, 2, 2])  # LRU: [3 3] coldest, then [4 4], then [1 1 | 2 2]
    assert pool.alloc_mem(2) == [2, 3]
    assert cached_blocks(pool) == {(1, 1): D(0), (1, 1, 2, 2): D(1), (3, 3): R(0), (4, 4): R(1)}
    assert counts(pool) == (2, 0, 0, 0)
    # One block more: the edge [1 1 | 2 2] is split, its tail goes out, its head stays on device.
    assert pool.alloc_mem(1) == [1]
    assert cached_blocks(pool) == {(1, 1): D(0), (1, 1, 2, 2): R(2), (3, 3): R(0), (4, 4): R(1)}
    assert (pool.num_free(DRAM), pool.num_historical(DEVICE)) == (0, 1)
    # DRAM is full: its coldest leaf [3 3] is dropped to make room for the head.
    assert pool.alloc_mem(1) == [0]
    assert cached_blocks(pool) == {(1, 1): R(0), (1, 1, 2, 2): R(2), (4, 4): R(1)}
    assert counts(pool) == (4, 0, 0, 1)
    assert (pool.num_free(DEVICE), pool.num_available(DEVICE), pool.num_historical(DRAM)) == (
        0,
        0,
        3,
    )
    check_data(pool)
    pool.check_integrity(held=[2, 3, 1, 0])
    with pytest.raises(NoFreeBlocksError):
        pool.alloc_mem(1)  # no device block is reclaimable; DRAM blocks do not count
    assert counts(pool) == (4, 0, 0, 1)
    pool.check_integrity(held=[2, 3, 1, 0])


def test_without_dram_cold_device_leaves_are_dropped_in_lru_order_tail_first() -> None:
    pool = make_pool(5, None)
    assert cache(pool, [1, 1, 2, 2]) == [0, 1]
    assert cache(pool, [1, 1, 3, 3]) == [2, 3]  # [1 1] was cached: block 2 is freed again
    assert cache(pool, [5, 5]) == [4]
    pool.match([1, 1, 2, 2])  # LRU leaves: [3 3], [5 5], [2 2]
    assert pool.swap_out(3) == 0
    assert pool.num_free(DEVICE) == 1
    assert pool.alloc_mem(3) == [2, 3, 4]
    assert cached_blocks(pool) == {(1, 1): D(0), (1, 1, 2, 2): D(1)}
    assert counts(pool) == (0, 0, 2, 0)
    # The last leaf goes from its tail; its emptied edge exposes [1 1] as the next leaf.
    assert pool.alloc_mem(2) == [1, 0]
    assert cached_blocks(pool) == {}
    assert counts(pool) == (0, 0, 4, 0)
    pool.check_integrity(held=[2, 3, 4, 1, 0])


def test_swap_in_moves_exactly_the_dram_tail_keeps_the_data_and_frees_dram() -> None:
    pool = make_pool(4, 4)
    assert cache(pool, [1, 1, 2, 2, 3, 3]) == [0, 1, 2]
    assert pool.swap_out(2) == 2  # the tail two blocks of the edge
    assert cached_blocks(pool) == {(1, 1): D(0), (1, 1, 2, 2): R(0), (1, 1, 2, 2, 3, 3): R(1)}
    assert (pool.num_free(DEVICE), pool.num_free(DRAM)) == (3, 2)
    hit = pool.match([1, 1, 2, 2, 3, 3, 4])
    assert (hit.num_tokens, hit.blocks) == (6, (D(0), R(0), R(1)))
    pool.lock(hit.node)
    assert pool.swap_in(hit.node) == 2
    assert cached_blocks(pool) == {(1, 1): D(0), (1, 1, 2, 2): D(3), (1, 1, 2, 2, 3, 3): D(1)}
    assert read(pool, [0, 3, 1], DEVICE) == [
        tag((1, 1)),
        tag((1, 1, 2, 2)),
        tag((1, 1, 2, 2, 3, 3)),
    ]
    assert (pool.num_free(DEVICE), pool.num_free(DRAM)) == (1, 4)
    assert counts(pool) == (2, 2, 0, 0)
    assert pool.swap_in(hit.node) == 0  # nothing left in DRAM
    pool.check_integrity()
    pool.unlock(hit.node)
    with pytest.raises(ValueError, match="locked"):
        pool.swap_in(hit.node)
    pool.check_integrity()


def test_swap_in_drops_device_leaves_when_dram_is_full_of_the_locked_hit() -> None:
    pool = make_pool(3, 2)
    assert cache(pool, [1, 1, 2, 2]) == [0, 1]
    assert pool.swap_out(2) == 2
    assert cache(pool, [5, 5, 6, 6, 7, 7]) == [2, 0, 1]
    hit = pool.match([1, 1, 2, 2])
    assert hit.blocks == (R(0), R(1))
    pool.lock(hit.node)
    assert pool.swap_in(hit.node) == 2  # DRAM cannot take [5 5 ...]: its tail is dropped instead
    assert cached_blocks(pool) == {(1, 1): D(1), (1, 1, 2, 2): D(0), (5, 5): D(2)}
    assert counts(pool) == (2, 2, 2, 0)
    check_data(pool)
    pool.unlock(hit.node)
    pool.check_integrity()


def test_swap_in_without_device_room_raises_and_changes_nothing() -> None:
    pool = make_pool(2, 2)
    cache(pool, [1, 1, 2, 2])
    assert pool.swap_out(2) == 2
    held = pool.alloc_mem(1)
    hit = pool.match([1, 1, 2, 2])
    pool.lock(hit.node)
    before = tree_state(pool)
    with pytest.raises(NoFreeBlocksError):
        pool.swap_in(hit.node)
    assert (tree_state(pool), counts(pool), pool.num_free(DEVICE)) == (before, (2, 0, 0, 0), 1)
    pool.unlock(hit.node)
    pool.check_integrity(held=held)


def test_insert_over_a_dram_prefix_takes_the_callers_device_blocks_and_frees_dram() -> None:
    pool = make_pool(4, 4)
    cache(pool, [1, 1, 2, 2])
    assert pool.swap_out(2) == 2
    assert cached_blocks(pool) == {(1, 1): R(0), (1, 1, 2, 2): R(1)}
    tokens = [1, 1, 2, 2, 3, 3]
    block_ids = pool.alloc_mem(3)
    assert block_ids == [2, 3, 0]
    write(pool, block_ids, [tag(tuple(tokens[:i])) for i in (2, 4, 6)], DEVICE)
    hit = pool.insert(tokens, block_ids)
    assert (hit.num_tokens, hit.blocks) == (6, (D(2), D(3), D(0)))
    assert cached_blocks(pool) == {(1, 1): D(2), (1, 1, 2, 2): D(3), (1, 1, 2, 2, 3, 3): D(0)}
    assert (pool.num_free(DRAM), pool.num_free(DEVICE)) == (4, 1)
    assert counts(pool) == (2, 0, 0, 0)  # not a swap-in: nothing was copied
    pool.lock(hit.node)
    pool.check_integrity(held=block_ids)
    pool.free_mem(block_ids)
    pool.unlock(hit.node)
    assert pool.num_historical(DEVICE) == 3
    check_data(pool)
    pool.check_integrity()


def test_insert_keeps_the_cached_device_blocks_and_leaves_the_callers_copies_to_it() -> None:
    pool = make_pool(4, None)
    cache(pool, [1, 1, 2, 2])
    block_ids = pool.alloc_mem(2)
    assert block_ids == [2, 3]
    hit = pool.insert([1, 1, 2, 2], block_ids)
    assert hit.blocks == (D(0), D(1))
    assert [pool.allocators[DEVICE].refcount(b) for b in range(4)] == [1, 1, 1, 1]
    pool.free_mem(block_ids)
    assert pool.num_free(DEVICE) == 2
    pool.check_integrity()


@pytest.mark.parametrize("num_dram", [None, 4])
def test_a_locked_hit_is_never_reclaimed(num_dram: int | None) -> None:
    pool = make_pool(3, num_dram)
    cache(pool, [1, 1, 2, 2])
    hit = pool.match([1, 1, 2, 2])
    pool.lock(hit.node)
    assert pool.num_available(DEVICE) == 1
    held = pool.alloc_mem(1)
    assert held == [2]
    before = tree_state(pool)
    with pytest.raises(NoFreeBlocksError, match="need 1 device blocks, 0 available"):
        pool.alloc_mem(1)
    assert pool.swap_out(2) == 0
    with pytest.raises(ValueError, match="locked"):
        pool.delete([1, 1])
    assert (tree_state(pool), counts(pool)) == (before, (0, 0, 0, 0))
    pool.check_integrity(held=held)
    pool.unlock(hit.node)
    assert pool.alloc_mem(1) == [1]  # the tail of the edge goes: dropped, or swapped out
    expected = {(1, 1): D(0)} if num_dram is None else {(1, 1): D(0), (1, 1, 2, 2): R(0)}
    assert cached_blocks(pool) == expected
    check_data(pool)


def test_a_partly_locked_hit_gives_up_only_its_unlocked_tail() -> None:
    pool = make_pool(3, None)
    cache(pool, [1, 1, 2, 2])
    head = pool.match([1, 1])  # splits the edge: the lock pins [1 1] only
    pool.lock(head.node)
    assert pool.num_available(DEVICE) == 2
    assert pool.alloc_mem(2) == [2, 1]
    assert cached_blocks(pool) == {(1, 1): D(0)}
    assert pool.num_historical(DEVICE) == 0
    pool.unlock(head.node)
    pool.check_integrity(held=[2, 1])


def test_delete_drops_the_prefix_and_its_extensions_without_counting_evictions() -> None:
    pool = make_pool(5, 2)
    assert cache(pool, [1, 1, 2, 2, 3, 3]) == [0, 1, 2]
    assert cache(pool, [1, 1, 4, 4]) == [3, 4]  # [1 1] was cached: block 3 is freed again
    assert pool.swap_out(1) == 1
    assert cached_blocks(pool)[(1, 1, 2, 2, 3, 3)] == R(0)
    assert pool.delete([1, 1, 2, 2, 9]) == 2  # [2 2] on device and [3 3] in DRAM
    assert cached_blocks(pool) == {(1, 1): D(0), (1, 1, 4, 4): D(4)}
    assert pool.delete([7, 7]) == 0
    assert (pool.num_free(DEVICE), pool.num_free(DRAM), counts(pool)) == (3, 2, (1, 0, 0, 0))
    pool.check_integrity()


def test_check_integrity_catches_a_leak() -> None:
    pool = make_pool(3, 2)
    block_ids = pool.alloc_mem(1)
    pool.check_integrity(held=block_ids)
    with pytest.raises(AssertionError, match="device block 0: refcount 1, expected 0"):
        pool.check_integrity()


def test_check_integrity_catches_a_held_block_whose_node_is_unlocked() -> None:
    pool = make_pool(3, 2)
    block_ids = pool.alloc_mem(2)
    hit = pool.insert([1, 1, 2, 2], block_ids)
    pool.lock(hit.node)
    pool.check_integrity(held=block_ids)
    pool.unlock(hit.node)
    with pytest.raises(AssertionError, match="held by a request but its node is unlocked"):
        pool.check_integrity(held=block_ids)


def test_check_integrity_catches_a_refcount_mismatch() -> None:
    pool = make_pool(3, 2)
    cache(pool, [1, 1, 2, 2])
    assert pool.swap_out(1) == 1
    pool.check_integrity()
    pool.share_mem([0], DRAM)
    with pytest.raises(AssertionError, match="dram block 0: refcount 2, expected 1"):
        pool.check_integrity()
    pool.free_mem([0], DRAM)
    pool.share_mem([0])
    with pytest.raises(AssertionError, match="device block 0: refcount 2, expected 1"):
        pool.check_integrity()


# -- stateful model check ------------------------------------------------------------------------

NUM_DEVICE, NUM_DRAM = 8, 6
prompts = st.lists(st.integers(0, 1), min_size=1, max_size=9)  # up to 4 whole blocks + a partial


@dataclass
class Holder:
    """Blocks from ``alloc_mem``, held outside the tree."""

    tier: Tier
    block_ids: list[int]


@dataclass
class Req:
    """A request as ``KVCacheManager`` runs it: ``table[:num_tree_blocks]`` are the tree's blocks
    for ``tokens`` (locked through ``node``, which pins ``locked``), the rest are its own."""

    tokens: Prefix
    node: NodeHandle
    locked: Prefix
    table: list[int]
    num_tree_blocks: int


@dataclass(frozen=True)
class Snapshot:
    cached: dict[Prefix, BlockRef]
    counters: PoolCounters
    tree: list[tuple[int, Prefix, tuple[BlockRef, ...], int, int]]


class MemPoolMachine(RuleBasedStateMachine):
    """The model: the cached prefixes and their blocks (checked transition by transition), the
    holders with the content they wrote, and the locks. Counts and contents follow from it."""

    num_dram: int | None = NUM_DRAM

    def __init__(self) -> None:
        super().__init__()
        self.pool = make_pool(NUM_DEVICE, self.num_dram)
        self.num_blocks = {DEVICE: NUM_DEVICE, DRAM: self.num_dram or 0}
        self.cached: dict[Prefix, BlockRef] = {}
        self.private: dict[BlockRef, list[float]] = {}  # blocks held outside the tree -> content
        self.holders: list[Holder] = []
        self.reqs: list[Req] = []
        self.next_uid = 0

    # -- the model's view --------------------------------------------------------------------

    def locked_keys(self, extra: Prefix = ()) -> set[Prefix]:
        pinned = [r.locked for r in self.reqs] + [extra]
        return {p[:i] for p in pinned for i in range(BS, len(p) + 1, BS)}

    def free(self, tier: Tier) -> int:
        used = [r for r in [*self.cached.values(), *self.private] if r.tier is tier]
        return self.num_blocks[tier] - len(used)

    def historical(self, tier: Tier, locked: set[Prefix]) -> int:
        return sum(r.tier is tier and k not in locked for k, r in self.cached.items())

    def available(self, tier: Tier, locked: set[Prefix]) -> int:
        return self.free(tier) + self.historical(tier, locked)

    def held_refs(self) -> Counter[BlockRef]:
        refs: Counter[BlockRef] = Counter()
        for h in self.holders:
            refs.update(BlockRef(h.tier, b) for b in h.block_ids)
        for r in self.reqs:
            refs.update(D(b) for b in r.table)
        return refs

    def hold_private(self, tier: Tier, block_ids: list[int], rows: list[list[float]]) -> None:
        for b in block_ids:  # never handed out twice while held
            ref = BlockRef(tier, b)
            assert ref not in self.private and ref not in self.cached.values(), f"{ref} reused"
            assert self.pool.allocators[tier].refcount(b) == 1
        assert len(set(block_ids)) == len(block_ids)
        write(self.pool, block_ids, rows, tier)
        self.private.update(
            {BlockRef(tier, b): row for b, row in zip(block_ids, rows, strict=True)}
        )

    def new_private_rows(self, num_blocks: int) -> list[list[float]]:
        self.next_uid += num_blocks
        return [private_tag(u) for u in range(self.next_uid - num_blocks, self.next_uid)]

    # -- transitions ---------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return Snapshot(
            dict(self.cached), dataclasses.replace(self.pool.counters), tree_state(self.pool)
        )

    def unchanged(self, before: Snapshot) -> None:
        assert tree_state(self.pool) == before.tree
        assert self.pool.counters == before.counters

    def refused(self, before: Snapshot, call: Callable[[], object]) -> None:
        """``call`` raises ``NoFreeBlocksError`` and changes nothing."""
        with pytest.raises(NoFreeBlocksError):
            call()
        self.unchanged(before)

    def observe(
        self,
        before: Snapshot,
        locked: set[Prefix],
        swapped_in: Collection[Prefix] = (),
        added: Collection[Prefix] = (),
        deleted: Collection[Prefix] = (),
    ) -> PoolCounters:
        """Check that the tree went from ``before`` to now legally; adopt it. Returns the deltas."""
        after = cached_blocks(self.pool)
        c0, c1 = before.counters, self.pool.counters
        d = PoolCounters(
            *(getattr(c1, f.name) - getattr(c0, f.name) for f in dataclasses.fields(c1))
        )
        moved_in = 0
        for key, ref in before.cached.items():
            new = after.get(key)
            if new is None or new.tier is ref.tier:
                assert new in (None, ref), f"{key} moved within a tier"
                assert new == ref or key not in locked, f"locked {key} dropped"
            elif ref.tier is DEVICE:
                assert key not in locked, f"locked {key} swapped out"
            else:
                assert key in swapped_in, f"{key} swapped in unasked"
                moved_in += 1
        appeared = after.keys() - before.cached.keys()
        assert appeared <= set(added)
        dropped = before.cached.keys() - after.keys()
        assert set(deleted) <= dropped
        assert len(dropped) - len(deleted) == d.evicted_device_blocks + d.evicted_dram_blocks

        def num(blocks: dict[Prefix, BlockRef], tier: Tier, keys: Collection[Prefix]) -> int:
            return sum(blocks[k].tier is tier for k in keys)

        b, a, all_b = before.cached, after, before.cached.keys()
        assert num(a, DEVICE, a.keys()) - num(b, DEVICE, all_b) == (
            -d.swap_out_blocks + moved_in + len(appeared) - d.evicted_device_blocks
        ) - num(b, DEVICE, deleted)
        assert num(a, DRAM, a.keys()) - num(b, DRAM, all_b) == (
            d.swap_out_blocks - moved_in - d.evicted_dram_blocks
        ) - num(b, DRAM, deleted)
        self.cached = after
        return d

    def alloc_device(self, num_blocks: int, locked: set[Prefix]) -> list[int] | None:
        """``alloc_mem`` on device with the model's prediction of what it reclaims."""
        before = self.snapshot()
        available = self.available(DEVICE, locked)
        if num_blocks > available:
            self.refused(before, lambda: self.pool.alloc_mem(num_blocks))
            return None
        free, dram_free = self.free(DEVICE), self.free(DRAM)
        dram_room = dram_free + self.historical(DRAM, locked)
        block_ids = self.pool.alloc_mem(num_blocks)
        assert len(block_ids) == num_blocks
        d = self.observe(before, locked)
        need = max(0, num_blocks - free)
        assert d.swap_in_blocks == 0
        assert d.swap_out_blocks + d.evicted_device_blocks == need
        if not self.pool.has_dram:
            assert d.swap_out_blocks == d.evicted_dram_blocks == 0
        elif dram_room >= need:  # DRAM can take them all: nothing is dropped from device
            assert d.evicted_device_blocks == 0
            assert d.evicted_dram_blocks == max(0, need - dram_free)
        return block_ids

    # -- memory rules --------------------------------------------------------------------------

    @rule(num_blocks=st.integers(0, 9))
    def alloc(self, num_blocks: int) -> None:
        block_ids = self.alloc_device(num_blocks, self.locked_keys())
        if block_ids:
            self.hold_private(DEVICE, block_ids, self.new_private_rows(len(block_ids)))
            self.holders.append(Holder(DEVICE, block_ids))

    @precondition(lambda self: self.historical(DEVICE, self.locked_keys()) > 0)
    @rule(data=st.data())
    def pressure(self, data: st.DataObject) -> None:
        locked = self.locked_keys()
        extra = data.draw(st.integers(1, self.historical(DEVICE, locked)))
        block_ids = self.alloc_device(self.free(DEVICE) + extra, locked)
        assert block_ids is not None
        self.hold_private(DEVICE, block_ids, self.new_private_rows(len(block_ids)))
        self.holders.append(Holder(DEVICE, block_ids))

    @precondition(lambda self: self.pool.has_dram)
    @rule(num_blocks=st.integers(0, 7))
    def alloc_dram(self, num_blocks: int) -> None:
        before = self.snapshot()
        locked = self.locked_keys()
        if num_blocks > self.available(DRAM, locked):
            self.refused(before, lambda: self.pool.alloc_mem(num_blocks, DRAM))
            return
        dram_free = self.free(DRAM)
        block_ids = self.pool.alloc_mem(num_blocks, DRAM)
        d = self.observe(before, locked)
        assert (d.swap_out_blocks, d.swap_in_blocks, d.evicted_device_blocks) == (0, 0, 0)
        assert d.evicted_dram_blocks == max(0, num_blocks - dram_free)
        if block_ids:
            self.hold_private(DRAM, block_ids, self.new_private_rows(len(block_ids)))
            self.holders.append(Holder(DRAM, block_ids))

    @precondition(lambda self: bool(self.holders))
    @rule(data=st.data())
    def free_holder(self, data: st.DataObject) -> None:
        holder = self.holders.pop(data.draw(st.integers(0, len(self.holders) - 1)))
        before = self.snapshot()
        self.pool.free_mem(holder.block_ids, holder.tier)
        self.unchanged(before)
        for b in holder.block_ids:
            del self.private[BlockRef(holder.tier, b)]

    @rule(num_blocks=st.integers(0, 6))
    def swap_out(self, num_blocks: int) -> None:
        before = self.snapshot()
        locked = self.locked_keys()
        expected = 0
        if self.pool.has_dram:
            expected = min(num_blocks, self.free(DRAM), self.historical(DEVICE, locked))
        assert self.pool.swap_out(num_blocks) == expected
        d = self.observe(before, locked)
        assert dataclasses.astuple(d) == (expected, 0, 0, 0)

    # -- index rules ---------------------------------------------------------------------------

    @rule(prompt=prompts)
    def delete(self, prompt: list[int]) -> None:
        toks = tuple(prompt[: len(prompt) // BS * BS])
        before = self.snapshot()
        locked = self.locked_keys()
        if not toks or toks in locked:
            with pytest.raises(ValueError):
                self.pool.delete(prompt)
            self.unchanged(before)
            return
        doomed = [k for k in self.cached if k[: len(toks)] == toks] if toks in self.cached else []
        assert self.pool.delete(prompt) == len(doomed)
        d = self.observe(before, locked, deleted=doomed)
        assert self.cached.keys() == before.cached.keys() - set(doomed)
        assert dataclasses.astuple(d) == (0, 0, 0, 0)

    @rule(prompt=prompts, use_cache=st.booleans(), finish=st.booleans())
    def admit(self, prompt: list[int], use_cache: bool, finish: bool) -> None:
        """Start a request (``finish``: run it to the end in this step). Without ``use_cache`` it
        computes its whole prompt, like a recompute or a peer's ``transfer_with_insert``."""
        req = self.start_req(tuple(prompt), use_cache)
        if req is not None and finish:
            self.publish_req(req)
            self.release_req(req)

    def start_req(self, toks: Prefix, use_cache: bool) -> Req | None:
        """``KVCacheManager.admit``: match, lock, swap in, share the hit, allocate the rest and
        compute (write) it. None, holding nothing, where there is no room."""
        whole = toks[: len(toks) // BS * BS]
        hit = self.pool.match(toks) if use_cache else None
        node = self.pool.tree.root if hit is None else hit.node
        num_hit = 0 if hit is None else hit.num_tokens
        keys = [whole[:i] for i in range(BS, num_hit + 1, BS)]
        if hit is not None:
            assert num_hit == len(whole) or whole[: num_hit + BS] not in self.cached
            assert list(hit.blocks) == [self.cached[k] for k in keys]
        self.pool.lock(node)
        locked = self.locked_keys(whole[:num_hit])
        if not self.swap_in_hit(node, keys, locked):
            self.pool.unlock(node)
            return None
        cached_ids = [self.cached[k].block_id for k in keys]
        assert read(self.pool, cached_ids, DEVICE) == [tag(k) for k in keys]  # nothing lost
        self.pool.share_mem(cached_ids)
        req = Req(toks, node, whole[:num_hit], cached_ids, len(keys))
        self.reqs.append(req)
        num_new = -(-len(toks) // BS) - len(keys)
        new = self.alloc_device(num_new, locked)
        if new is None:
            self.release_req(req)
            return None
        req.table.extend(new)
        rows = [
            tag(toks[: (i + 1) * BS]) if (i + 1) * BS <= len(toks) else self.new_private_rows(1)[0]
            for i in range(len(keys), len(keys) + num_new)
        ]
        self.hold_private(DEVICE, new, rows)
        return req

    def swap_in_hit(self, node: NodeHandle, keys: list[Prefix], locked: set[Prefix]) -> bool:
        """``swap_in`` of a locked hit; afterwards every block of it is on device."""
        in_dram = [k for k in keys if self.cached[k].tier is DRAM]
        before = self.snapshot()
        if len(in_dram) > self.available(DEVICE, locked):
            self.refused(before, lambda: self.pool.swap_in(node))
            return False
        free, dram_free = self.free(DEVICE), self.free(DRAM)
        dram_room = dram_free + self.historical(DRAM, locked)
        assert self.pool.swap_in(node) == len(in_dram)
        d = self.observe(before, locked, swapped_in=in_dram)
        need = max(0, len(in_dram) - free)
        assert d.swap_in_blocks == len(in_dram)
        assert d.swap_out_blocks + d.evicted_device_blocks == need
        if dram_room >= need:  # the hit's own DRAM blocks are locked, hence not in dram_room
            assert d.evicted_device_blocks == 0
        assert all(self.cached[k].tier is DEVICE for k in keys)
        return True

    @precondition(lambda self: bool(self.reqs))
    @rule(data=st.data())
    def publish(self, data: st.DataObject) -> None:
        self.publish_req(self.reqs[data.draw(st.integers(0, len(self.reqs) - 1))])

    @precondition(lambda self: bool(self.reqs))
    @rule(data=st.data(), publish_first=st.booleans())
    def release(self, data: st.DataObject, publish_first: bool) -> None:
        req = self.reqs[data.draw(st.integers(0, len(self.reqs) - 1))]
        if publish_first:
            self.publish_req(req)
        self.release_req(req)

    def publish_req(self, req: Req) -> None:
        """``KVCacheManager.publish``: insert, then adopt the canonical blocks."""
        num_full = len(req.tokens) // BS
        if num_full <= req.num_tree_blocks:
            return
        whole = req.tokens[: num_full * BS]
        keys = [whole[:i] for i in range(BS, len(whole) + 1, BS)]
        table = req.table
        before = self.snapshot()
        hit = self.pool.insert(whole, table[:num_full])
        canonical = [
            old if (old := before.cached.get(k)) is not None and old.tier is DEVICE else D(b)
            for k, b in zip(keys, table, strict=False)
        ]
        assert (hit.num_tokens, list(hit.blocks)) == (len(whole), canonical)
        in_dram = [k for k in keys if k in before.cached and before.cached[k].tier is DRAM]
        added = [k for k in keys if k not in before.cached]
        locked = self.locked_keys()
        d = self.observe(before, locked, swapped_in=in_dram, added=added)
        assert dataclasses.astuple(d) == (0, 0, 0, 0)  # promoting a DRAM prefix is no swap-in
        assert [self.cached[k] for k in keys] == canonical
        for b in table[req.num_tree_blocks : num_full]:
            del self.private[D(b)]  # now the tree's, or freed just below
        for i, ref in enumerate(hit.blocks):
            if ref.block_id != table[i]:  # computed twice: keep the cached copy, free ours
                self.pool.share_mem((ref.block_id,))
                self.pool.free_mem((table[i],))
                table[i] = ref.block_id
        self.pool.lock(hit.node)
        self.pool.unlock(req.node)
        req.node, req.locked, req.num_tree_blocks = hit.node, whole, num_full

    def release_req(self, req: Req) -> None:
        before = self.snapshot()
        self.pool.free_mem(req.table)
        self.pool.unlock(req.node)
        for b in req.table[req.num_tree_blocks :]:
            del self.private[D(b)]
        self.reqs.remove(req)
        assert cached_blocks(self.pool) == before.cached
        assert self.pool.counters == before.counters

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def pool_agrees_with_model(self) -> None:
        pool = self.pool
        assert cached_blocks(pool) == self.cached
        refs = self.held_refs()
        if not any(h.tier is DRAM for h in self.holders):
            pool.check_integrity(held=[r.block_id for r in refs.elements() if r.tier is DEVICE])
        pool.tree.check_integrity()
        tree_refs = set(self.cached.values())
        assert not tree_refs & self.private.keys()
        locked = self.locked_keys()
        for tier, allocator in pool.allocators.items():
            for b in range(allocator.num_blocks):
                ref = BlockRef(tier, b)
                assert allocator.refcount(b) == (ref in tree_refs) + refs[ref], f"{ref} refcount"
            assert pool.num_free(tier) == self.free(tier)
            assert pool.num_historical(tier) == self.historical(tier, locked)
            assert pool.num_available(tier) == self.available(tier, locked)
            assert pool.tree.num_locked_blocks(tier) == len(
                [k for k in locked if self.cached[k].tier is tier]
            )

    @invariant()
    def locked_blocks_stay_put(self) -> None:
        for req in self.reqs:
            keys = [req.tokens[:i] for i in range(BS, (req.num_tree_blocks + 1) * BS, BS)]
            assert [self.cached[k] for k in keys] == [D(b) for b in req.table[: len(keys)]]
            assert req.locked == req.tokens[: len(keys) * BS]

    @invariant()
    def every_block_keeps_its_content(self) -> None:
        check_data(self.pool)
        for tier in self.pool.allocators:
            mine = {r.block_id: row for r, row in self.private.items() if r.tier is tier}
            if mine:
                assert read(self.pool, list(mine), tier) == list(mine.values())


class MemPoolWithoutDramMachine(MemPoolMachine):
    num_dram = None


MemPoolMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=40, deadline=None)
TestMemPoolMachine = MemPoolMachine.TestCase
MemPoolWithoutDramMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=40, deadline=None
)
TestMemPoolWithoutDramMachine = MemPoolWithoutDramMachine.TestCase

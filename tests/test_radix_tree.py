"""``RadixTree``: exact blocks and eviction order on tiny trees, locks, tiers, and a stateful model check."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from memserve.tree import BlockRef, Node, RadixTree, Tier

DEVICE, DRAM = Tier.DEVICE, Tier.DRAM


def dev(*block_ids: int) -> list[BlockRef]:
    return [BlockRef(DEVICE, b) for b in block_ids]


def dram(*block_ids: int) -> list[BlockRef]:
    return [BlockRef(DRAM, b) for b in block_ids]


def path_tokens(node: Node) -> list[int]:
    """Token ids root..node, read through the handles' read-only fields."""
    edges: list[tuple[int, ...]] = []
    n: Node | None = node
    while n is not None:
        edges.append(n.token_ids)
        n = n.parent
    return [t for edge in reversed(edges) for t in edge]


def test_match_on_empty_tree() -> None:
    tree = RadixTree(block_size=2)
    m = tree.match([1, 2, 3, 4])
    assert (m.num_tokens, m.blocks, m.node) == (0, (), tree.root)
    assert tree.num_blocks() == 0
    tree.check_integrity()


def test_insert_then_match_exact_longer_shorter_diverging() -> None:
    tree = RadixTree(block_size=2)
    assert tree.insert([1, 2, 3, 4, 5, 6], dev(10, 11, 12)) == []
    assert tree.match([1, 2, 3, 4, 5, 6]).blocks == tuple(dev(10, 11, 12))
    longer = tree.match([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert (longer.num_tokens, longer.blocks) == (6, tuple(dev(10, 11, 12)))
    shorter = tree.match([1, 2, 3, 4])
    assert (shorter.num_tokens, shorter.blocks) == (4, tuple(dev(10, 11)))
    diverging = tree.match([1, 2, 3, 9, 5, 6])
    assert (diverging.num_tokens, diverging.blocks) == (2, tuple(dev(10)))
    assert tree.match([1, 2, 3]).num_tokens == 2  # partial last block ignored
    assert tree.match([2, 1]).num_tokens == 0
    # Each match covers exactly its blocks with its node: the edge was split at 1 and 2 blocks.
    assert path_tokens(shorter.node) == [1, 2, 3, 4]
    assert [len(n.blocks) for n in (diverging.node, shorter.node, longer.node)] == [1, 1, 1]
    assert tree.num_blocks() == 3
    tree.check_integrity()


def test_insert_ignores_a_partial_last_block_and_checks_the_block_count() -> None:
    tree = RadixTree(block_size=2)
    assert tree.insert([1, 2, 3], dev(0)) == []
    assert tree.match([1, 2, 3, 4]).blocks == tuple(dev(0))
    with pytest.raises(ValueError, match="2 whole blocks of tokens but 1 blocks"):
        tree.insert([5, 6, 7, 8], dev(1))
    assert tree.num_blocks() == 1
    tree.check_integrity()


def test_divergence_inside_a_compressed_edge_splits_at_the_block_boundary() -> None:
    tree = RadixTree(block_size=2)
    tree.insert([1, 2, 3, 4, 5, 6, 7, 8], dev(0, 1, 2, 3))
    assert tree.insert([1, 2, 3, 4, 9, 9], dev(10, 11, 12)) == dev(10, 11)
    [head] = tree.root.children.values()
    assert (head.token_ids, head.blocks) == ((1, 2, 3, 4), tuple(dev(0, 1)))
    assert {k: c.blocks for k, c in head.children.items()} == {
        (5, 6): tuple(dev(2, 3)),
        (9, 9): tuple(dev(12)),
    }
    assert tree.match([1, 2, 3, 4, 9, 9]).blocks == tuple(dev(0, 1, 12))
    assert tree.match([1, 2, 3, 4, 5, 6, 7, 8]).blocks == tuple(dev(0, 1, 2, 3))
    # Diverging inside the first block of an edge is a sibling, not a split.
    assert tree.insert([1, 7, 3, 4], dev(20, 21)) == []
    assert sorted(tree.root.children) == [(1, 2), (1, 7)]
    assert tree.num_blocks() == 7
    tree.check_integrity()


def test_insert_returns_exactly_the_duplicates() -> None:
    tree = RadixTree(block_size=2)
    tree.insert([1, 2, 3, 4], dev(0, 1))
    assert tree.insert([1, 2, 3, 4, 5, 6], dev(7, 8, 9)) == dev(
        7, 8
    )  # fresh copies of cached blocks
    m = tree.match([1, 2, 3, 4, 5, 6, 7, 8])
    # The cached blocks themselves (from match, or equal refs) are neither stored twice nor returned.
    assert tree.insert([1, 2, 3, 4, 5, 6, 7, 8], [*m.blocks, *dev(3)]) == []
    assert tree.insert([1, 2, 3, 4], dev(0, 5)) == dev(5)
    assert tree.match([1, 2, 3, 4, 5, 6, 7, 8]).blocks == tuple(dev(0, 1, 9, 3))
    assert tree.num_blocks() == 4
    tree.check_integrity()


def test_locked_blocks_are_never_evicted_and_unlock_below_zero_raises() -> None:
    tree = RadixTree(block_size=1)
    tree.insert([1, 2, 3], dev(0, 1, 2))
    tree.insert([1, 2, 9], dev(5, 6, 7))
    m = tree.match([1, 2, 3])
    tree.lock(m.node)
    tree.lock(m.node)
    assert tree.num_locked_blocks() == 3
    assert tree.evict(10) == dev(7)  # only the unlocked branch
    assert tree.evictable_leaves() == []
    tree.unlock(m.node)
    assert tree.evict(10) == []
    tree.unlock(m.node)
    with pytest.raises(ValueError, match="not locked"):
        tree.unlock(m.node)
    assert tree.num_locked_blocks() == 0
    tree.check_integrity()
    assert tree.evict(10) == dev(2, 1, 0)
    with pytest.raises(ValueError, match="no longer in the tree"):
        tree.lock(m.node)
    tree.check_integrity()


def test_a_split_inside_a_locked_edge_keeps_both_parts_locked() -> None:
    tree = RadixTree(block_size=2)
    tree.insert([1, 2, 3, 4, 5, 6], dev(0, 1, 2))
    m = tree.match([1, 2, 3, 4, 5, 6])
    tree.lock(m.node)
    assert tree.insert([1, 2, 3, 4, 9, 9], dev(7, 8, 9)) == dev(7, 8)  # splits after 2 blocks
    assert path_tokens(m.node) == [1, 2, 3, 4, 5, 6]
    assert tree.num_locked_blocks() == 3
    assert tree.evict(10) == dev(9)
    tree.check_integrity()
    tree.unlock(m.node)
    assert tree.num_locked_blocks() == 0
    assert tree.evict(10) == dev(2, 1, 0)
    tree.check_integrity()


def test_delete_of_a_locked_prefix_raises_and_changes_nothing() -> None:
    tree = RadixTree(block_size=2)
    tree.insert([1, 2, 3, 4, 5, 6], dev(0, 1, 2))
    m = tree.match([1, 2, 3, 4, 5, 6])
    tree.lock(m.node)
    with pytest.raises(ValueError, match="locked"):
        tree.delete([1, 2, 3, 4])
    assert len(tree.root.children[(1, 2)].blocks) == 3  # not even split
    tree.unlock(m.node)
    assert tree.delete([1, 2, 3, 4]) == dev(1, 2)  # the prefix's last block and everything below
    assert tree.match([1, 2, 3, 4, 5, 6]).blocks == tuple(dev(0))
    tree.check_integrity()


def test_delete_removes_all_extensions_and_ignores_uncached_prefixes() -> None:
    tree = RadixTree(block_size=1)
    tree.insert([1, 2, 3], dev(0, 1, 2))
    tree.insert([1, 2, 4, 5], dev(0, 1, 3, 4))
    tree.insert([1, 6], dev(0, 5))
    assert tree.delete([1, 2, 7]) == []
    assert tree.delete([8]) == []
    with pytest.raises(ValueError, match="empty prefix"):
        tree.delete([])
    assert sorted(tree.delete([1, 2]), key=lambda b: b.block_id) == dev(1, 2, 3, 4)
    assert tree.num_blocks() == 2
    assert tree.match([1, 2, 3]).blocks == tuple(dev(0))
    tree.check_integrity()


def lru_tree() -> tuple[RadixTree, Node, Node, Node]:
    """A=[1 1|2 2] at t1, B=[1 1|3 3|4 4] at t2 (shares A's first block), C=[5 5] at t3, A matched at t4."""
    tree = RadixTree(block_size=2)
    tree.insert([1, 1, 2, 2], dev(0, 1))
    assert tree.insert([1, 1, 3, 3, 4, 4], dev(9, 3, 4)) == dev(9)
    tree.insert([5, 5], dev(5))
    leaf_a = tree.match([1, 1, 2, 2]).node
    leaf_b = tree.match([1, 1, 3, 3, 4, 4]).node
    leaf_c = tree.match([5, 5]).node
    tree.match([1, 1, 2, 2])  # order B, C, A again
    return tree, leaf_a, leaf_b, leaf_c


def test_eviction_order_is_lru_leaves_first_and_tails_first() -> None:
    tree, leaf_a, leaf_b, leaf_c = lru_tree()
    assert tree.evictable_leaves() == [leaf_b, leaf_c, leaf_a]
    assert tree.evict(1) == dev(4)  # tail of the oldest leaf first
    assert tree.evict(2) == dev(3, 5)
    assert tree.evictable_leaves() == [leaf_a]
    # A's leaf goes, then its parent [1 1] is the last leaf.
    assert tree.evict(5) == dev(1, 0)
    assert (tree.num_blocks(), tree.evict(1)) == (0, [])
    tree.check_integrity()


def test_eviction_tier_filter_and_tail_blocks_shield_their_prefix() -> None:
    tree, leaf_a, leaf_b, leaf_c = lru_tree()
    tree.set_tier(leaf_c, dram(5))
    tree.set_tier(leaf_b, [*dev(3), *dram(4)])
    assert (tree.num_blocks(DEVICE), tree.num_blocks(DRAM)) == (3, 2)
    assert tree.evict(10, DRAM) == dram(4, 5)  # B's tail, then C
    assert tree.evict(1, DEVICE) == dev(3)
    tree.set_tier(leaf_a, dram(1))
    assert tree.evict(10, DEVICE) == []  # [1 1] is not a leaf: A's DRAM block below shields it
    assert tree.evict(10) == [*dram(1), *dev(0)]
    tree.check_integrity()


def test_set_tier_replaces_refs_and_counts_per_tier() -> None:
    tree = RadixTree(block_size=2)
    tree.insert([1, 2, 3, 4], dev(0, 1))
    tree.insert([7, 7], dev(2))
    node = tree.match([1, 2, 3, 4]).node
    tree.set_tier(node, dram(0, 1))
    assert (tree.num_blocks(), tree.num_blocks(DEVICE), tree.num_blocks(DRAM)) == (3, 1, 2)
    assert tree.match([1, 2, 3, 4]).blocks == tuple(dram(0, 1))
    with pytest.raises(ValueError, match="node has 2 blocks, got 1 refs"):
        tree.set_tier(node, dev(0))
    tree.check_integrity()


def test_check_integrity_catches_corruption() -> None:
    tree = RadixTree(block_size=2)
    tree.insert([1, 2, 3, 4], dev(0, 1))
    tree.insert([5, 6], dev(2))
    node = tree.root.children[(5, 6)]
    node.blocks = tuple(dev(0))
    with pytest.raises(AssertionError, match="held twice"):
        tree.check_integrity()
    node.blocks = tuple(dev(2))
    node.lock_ref = 1
    with pytest.raises(AssertionError, match="children hold more locks"):
        tree.check_integrity()
    node.lock_ref = 0
    node.token_ids = (5, 6, 7)
    with pytest.raises(AssertionError, match="3 tokens, 1 blocks"):
        tree.check_integrity()


def test_a_100k_token_prompt_on_a_deep_path_needs_no_recursion() -> None:
    bs, num_blocks, depth = 16, 100_000 // 16, 1500
    tree = RadixTree(bs)
    prompt, blocks = list(range(100_000)), dev(*range(num_blocks))
    assert tree.insert(prompt, blocks) == []
    # A branch at each of the first `depth` block boundaries: the prompt's path is depth + 1 nodes,
    # deeper than the default recursion limit.
    for k in range(depth, 0, -1):
        branch = [*prompt[: k * bs], *[-1] * bs]
        assert tree.insert(branch, [*blocks[:k], BlockRef(DRAM, k)]) == []
    m = tree.match(prompt)
    assert (m.num_tokens, m.blocks) == (100_000, tuple(blocks))
    assert len(list(path_tokens(m.node))) == 100_000
    tree.lock(m.node)
    assert tree.num_locked_blocks() == num_blocks
    tree.check_integrity()
    tree.unlock(m.node)
    assert len(tree.evict(10**6)) == num_blocks + depth
    tree.check_integrity()


def test_reclaim_takes_the_coldest_without_walking_the_tree(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``evict`` and ``select_swap_out`` find their candidates in the LRU heaps: with the tree walk
    disabled they still take exactly the coldest prompts, in order."""
    tree = RadixTree(block_size=2)
    for i in range(300):  # prompt i: [i i | i i], blocks 2i, 2i + 1; older = smaller i
        tree.insert([i] * 4, dev(2 * i, 2 * i + 1))
    tree.match([5] * 4)  # prompt 5 is now the most recent
    monkeypatch.setattr(tree, "_nodes", lambda: pytest.fail("walked the tree"))
    picked = tree.select_swap_out(3)  # prompt 0 whole, then prompt 1's tail
    assert [n.blocks for n in picked] == [tuple(dev(0, 1)), tuple(dev(3))]
    for node in picked:
        tree.set_tier(node, [BlockRef(DRAM, b.block_id) for b in node.blocks])
    # Prompt 1's head is shielded by its DRAM tail: prompts 2 and 3 go, each tail first.
    assert tree.evict(4, DEVICE) == dev(5, 4, 7, 6)
    assert tree.evict(3, DRAM) == dram(1, 0, 3)  # prompt 0, then prompt 1's tail ...
    assert tree.evict(1) == dev(2)  # ... which exposed its head, the oldest leaf now
    monkeypatch.undo()
    assert [path_tokens(n)[0] for n in tree.evictable_leaves()][:2] == [4, 6]  # 5 stays warmest
    assert path_tokens(tree.evictable_leaves()[-1]) == [5] * 4
    tree.check_integrity()


def test_lru_heaps_stay_bounded_under_repeated_matches() -> None:
    """Every match refiles the nodes it stamps; compaction keeps the heaps O(live candidates)."""
    tree = RadixTree(block_size=2)
    for i in range(50):
        tree.insert([i, i, 1000 + i, 1000 + i], dev(2 * i, 2 * i + 1))
    for k in range(20_000):
        tree.match([k % 50] * 2)
    sizes = [len(h) for h in tree._leaf_heaps.values()] + [len(tree._swap_heap)]
    assert max(sizes) <= 2 * 256 + 1  # MIN_COMPACT_SIZE, doubled at most before compaction
    assert len(tree.evict(10**6)) == 100
    tree.check_integrity()


# -- stateful model check ------------------------------------------------------------------------

BS = 2
prompts = st.lists(st.integers(0, 2), max_size=12)  # up to 6 blocks over a 3-token alphabet
tiers = st.sampled_from(Tier)


class RadixTreeMachine(RuleBasedStateMachine):
    """The reference model: every cached prefix (whole blocks) -> the block of its last block."""

    def __init__(self) -> None:
        super().__init__()
        self.tree = RadixTree(BS)
        self.model: dict[tuple[int, ...], BlockRef] = {}
        self.live: set[BlockRef] = set()  # handed to the tree, not handed back
        self.locks: list[tuple[Node, tuple[int, ...]]] = []  # handle, the prefix it pins
        self.next_block_id = 0

    def fresh(self, num_blocks: int, tier: Tier) -> list[BlockRef]:
        self.next_block_id += num_blocks
        return [
            BlockRef(tier, b) for b in range(self.next_block_id - num_blocks, self.next_block_id)
        ]

    def checked_match(self, prompt: list[int]) -> tuple[Node, tuple[int, ...]]:
        toks = tuple(prompt[: len(prompt) // BS * BS])
        n = 0
        while n < len(toks) and toks[: n + BS] in self.model:
            n += BS
        m = self.tree.match(prompt)
        assert m.num_tokens == n
        assert list(m.blocks) == [self.model[toks[:i]] for i in range(BS, n + 1, BS)]
        assert path_tokens(m.node) == list(toks[:n])
        return m.node, toks[:n]

    def hand_back(self, refs: list[BlockRef]) -> None:
        for ref in refs:
            assert ref in self.live, f"{ref} handed back but not held"
            self.live.remove(ref)

    def locked_keys(self) -> set[tuple[int, ...]]:
        return {p[:i] for _, p in self.locks for i in range(BS, len(p) + 1, BS)}

    @rule(prompt=prompts, tier=tiers)
    def insert_fresh(self, prompt: list[int], tier: Tier) -> None:
        toks = tuple(prompt[: len(prompt) // BS * BS])
        blocks = self.fresh(len(toks) // BS, tier)
        keys = [toks[: (i + 1) * BS] for i in range(len(blocks))]
        expected = [b for key, b in zip(keys, blocks, strict=True) if key in self.model]
        assert self.tree.insert(prompt, blocks) == expected
        for key, b in zip(keys, blocks, strict=True):
            if key not in self.model:
                self.model[key] = b
                self.live.add(b)

    @rule(prompt=prompts, tier=tiers)
    def insert_after_match(self, prompt: list[int], tier: Tier) -> None:
        _, matched = self.checked_match(prompt)
        toks = tuple(prompt[: len(prompt) // BS * BS])
        new = self.fresh((len(toks) - len(matched)) // BS, tier)
        blocks = [self.model[toks[:i]] for i in range(BS, len(matched) + 1, BS)] + new
        assert self.tree.insert(prompt, blocks) == []
        for i, b in enumerate(new):
            self.model[toks[: len(matched) + (i + 1) * BS]] = b
            self.live.add(b)

    @rule(prompt=prompts)
    def match(self, prompt: list[int]) -> None:
        self.checked_match(prompt)

    @rule(prompt=prompts)
    def lock(self, prompt: list[int]) -> None:
        node, matched = self.checked_match(prompt)
        self.tree.lock(node)
        self.locks.append((node, matched))

    @precondition(lambda self: bool(self.locks))
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        node, _ = self.locks.pop(data.draw(st.integers(0, len(self.locks) - 1)))
        self.tree.unlock(node)

    @rule()
    def unlock_of_an_unlocked_root_raises(self) -> None:
        if not self.locks:
            with pytest.raises(ValueError, match="not locked"):
                self.tree.unlock(self.tree.root)

    @rule(num_blocks=st.integers(0, 8), tier=st.none() | tiers)
    def evict(self, num_blocks: int, tier: Tier | None) -> None:
        removed = self.tree.evict(num_blocks, tier)
        assert len(removed) <= num_blocks
        assert tier is None or all(ref.tier is tier for ref in removed)
        self.hand_back(removed)
        key_of = {b: key for key, b in self.model.items()}
        locked = self.locked_keys()
        for ref in removed:
            assert key_of[ref] not in locked
            del self.model[key_of[ref]]
        if len(removed) < num_blocks:  # nothing of the tier is left at an unlocked leaf's tail
            assert all(
                tier is not None and n.blocks[-1].tier is not tier
                for n in self.tree.evictable_leaves()
            )

    @rule(prompt=prompts)
    def delete(self, prompt: list[int]) -> None:
        toks = tuple(prompt[: len(prompt) // BS * BS])
        if not toks or toks in self.locked_keys():
            with pytest.raises(ValueError):
                self.tree.delete(prompt)
            return
        doomed = [key for key in self.model if key[: len(toks)] == toks]
        removed = self.tree.delete(prompt)
        assert sorted(removed, key=lambda b: b.block_id) == sorted(
            (self.model[key] for key in doomed), key=lambda b: b.block_id
        )
        self.hand_back(removed)
        for key in doomed:
            del self.model[key]

    @rule(prompt=prompts)
    def set_tier(self, prompt: list[int]) -> None:
        node, matched = self.checked_match(prompt)
        if node is self.tree.root:
            return
        old = list(node.blocks)
        new = [self.fresh(1, DRAM if ref.tier is DEVICE else DEVICE)[0] for ref in old]
        self.tree.set_tier(node, new)
        self.hand_back(old)
        self.live.update(new)
        first = len(matched) - len(old) * BS
        for i, b in enumerate(new):
            self.model[matched[: first + (i + 1) * BS]] = b

    @invariant()
    def tree_agrees_with_model(self) -> None:
        self.tree.check_integrity()
        assert set(self.model.values()) == self.live and len(self.model) == len(self.live)
        assert all(key[:-BS] in self.model for key in self.model if len(key) > BS)
        assert self.tree.num_blocks() == len(self.live)
        assert self.tree.num_blocks(DRAM) == sum(ref.tier is DRAM for ref in self.live)
        assert self.tree.num_locked_blocks() == len(self.locked_keys())
        assert all(path_tokens(node) == list(prefix) for node, prefix in self.locks)


RadixTreeMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestRadixTreeMachine = RadixTreeMachine.TestCase

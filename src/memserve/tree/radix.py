"""Radix prompt tree: the MemPool index from token-id prefixes to cached KV blocks, in plain ints.

Keys are token ids cut to whole blocks of ``block_size`` tokens (a partial last block is ignored).
A node's edge is a run of whole blocks: ``token_ids`` and one ``BlockRef`` per block. Children are
keyed by the token tuple of their first block, so siblings never share a first block; an edge is
split at a block boundary when a prompt diverges inside it.

Contract (single-threaded; the owner of the tree serialises all calls):

- Ownership of blocks: ``insert`` hands the blocks it keeps to the tree and returns the caller's
  blocks it did not take (that part of the prefix was already cached under other blocks) for the
  caller to free. A block the caller passes that *is* the cached one (e.g. from an earlier
  ``match``) is neither taken again nor returned. ``evict`` and ``delete`` return every block they
  remove; the caller frees them. The tree never allocates or frees memory itself. Precondition: a
  new block handed to ``insert`` / ``set_tier`` is held nowhere else in the tree (not re-checked
  per call; ``check_integrity`` catches it).
- Locks: a running request calls ``lock(match.node)`` right after its ``match`` (before anything
  else mutates the tree) and ``unlock`` once when done. A lock pins every node root..node, so
  ``lock_ref`` of a node = locks ending at it + the sum of its children's ``lock_ref``. Locked
  blocks are never evicted or deleted (``delete`` raises ``ValueError`` instead).
- LRU: a counter ticks once per ``match`` / ``insert`` and stamps every node on the walked path, so
  a parent is never older than its children. ``evict`` takes the oldest unlocked leaf first and
  shortens it from its tail (the prefix part stays useful); ties break by node creation order.
  Candidates are kept in lazy heaps (``LazyHeap``), refiled whenever a node is stamped, unlocked,
  split, retiered or loses a child, so ``evict`` and ``select_swap_out`` cost O(log n) per node they
  take, never a walk over the tree.
- Handles (``NodeHandle``) are the tree's own nodes: read them, never mutate them. A handle stays
  valid when a later call splits its edge (it keeps the tail part; its new parent the head), so
  root..handle still covers the same blocks. Eviction may shorten or drop an unlocked handle, and
  ``lock`` on a dropped handle raises ``ValueError``.
- No recursion anywhere: every walk is an explicit loop, so a 100k-token prompt is fine.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from operator import itemgetter
from typing import NamedTuple

from memserve.tree.lazy_heap import LazyHeap


class Tier(enum.Enum):
    DEVICE = "device"
    DRAM = "dram"

    # Members are singletons compared by identity: hash them in C too (Enum's own ``__hash__`` is a
    # Python function, and tiers key the hot dicts and every ``BlockRef`` hash).
    __hash__ = object.__hash__


class BlockRef(NamedTuple):
    """One block of one tier. A named tuple, so hashing and comparing refs (sets, the tree's
    compares of runs of blocks) stay in C."""

    tier: Tier
    block_id: int


class Node:
    """One edge of the tree: ``token_ids[i * block_size:(i + 1) * block_size]`` live in ``blocks[i]``."""

    __slots__ = ("blocks", "children", "last_access", "lock_ref", "node_id", "parent", "token_ids")

    def __init__(
        self,
        node_id: int,
        parent: Node | None,
        token_ids: tuple[int, ...],
        blocks: tuple[BlockRef, ...],
        last_access: int,
    ) -> None:
        self.node_id = node_id
        self.parent = parent  # None for the root and for nodes removed from the tree
        self.token_ids = token_ids
        self.blocks = blocks
        self.last_access = last_access
        self.lock_ref = 0
        self.children: dict[tuple[int, ...], Node] = {}

    def __repr__(self) -> str:
        return f"Node(id={self.node_id}, num_blocks={len(self.blocks)}, lock_ref={self.lock_ref})"


NodeHandle = Node


@dataclass(frozen=True)
class Match:
    num_tokens: int  # multiple of block_size
    blocks: tuple[BlockRef, ...]  # one per matched block, in prefix order
    node: NodeHandle  # deepest node of the match (root when nothing matched); covers exactly it


class RadixTree:
    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self._clock = 0
        self._num_nodes_created = 1
        self._root = Node(0, None, (), (), 0)
        self._num_blocks = dict.fromkeys(Tier, 0)
        self._num_locked = dict.fromkeys(Tier, 0)
        # Reclaim candidates, oldest first: unlocked leaves by the tier of their last block, and
        # nodes that may move to DRAM (see ``_offer``).
        self._leaf_heaps = {
            tier: LazyHeap[Node](_lru_key, partial(_is_leaf_candidate, tier=tier)) for tier in Tier
        }
        self._swap_heap = LazyHeap[Node](_lru_key, lambda n: self._swappable(n, ()))

    @property
    def root(self) -> NodeHandle:
        return self._root

    def match(self, tokens: Sequence[int]) -> Match:
        """Longest cached prefix in whole blocks; stamps the path. Splits an edge the match ends in,
        so that ``Match.node`` covers exactly the matched blocks (what ``lock`` will pin)."""
        toks = self._whole_blocks(tokens)
        bs = self.block_size
        self._clock += 1
        node = self._root
        node.last_access = self._clock
        blocks: list[BlockRef] = []
        pos = 0
        while (child := node.children.get(toks[pos : pos + bs])) is not None:
            num_common = self._num_common_blocks(child.token_ids, toks, pos)
            if num_common < len(child.blocks):
                child = self._split(child, num_common)
            child.last_access = self._clock
            self._offer(child)
            blocks.extend(child.blocks)
            pos += num_common * bs
            node = child
        return Match(pos, tuple(blocks), node)

    def insert(self, tokens: Sequence[int], blocks: Sequence[BlockRef]) -> list[BlockRef]:
        """Publish ``tokens`` (cut to whole blocks) with ``blocks``, one per block; stamps the path.

        Returns the caller's blocks that were not taken, in prefix order: those at positions
        already cached under a different block. Raises ``ValueError`` on a block count mismatch."""
        toks = self._whole_blocks(tokens)
        bs = self.block_size
        if len(blocks) != len(toks) // bs:
            raise ValueError(f"{len(toks) // bs} whole blocks of tokens but {len(blocks)} blocks")
        self._clock += 1
        node = self._root
        node.last_access = self._clock
        not_taken: list[BlockRef] = []
        pos = 0
        while pos < len(toks):
            child = node.children.get(toks[pos : pos + bs])
            if child is None:
                self._add_leaf(node, toks[pos:], tuple(blocks[pos // bs :]))
                break
            num_common = self._num_common_blocks(child.token_ids, toks, pos)
            if num_common < len(child.blocks) and pos + num_common * bs < len(toks):
                child = self._split(child, num_common)  # diverges inside the edge
            child.last_access = self._clock
            self._offer(child)
            mine = tuple(blocks[pos // bs : pos // bs + num_common])
            cached = child.blocks[:num_common]
            if mine != cached:  # one C-level compare when the caller passes back matched refs
                pairs = zip(mine, cached, strict=True)
                not_taken.extend(b for b, c in pairs if b is not c and b != c)
            pos += num_common * bs
            node = child
        return not_taken

    def delete(self, tokens: Sequence[int]) -> list[BlockRef]:
        """Remove the last block of ``tokens`` (cut to whole blocks) and every cached extension of it;
        the shorter prefix stays. Returns the removed blocks, parents before children; ``[]`` when
        ``tokens`` is not fully cached. Raises ``ValueError`` (changing nothing) if any is locked."""
        toks = self._whole_blocks(tokens)
        if not toks:
            raise ValueError("cannot delete the empty prefix")
        found = self._find_last_block(toks)
        if found is None:
            return []
        node, index = found
        if node.lock_ref > 0:  # children's lock_ref <= parent's: the subtree is free iff node is
            raise ValueError(f"cannot delete a locked prefix ({node.lock_ref} locks)")
        if index > 0:
            self._split(node, index)  # node now starts at the last block of tokens
        return self._remove_subtree(node)

    def lock(self, node: NodeHandle) -> None:
        """+1 on every node root..node: a running request uses these blocks."""
        for n in self._path_to_root(node):
            if n.lock_ref == 0:
                self._count_locked(n, +1)
            n.lock_ref += 1

    def unlock(self, node: NodeHandle) -> None:
        """-1 on every node root..node; ``ValueError`` (changing nothing) if node is not locked."""
        path = self._path_to_root(node)
        if node.lock_ref == 0:
            raise ValueError(f"unlock of {node!r}, which is not locked")
        for n in path:
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self._count_locked(n, -1)
                self._offer(n)

    def evict(self, num_blocks: int, tier: Tier | None = None) -> list[BlockRef]:
        """Remove up to ``num_blocks`` blocks (of ``tier`` only, if given) from unlocked leaves, oldest
        leaf first, each leaf from its tail; a leaf emptied this way may expose its parent as the
        next leaf. Returns the removed blocks in removal order. A leaf whose last block is of
        another tier shields its ancestors: only leaf tails are ever removed."""
        if num_blocks < 0:
            raise ValueError("num_blocks must be >= 0")
        heaps = [self._leaf_heaps[t] for t in (Tier if tier is None else (tier,))]
        removed: list[BlockRef] = []
        while len(removed) < num_blocks and (leaf := _pop_oldest(heaps)) is not None:
            key = leaf.token_ids[: self.block_size]  # trimming may empty the edge
            self._trim_tail(leaf, num_blocks - len(removed), tier, removed)
            if leaf.blocks:  # budget reached, or a block of another tier now ends the leaf
                self._offer(leaf)
            else:
                self._detach(leaf, key)  # refiles the parent, which may be a leaf now
        return removed

    def select_swap_out(self, num_blocks: int) -> list[NodeHandle]:
        """Pick up to ``num_blocks`` unlocked DEVICE blocks to move to DRAM, as whole nodes.

        Candidates are unlocked nodes whose blocks are all on DEVICE and whose children are all on
        DRAM (or chosen earlier in this call), so DRAM stays closed downward. Coldest first; a
        chosen node may expose its parent. The last node is split so that the total is exact (the
        chosen part is the tail). Tiers are not changed: the caller copies the blocks and calls
        ``set_tier`` on every returned node before anything else touches the tree."""
        if num_blocks < 0:
            raise ValueError("num_blocks must be >= 0")
        chosen: set[int] = set()
        picked: list[Node] = []
        left = num_blocks
        while left > 0:
            node = self._swap_heap.pop(lambda n: self._swappable(n, chosen))
            if node is None:
                break
            if len(node.blocks) > left:
                self._split(node, len(node.blocks) - left)  # node keeps the tail
            picked.append(node)
            chosen.add(node.node_id)
            left -= len(node.blocks)
            parent = node.parent
            if parent is not None and self._swappable(parent, chosen):
                self._swap_heap.push(parent)
        return picked

    def path(self, node: NodeHandle) -> list[NodeHandle]:
        """The nodes from the root's child down to ``node`` (``[]`` for the root)."""
        path = self._path_to_root(node)
        path.pop()
        path.reverse()
        return path

    def nodes(self) -> Iterator[NodeHandle]:
        """Every node but the root, parents before children."""
        it = self._nodes()
        next(it)
        return it

    def evictable_leaves(self) -> list[NodeHandle]:
        """Unlocked leaves, oldest first (the order ``evict`` considers them in, before it runs)."""
        return sorted(self._leaves(), key=lambda n: (n.last_access, n.node_id))

    def set_tier(self, node: NodeHandle, refs: Sequence[BlockRef]) -> None:
        """Replace ``node.blocks`` by ``refs`` (same count) after a swap between tiers."""
        self._path_to_root(node)
        if len(refs) != len(node.blocks):
            raise ValueError(f"node has {len(node.blocks)} blocks, got {len(refs)} refs")
        if node.lock_ref > 0:
            self._count_locked(node, -1)
        for ref in node.blocks:
            self._num_blocks[ref.tier] -= 1
        for ref in refs:
            self._num_blocks[ref.tier] += 1
        node.blocks = tuple(refs)
        if node.lock_ref > 0:
            self._count_locked(node, +1)
        self._offer(node)
        if node.parent is not None:
            self._offer(node.parent)

    def num_blocks(self, tier: Tier | None = None) -> int:
        return sum(self._num_blocks.values()) if tier is None else self._num_blocks[tier]

    def num_locked_blocks(self, tier: Tier | None = None) -> int:
        return sum(self._num_locked.values()) if tier is None else self._num_locked[tier]

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` unless edges, lock counts, LRU stamps and block bookkeeping agree."""
        root = self._root
        if root.parent is not None or root.token_ids or root.blocks:
            raise AssertionError("the root must be empty and parentless")
        all_refs: list[BlockRef] = []
        locked_refs: list[BlockRef] = []
        for node in self._nodes():
            self._check_node(node)
            all_refs.extend(node.blocks)
            if node.lock_ref > 0:
                locked_refs.extend(node.blocks)
        counts = Counter(all_refs)  # one C-level pass; BlockRef hashes are C-level too
        if len(counts) != len(all_refs):
            raise AssertionError(f"{next(r for r, c in counts.items() if c > 1)} is held twice")
        num_blocks = _count_tiers(all_refs)
        if num_blocks != self._num_blocks:
            raise AssertionError(f"block counts {self._num_blocks}, tree holds {num_blocks}")
        num_locked = _count_tiers(locked_refs)
        if num_locked != self._num_locked:
            raise AssertionError(f"locked blocks counted {self._num_locked}, held {num_locked}")

    # -- internals ---------------------------------------------------------------------------

    def _count_locked(self, node: Node, sign: int) -> None:
        for ref in node.blocks:
            self._num_locked[ref.tier] += sign

    def _offer(self, node: Node) -> None:
        """File ``node`` (at its current stamp) in every heap whose candidates it may be: called
        whenever it is stamped, unlocked, split, retiered, or loses a child. The filter is cheap and
        errs towards filing; the heaps check the exact predicate when the node surfaces."""
        if node.lock_ref or not node.blocks or node.parent is None:
            return  # locked, the root, or dropped: filed again once that changes
        tail = node.blocks[-1].tier
        if not node.children:
            self._leaf_heaps[tail].push(node)
        if tail is Tier.DEVICE and all(
            c.blocks[0].tier is Tier.DRAM for c in node.children.values()
        ):
            self._swap_heap.push(node)

    def _swappable(self, node: Node, chosen: Collection[int]) -> bool:
        return (
            node.parent is not None
            and node.lock_ref == 0
            and node.node_id not in chosen
            and all(ref.tier is Tier.DEVICE for ref in node.blocks)
            and all(
                c.node_id in chosen or c.blocks[0].tier is Tier.DRAM for c in node.children.values()
            )
        )

    def _whole_blocks(self, tokens: Sequence[int]) -> tuple[int, ...]:
        toks = tuple(tokens)
        num_tokens = len(toks) // self.block_size * self.block_size
        return toks if num_tokens == len(toks) else toks[:num_tokens]

    def _num_common_blocks(self, edge: tuple[int, ...], toks: tuple[int, ...], pos: int) -> int:
        """Whole blocks on which ``edge`` and ``toks[pos:]`` agree; their first block agrees.

        One slice comparison in the common case; otherwise a binary search over blocks that only
        compares the still-unknown range, so the work stays O(edge tokens) in C, not in Python."""
        bs = self.block_size
        num_tokens = min(len(edge), len(toks) - pos)
        if toks[pos : pos + num_tokens] == edge[:num_tokens]:
            return num_tokens // bs
        lo, hi = 1, num_tokens // bs  # the first lo blocks agree; the first hi blocks do not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if toks[pos + lo * bs : pos + mid * bs] == edge[lo * bs : mid * bs]:
                lo = mid
            else:
                hi = mid
        return lo

    def _split(self, node: Node, num_blocks: int) -> Node:
        """Cut ``node``'s edge after ``num_blocks`` blocks; the head becomes a new parent:

        parent -> [ head: num_blocks | node: the rest ] -> node's children
        """
        assert node.parent is not None and 0 < num_blocks < len(node.blocks)
        cut = num_blocks * self.block_size
        head = self._new_node(node.parent, node.token_ids[:cut], node.blocks[:num_blocks])
        head.last_access = node.last_access
        head.lock_ref = node.lock_ref  # every lock through node also runs through head
        node.parent.children[node.token_ids[: self.block_size]] = head
        node.token_ids, node.blocks = node.token_ids[cut:], node.blocks[num_blocks:]
        node.parent = head
        head.children[node.token_ids[: self.block_size]] = node
        self._offer(head)
        self._offer(node)
        return head

    def _new_node(
        self, parent: Node, token_ids: tuple[int, ...], blocks: tuple[BlockRef, ...]
    ) -> Node:
        self._num_nodes_created += 1
        return Node(self._num_nodes_created - 1, parent, token_ids, blocks, self._clock)

    def _add_leaf(
        self, parent: Node, token_ids: tuple[int, ...], blocks: tuple[BlockRef, ...]
    ) -> None:
        leaf = self._new_node(parent, token_ids, blocks)
        parent.children[token_ids[: self.block_size]] = leaf
        for ref in blocks:
            self._num_blocks[ref.tier] += 1
        self._offer(leaf)

    def _find_last_block(self, toks: tuple[int, ...]) -> tuple[Node, int] | None:
        """The node holding the last block of ``toks`` and its index there; None if not all cached."""
        bs = self.block_size
        node, pos = self._root, 0
        while (child := node.children.get(toks[pos : pos + bs])) is not None:
            num_common = self._num_common_blocks(child.token_ids, toks, pos)
            if pos + num_common * bs == len(toks):
                return child, num_common - 1
            if num_common < len(child.blocks):
                return None
            node, pos = child, pos + num_common * bs
        return None

    def _path_to_root(self, node: Node) -> list[Node]:
        path = [node]
        while (parent := path[-1].parent) is not None:
            path.append(parent)
        if path[-1] is not self._root:
            raise ValueError(f"{node!r} is no longer in the tree")
        return path

    def _trim_tail(
        self, leaf: Node, budget: int, tier: Tier | None, removed: list[BlockRef]
    ) -> None:
        """Remove up to ``budget`` blocks of ``tier`` from the end of ``leaf``:

        leaf.blocks = [ kept ... | removed, last block first ]
        """
        keep = len(leaf.blocks)
        while keep > 0 and len(leaf.blocks) - keep < budget and _in(leaf.blocks[keep - 1], tier):
            keep -= 1
        removed.extend(reversed(leaf.blocks[keep:]))
        for ref in leaf.blocks[keep:]:
            self._num_blocks[ref.tier] -= 1
        leaf.blocks, leaf.token_ids = leaf.blocks[:keep], leaf.token_ids[: keep * self.block_size]

    def _detach(self, node: Node, key: tuple[int, ...]) -> Node:
        """Unlink ``node`` from its parent (``node.parent = None`` marks it dropped) and refile the
        parent; returns the parent."""
        parent = node.parent
        assert parent is not None
        del parent.children[key]
        node.parent = None
        self._offer(parent)
        return parent

    def _remove_subtree(self, top: Node) -> list[BlockRef]:
        self._detach(top, top.token_ids[: self.block_size])
        removed: list[BlockRef] = []
        stack = [top]
        while stack:
            node = stack.pop()
            node.parent = None  # dropped (the heaps skip it)
            removed.extend(node.blocks)
            for ref in node.blocks:
                self._num_blocks[ref.tier] -= 1
            stack.extend(reversed(node.children.values()))
        return removed

    def _nodes(self) -> Iterator[Node]:
        stack = [self._root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _leaves(self) -> Iterator[Node]:
        return (n for n in self._nodes() if n is not self._root and _is_evictable(n))

    def _check_node(self, node: Node) -> None:
        bs = self.block_size
        if node.lock_ref < 0:
            raise AssertionError(f"{node!r} has a negative lock_ref")
        if node is not self._root and not node.blocks:
            raise AssertionError(f"{node!r} is an empty non-root node")
        if len(node.token_ids) % bs or len(node.blocks) != len(node.token_ids) // bs:
            raise AssertionError(
                f"{node!r}: {len(node.token_ids)} tokens, {len(node.blocks)} blocks"
            )
        if node.last_access > self._clock:
            raise AssertionError(f"{node!r} is stamped in the future")
        if sum(child.lock_ref for child in node.children.values()) > node.lock_ref:
            raise AssertionError(f"{node!r}: children hold more locks than the node")
        for key, child in node.children.items():
            if child.parent is not node or key != child.token_ids[:bs]:
                raise AssertionError(f"{child!r} is misfiled under {node!r}")
            if child.last_access > node.last_access:
                raise AssertionError(f"{child!r} is more recent than its parent")


def _is_evictable(node: Node) -> bool:
    return not node.children and node.lock_ref == 0


def _count_tiers(refs: Sequence[BlockRef]) -> dict[Tier, int]:
    counts = Counter(map(itemgetter(0), refs))  # C-level: refs are tuples (tier, block_id)
    return {tier: counts[tier] for tier in Tier}


def _lru_key(node: Node) -> tuple[int, int]:
    return node.last_access, node.node_id


def _is_leaf_candidate(node: Node, tier: Tier) -> bool:
    """An unlocked leaf still in the tree whose last block is in ``tier``."""
    return node.parent is not None and _is_evictable(node) and _tail_in(node, tier)


def _pop_oldest(heaps: Sequence[LazyHeap[Node]]) -> Node | None:
    """The oldest live candidate over ``heaps`` (each leaf heap holds one tier), removed."""
    tops = [(top[0], heap) for heap in heaps if (top := heap.peek()) is not None]
    if not tops:
        return None
    return min(tops, key=lambda t: t[0])[1].pop()


def _in(ref: BlockRef, tier: Tier | None) -> bool:
    return tier is None or ref.tier is tier


def _tail_in(node: Node, tier: Tier | None) -> bool:
    return bool(node.blocks) and _in(node.blocks[-1], tier)

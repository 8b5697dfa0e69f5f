"""Global prompt tree: which instances hold which token prefixes (the scheduler's view).

One tree per instance type (prefill, decode, colocated). Keys are token ids cut to whole blocks
of ``block_size``; a node's edge is a run of whole blocks, and ``holders`` maps the instance ids
believed to hold the KV of root..node to when that belief expires. Pure Python, plain ints, no
torch, no recursion.

Contract (single-threaded; the scheduler's event loop owns the tree):

- ``insert(tokens, instance_id, now)`` records that the instance holds the whole blocks of
  ``tokens`` (learned on the response path) until ``now + ttl_s``; it refreshes every node on
  the path. Holders are therefore prefix-closed: an instance holding a node holds its ancestors,
  at least as long (every insert refreshes the path from the root).
- ``match(tokens, now)`` returns, per instance, how many leading tokens of ``tokens`` (whole
  blocks) it is believed to hold. Expired beliefs count for nothing. Instances do not report
  evictions, so an entry may be stale: that costs a recompute, never a wrong answer.
- ``forget(instance_id)`` drops an instance that left.
- Memory is bounded: past ``max_blocks`` indexed blocks, whole leaves are cut, least recently
  used (matched or inserted) first and nodes nobody holds any more before all others, down to
  90 % of the limit.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence


class _Node:
    __slots__ = ("children", "edge", "holders", "last_used", "node_id", "parent")

    def __init__(self, edge: list[int], parent: _Node | None, node_id: int) -> None:
        self.edge = edge  # whole blocks of tokens (a list: compared with prompt slices as is)
        self.parent = parent
        self.children: dict[tuple[int, ...], _Node] = {}  # keyed by their first block
        self.holders: dict[str, float] = {}  # instance id -> expiry time
        self.last_used = 0.0
        self.node_id = node_id


class GlobalPromptTree:
    def __init__(self, block_size: int, ttl_s: float = 300.0, max_blocks: int = 1 << 20) -> None:
        if block_size < 1 or ttl_s <= 0 or max_blocks < 1:
            raise ValueError("block_size, ttl_s and max_blocks must be positive")
        self.block_size = block_size
        self.ttl_s = ttl_s
        self.max_blocks = max_blocks
        self._ids = itertools.count()
        self.root = _Node([], None, next(self._ids))
        self.num_blocks = 0

    # ---- queries --------------------------------------------------------------------------

    def match(self, tokens: Sequence[int], now: float) -> dict[str, int]:
        """Per instance, the leading tokens of ``tokens`` (whole blocks) it holds now."""
        held: dict[str, int] = {}
        for node, depth in self._walk(tokens, now):
            holders = node.holders
            if min(holders.values()) > now:  # the common case: nobody's belief expired here
                held.update(dict.fromkeys(holders, depth))
                continue
            for instance_id, expiry in holders.items():
                if expiry > now:
                    held[instance_id] = depth
        return held

    # ---- updates --------------------------------------------------------------------------

    def insert(self, tokens: Sequence[int], instance_id: str, now: float) -> None:
        """``instance_id`` holds the whole blocks of ``tokens`` until ``now + ttl_s``."""
        bs = self.block_size
        key = list(tokens[: len(tokens) // bs * bs])
        expiry = now + self.ttl_s
        node, pos = self.root, 0
        while pos < len(key):
            child = node.children.get(tuple(key[pos : pos + bs]))
            if child is None:
                child = self._add(node, key[pos:])
            else:
                same = _common_blocks(child.edge, key, pos, bs, len(key))
                if same < len(child.edge):
                    child = self._split(child, same)
            child.holders[instance_id] = expiry
            child.last_used = now
            node, pos = child, pos + len(child.edge)
        if self.num_blocks > self.max_blocks:
            self._prune(int(self.max_blocks * 0.9), now)

    def forget(self, instance_id: str) -> None:
        """Drop every belief about ``instance_id`` (it left, or restarted empty)."""
        for node in self._nodes():
            node.holders.pop(instance_id, None)

    # ---- internals ------------------------------------------------------------------------

    def _walk(self, tokens: Sequence[int], now: float) -> Iterator[tuple[_Node, int]]:
        """The nodes along ``tokens`` someone still holds, each with the matched depth in tokens
        (a partly matched last edge counts its matched blocks). Stamps them as used."""
        bs = self.block_size
        key = tokens if isinstance(tokens, list) else list(tokens)  # no copy of a list prompt
        end = len(key) // bs * bs
        node, pos = self.root, 0
        while pos < end:
            child = node.children.get(tuple(key[pos : pos + bs]))
            if child is None or not child.holders or max(child.holders.values()) <= now:
                return  # children never outlive their parent's holders
            same = _common_blocks(child.edge, key, pos, bs, end)
            child.last_used = now
            yield child, pos + same
            if same < len(child.edge):
                return
            node, pos = child, pos + same

    def _add(self, parent: _Node, edge: list[int]) -> _Node:
        node = _Node(edge, parent, next(self._ids))
        parent.children[tuple(edge[: self.block_size])] = node
        self.num_blocks += len(edge) // self.block_size
        return node

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut ``node``'s edge after ``at`` tokens; returns the new head (same holders)."""
        assert node.parent is not None and 0 < at < len(node.edge)
        head = _Node(node.edge[:at], node.parent, next(self._ids))
        head.holders = dict(node.holders)
        head.last_used = node.last_used
        node.parent.children[tuple(head.edge[: self.block_size])] = head
        node.edge = node.edge[at:]
        node.parent = head
        head.children[tuple(node.edge[: self.block_size])] = node
        return head

    def _prune(self, target: int, now: float) -> None:
        """Cut least recently used leaves (dead ones first) until ``num_blocks <= target``."""
        heap = [(_prune_key(n, now), n.node_id, n) for n in self._nodes() if not n.children]
        heapq.heapify(heap)
        while heap and self.num_blocks > target:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[tuple(leaf.edge[: self.block_size])]
            self.num_blocks -= len(leaf.edge) // self.block_size
            if not parent.children and parent is not self.root:
                heapq.heappush(heap, (_prune_key(parent, now), parent.node_id, parent))

    def _nodes(self) -> Iterator[_Node]:
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())


def _prune_key(node: _Node, now: float) -> tuple[bool, float]:
    """Nodes nobody holds any more first, then least recently used."""
    return (any(e > now for e in node.holders.values()), node.last_used)


def _common_blocks(edge: list[int], key: Sequence[int], pos: int, bs: int, end: int) -> int:
    """Tokens (whole blocks) ``edge`` shares with ``key[pos:end]``; at least the first block."""
    n = min(len(edge), end - pos)
    if (edge if n == len(edge) else edge[:n]) == key[pos : pos + n]:
        return n
    same = bs
    while same < n and edge[same : same + bs] == key[pos + same : pos + same + bs]:
        same += bs
    return same

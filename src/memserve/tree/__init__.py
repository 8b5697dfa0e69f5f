"""Prompt trees: the radix index from token-id prefixes to cached KV blocks (pure Python, no torch).

Glossary: a *block* holds the KV of ``block_size`` consecutive tokens; a ``BlockRef`` names one by
``Tier`` (device HBM or host DRAM) and a plain-int ``block_id`` in that tier's allocator. A *node*
is one edge of the tree: a run of whole blocks.
"""

from memserve.tree.radix import BlockRef, Match, Node, NodeHandle, RadixTree, Tier

__all__ = ["BlockRef", "Match", "Node", "NodeHandle", "RadixTree", "Tier"]

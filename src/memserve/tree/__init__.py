"""Prompt trees (pure Python, no torch): the radix index from token-id prefixes to cached KV blocks
of one instance (``RadixTree``), and the scheduler's view of which instances hold which prefixes
(``GlobalPromptTree``).

Glossary: a *block* holds the KV of ``block_size`` consecutive tokens; a ``BlockRef`` names one by
``Tier`` (device HBM or host DRAM) and a plain-int ``block_id`` in that tier's allocator. A *node*
is one edge of the tree: a run of whole blocks.
"""

from memserve.tree.global_tree import GlobalPromptTree
from memserve.tree.radix import BlockRef, Match, Node, NodeHandle, RadixTree, Tier

__all__ = ["BlockRef", "GlobalPromptTree", "Match", "Node", "NodeHandle", "RadixTree", "Tier"]

"""KV-cache tensors of one memory tier, in MemServe's aggregated ("huge page") layout.

Glossary (used across engine/, attention/ and mempool/):

- **block**: ``block_size`` consecutive token slots of one sequence, for *all* layers, K and V.
  Block ids are plain ints in ``[0, num_blocks)``; the allocator hands them out.
- **page**: one (block, layer, K-or-V) slice, ``[block_size, num_kv_heads, head_dim]``.
  ``page_id = (block_id * num_layers + layer) * 2 + kv`` with ``kv`` 0 for K and 1 for V.
- **slot**: one token position inside a block; ``row = page_id * block_size + offset`` indexes the
  flat ``[num_rows, num_kv_heads, head_dim]`` view.

Layout: ``data[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``. Every block is one
contiguous span of ``bytes_per_block`` bytes holding all of its layers, so moving n blocks that sit
next to each other is one send of one slice, and any n blocks are one gather into a staging buffer
and one send, whatever the number of layers (the paper's block aggregation). Paged-attention
kernels that index a flat page pool (xformers, flash-attn, FlashInfer) still work: a layer's K pages
of a block table are ``table * 2L + 2l``, its V pages the same plus one.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_blocks: int,
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        pin_memory: bool = False,
    ) -> None:
        """``pin_memory``: page-locked host memory (a DRAM tier next to a GPU: fast async copies)."""
        self.num_blocks = num_blocks
        self.num_layers = num_layers
        self.block_size = block_size
        shape = (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin_memory)
        # Views share storage with ``data``; built once.
        self.pages = self.data.view(num_blocks * num_layers * 2, block_size, num_kv_heads, head_dim)
        self.rows = self.data.view(-1, num_kv_heads, head_dim)

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element_size = torch.empty((), dtype=dtype).element_size()
        return num_layers * 2 * block_size * num_kv_heads * head_dim * element_size

    @property
    def pages_per_block(self) -> int:
        return self.num_layers * 2

    def layer_k_page_offset(self, layer: int) -> int:
        """Add to a block's base page id (``block_id * 2L``) to get its K page of ``layer``."""
        return 2 * layer

    def layer_k_row_offset(self, layer: int) -> int:
        """Add to a slot's base row (layer 0, K) to get its row in ``layer``'s K page."""
        return 2 * layer * self.block_size

    def block_view(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of the given blocks, ``[n, L, 2, block_size, H, D]`` (tests, transfer staging)."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.data.device)
        return self.data.index_select(0, index)

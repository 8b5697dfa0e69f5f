"""The paged-attention interface.

Who calls what: the model runner builds one ``AttentionMetadata`` per engine step (from plain-int
block tables, in one place); the model calls ``backend.forward`` once per layer with that step's
query/key/value for the new tokens. ``forward`` writes the new K/V into the cache pages, then attends
each sequence's query tokens over its whole context (cached prefix + the new tokens), causally.

Token packing of a step (``N`` new tokens)::

    [ decode_0 | decode_1 | ... | decode_{B-1} | prefill_0 ......... | prefill_1 ..... ]
      one token per decoding sequence           query_len tokens each (chunk of a prompt)

A prefill span's query covers context positions ``[context_len - query_len, context_len)``; the
positions before it (a cached prefix or earlier chunks) are already in the cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from memserve.mempool.kv_cache import KVCache


@dataclass(frozen=True)
class PrefillSpan:
    """One sequence's chunk of query tokens in a step."""

    query_start: int  # index of its first token in the packed batch
    query_len: int
    context_len: int  # tokens attended after this step: earlier context + this chunk
    page_ids: torch.Tensor  # [ceil(context_len / block_size)] layer-0 K page of each block


@dataclass(frozen=True)
class DecodeBatch:
    """All single-token sequences of a step, padded to the longest context."""

    page_ids: torch.Tensor  # [B, max_blocks] layer-0 K page per block; padding points at page 0
    mask: torch.Tensor  # [B, 1, 1, max_blocks * block_size] bool, True where a key exists


@dataclass(frozen=True)
class AttentionMetadata:
    slot_rows: torch.Tensor  # [N] layer-0 K row of each new token's slot
    num_decodes: int  # the first num_decodes tokens are decodes
    decode: DecodeBatch | None
    prefills: tuple[PrefillSpan, ...]


class AttentionBackend(ABC):
    """Paged attention over a ``KVCache``; implementations are chosen once at start-up."""

    name: str

    @abstractmethod
    def forward(
        self,
        layer: int,
        q: torch.Tensor,  # [N, num_heads, head_dim]
        k: torch.Tensor,  # [N, num_kv_heads, head_dim]
        v: torch.Tensor,  # [N, num_kv_heads, head_dim]
        cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [N, num_heads * head_dim]
        """Store k/v of the new tokens in ``cache`` (layer ``layer``) and return attention output."""

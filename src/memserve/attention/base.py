"""The paged-attention interface.

Who calls what: the model runner builds one ``AttentionMetadata`` per engine step (from plain-int
block tables, in one place); the model calls ``backend.forward`` once per layer with that step's
query/key/value for the new tokens. ``forward`` writes the new K/V into the cache pages, then attends
each sequence's query tokens over its whole context (cached prefix + the new tokens), causally.

Token packing of a step (``N`` new tokens)::

    [ decode_0 | decode_1 | ... | decode_{B-1} | prefill_0 ......... | prefill_1 ..... ]
      one token per decoding sequence           query_len tokens each (chunk of a prompt)

Decodes come sorted by context length, in groups of similar length (``build_decode_batches``):
each group is padded to its own longest context, so one long conversation does not make every
short one in the step read (and attend over) thousands of padding keys (measured on CPU: 40
decodes of 300 tokens plus one of 3900, 525 ms per step in one padded batch, ~90 ms grouped).

A prefill span's query covers context positions ``[context_len - query_len, context_len)``; the
positions before it (a cached prefix or earlier chunks) are already in the cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

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
    """Consecutive single-token sequences of a step, padded to the longest context among them."""

    page_ids: torch.Tensor  # [B, max_blocks] layer-0 K page per block; padding points at page 0
    mask: torch.Tensor  # [B, 1, 1, max_blocks * block_size] bool, True where a key exists

    @property
    def num_seqs(self) -> int:
        return int(self.page_ids.shape[0])


@dataclass(frozen=True)
class AttentionMetadata:
    slot_rows: torch.Tensor  # [N] layer-0 K row of each new token's slot
    num_decodes: int  # the first num_decodes tokens are decodes
    decodes: tuple[DecodeBatch, ...]  # groups covering the decodes in packed order
    prefills: tuple[PrefillSpan, ...]


DECODE_GROUP_MIN_KEYS = 4096
"""Padded keys below which a decode group is never split (a group costs a gather and an SDPA call
per layer; small ones are cheaper together)."""


def decode_groups(
    context_lens: Sequence[int], min_keys: int = DECODE_GROUP_MIN_KEYS
) -> list[range]:
    """Cut decodes sorted by context length (ascending) into consecutive groups: a group is closed
    before a sequence that would make its padded keys (count x longest) exceed both twice its real
    keys and ``min_keys``. So padding at most doubles the keys read, and a step has at
    most ~log2(longest / shortest) + 1 groups."""
    if any(a > b for a, b in pairwise(context_lens)):
        raise ValueError("decode context lengths must be sorted ascending")
    groups: list[range] = []
    start, real = 0, 0
    for i, n in enumerate(context_lens):
        padded = (i - start + 1) * n
        if i > start and padded > max(min_keys, 2 * (real + n)):
            groups.append(range(start, i))
            start, real = i, 0
        real += n
    if context_lens:
        groups.append(range(start, len(context_lens)))
    return groups


def build_decode_batches(
    tables: Sequence[Sequence[int]],
    context_lens: Sequence[int],
    block_size: int,
    pages_per_block: int,
    device: torch.device,
    min_keys: int = DECODE_GROUP_MIN_KEYS,
) -> tuple[DecodeBatch, ...]:
    """The ``DecodeBatch`` groups of decodes with block tables ``tables`` (sorted by context length,
    ascending, as they are packed)."""
    batches = []
    for group in decode_groups(context_lens, min_keys):
        lens = [context_lens[i] for i in group]
        max_blocks = -(-lens[-1] // block_size)
        page_ids = [
            [b * pages_per_block for b in tables[i][:max_blocks]]
            + [0] * (max_blocks - min(max_blocks, len(tables[i])))
            for i in group
        ]
        key_pos = torch.arange(max_blocks * block_size, device=device)
        lens_t = torch.tensor(lens, dtype=torch.long, device=device)
        mask = (key_pos[None, :] < lens_t[:, None])[:, None, None, :]  # [B, 1, 1, T]
        page_t = torch.tensor(page_ids, dtype=torch.long, device=device)
        batches.append(DecodeBatch(page_ids=page_t, mask=mask))
    return tuple(batches)


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

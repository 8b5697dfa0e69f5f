"""Drive ``LlamaModel`` through the paged path directly: one sequence, chosen chunk sizes."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from memserve.attention.base import AttentionMetadata, DecodeBatch, PrefillSpan
from memserve.attention.torch_backend import TorchAttentionBackend
from memserve.mempool.kv_cache import KVCache
from memserve.model.llama import LlamaModel
from memserve.model.loader import LoadedModel


def new_cache(model: LlamaModel, num_blocks: int, block_size: int = 16) -> KVCache:
    a = model.arch
    return KVCache(num_blocks, a.num_layers, block_size, a.num_kv_heads, a.head_dim,
                   model.dtype, model.device)  # fmt: skip


def chunk_metadata(
    cache: KVCache, block_ids: Sequence[int], start: int, num_tokens: int
) -> AttentionMetadata:
    """Metadata for tokens [start, start + num_tokens) of one sequence with table ``block_ids``."""
    bs, ppb = cache.block_size, cache.pages_per_block
    rows = [block_ids[p // bs] * ppb * bs + p % bs for p in range(start, start + num_tokens)]
    end = start + num_tokens
    pages = torch.tensor([b * ppb for b in block_ids[: -(-end // bs)]])
    slot_rows = torch.tensor(rows)
    if num_tokens == 1:
        mask = (torch.arange(len(pages) * bs) < end)[None, None, None, :]
        return AttentionMetadata(slot_rows, 1, (DecodeBatch(pages[None, :], mask),), ())
    return AttentionMetadata(slot_rows, 0, (), (PrefillSpan(0, num_tokens, end, pages),))


@torch.inference_mode()
def run_chunks(
    model: LlamaModel,
    cache: KVCache,
    tokens: Sequence[int],
    chunk_sizes: Sequence[int],
    block_ids: Sequence[int],
) -> torch.Tensor:
    """Feed ``tokens`` in chunks; return fp32 logits of every position, [len(tokens), vocab]."""
    assert sum(chunk_sizes) == len(tokens)
    out, start = [], 0
    for n in chunk_sizes:
        meta = chunk_metadata(cache, block_ids, start, n)
        ids = torch.tensor(tokens[start : start + n])
        positions = torch.arange(start, start + n)
        out.append(model.forward(ids, positions, cache, meta, torch.arange(n)))
        start += n
    return torch.cat(out)


def llama_model(loaded: LoadedModel) -> LlamaModel:
    """A ``LlamaModel`` over ``loaded``'s weights with the torch attention backend."""
    return LlamaModel(loaded.arch, loaded.weights, TorchAttentionBackend())


def shuffled_table(
    num_tokens: int, num_blocks: int, block_size: int, rng: random.Random
) -> list[int]:
    """A block table for ``num_tokens`` tokens: distinct ids drawn in random order from the pool."""
    needed = max(1, -(-num_tokens // block_size))
    assert needed <= num_blocks
    return rng.sample(range(num_blocks), needed)


def paged_logits(
    model: LlamaModel,
    tokens: Sequence[int],
    chunk_sizes: Sequence[int] | None = None,
    block_size: int = 16,
    seed: int = 0,
) -> torch.Tensor:
    """Logits of every position of ``tokens`` fed in ``chunk_sizes`` (default: one prefill), over a
    fresh cache filled with noise (a read of an unwritten slot shows) and a shuffled block table."""
    rng = random.Random(seed)
    num_blocks = -(-len(tokens) // block_size) + 3
    cache = new_cache(model, num_blocks, block_size)
    cache.data.normal_(generator=torch.Generator().manual_seed(seed))
    table = shuffled_table(len(tokens), num_blocks, block_size, rng)
    return run_chunks(model, cache, tokens, chunk_sizes or [len(tokens)], table)

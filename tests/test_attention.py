"""``TorchAttentionBackend`` against dense attention written here, on random paged layouts.

Each case packs some sequences the way the model runner does (single-token chunks first, sorted by
context length, in ``DecodeBatch`` groups, then one ``PrefillSpan`` per longer chunk); a sequence's query chunk follows a
cached prefix already in the cache. Block tables are drawn in shuffled order from a pool whose
other slots hold noise, so reading a wrong page or an unmasked padding slot changes the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memserve.attention.base import (
    AttentionMetadata,
    PrefillSpan,
    build_decode_batches,
    decode_groups,
)
from memserve.attention.torch_backend import TorchAttentionBackend
from memserve.mempool.kv_cache import KVCache

NUM_LAYERS = 2
TOL = 1e-5


@dataclass(frozen=True)
class Seq:
    prefix_len: int  # tokens already in the cache
    query_len: int  # new tokens this step
    block_ids: tuple[int, ...]

    @property
    def context_len(self) -> int:
        return self.prefix_len + self.query_len


@dataclass(frozen=True)
class Case:
    block_size: int
    num_kv_heads: int
    num_heads: int
    head_dim: int
    layer: int
    num_blocks: int
    seqs: tuple[Seq, ...]
    seed: int
    min_group_keys: int  # decode grouping threshold: small values split decodes into many groups


@st.composite
def cases(draw: st.DrawFn) -> Case:
    block_size = draw(st.sampled_from([4, 8, 16]))
    num_kv_heads = draw(st.sampled_from([1, 2]))
    ratio = draw(st.sampled_from([1, 2, 4]))
    lengths = draw(
        st.lists(st.tuples(st.integers(0, 40), st.integers(1, 20)), min_size=1, max_size=5)
    )  # (prefix_len, query_len) per sequence
    needed = [-(-(p + q) // block_size) for p, q in lengths]
    num_blocks = sum(needed) + draw(st.integers(0, 4))
    pool = draw(st.permutations(range(num_blocks)))
    seqs, used = [], 0
    for (prefix_len, query_len), n in zip(lengths, needed, strict=True):
        seqs.append(Seq(prefix_len, query_len, tuple(pool[used : used + n])))
        used += n
    return Case(
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        num_heads=num_kv_heads * ratio,
        head_dim=draw(st.sampled_from([8, 16])),
        layer=draw(st.integers(0, NUM_LAYERS - 1)),
        num_blocks=num_blocks,
        seqs=tuple(seqs),
        seed=draw(st.integers(0, 2**16)),
        min_group_keys=draw(st.sampled_from([0, 8, 4096])),
    )


# ---- what the model runner builds --------------------------------------------------------------


def packed_order(seqs: tuple[Seq, ...]) -> list[int]:
    """Indices of ``seqs`` in packing order: single-token chunks (decodes) first, then prefill
    chunks, as the model runner packs them."""
    decodes = sorted(
        (i for i, s in enumerate(seqs) if s.query_len == 1), key=lambda i: seqs[i].context_len
    )
    return decodes + [i for i, s in enumerate(seqs) if s.query_len > 1]


def slot(cache: KVCache, seq: Seq, pos: int) -> tuple[int, int]:
    """(block id, offset in block) of token position ``pos``."""
    return seq.block_ids[pos // cache.block_size], pos % cache.block_size


def build_metadata(cache: KVCache, order: list[Seq], min_keys: int) -> AttentionMetadata:
    bs, ppb = cache.block_size, cache.pages_per_block
    slot_rows: list[int] = []
    for s in order:
        for pos in range(s.prefix_len, s.context_len):
            block, offset = slot(cache, s, pos)
            slot_rows.append(block * ppb * bs + offset)
    decodes = [s for s in order if s.query_len == 1]
    batches = build_decode_batches(
        [s.block_ids for s in decodes],
        [s.context_len for s in decodes],
        bs,
        ppb,
        torch.device("cpu"),
        min_keys,
    )
    assert sum(b.num_seqs for b in batches) == len(decodes)
    spans, start = [], len(decodes)
    for s in order[len(decodes) :]:
        pages_1d = torch.tensor([b * ppb for b in s.block_ids])
        spans.append(PrefillSpan(start, s.query_len, s.context_len, pages_1d))
        start += s.query_len
    return AttentionMetadata(torch.tensor(slot_rows), len(decodes), batches, tuple(spans))


def test_decode_groups_bound_the_padding() -> None:
    assert decode_groups([]) == []
    assert decode_groups([300] * 40) == [range(40)]
    # One long conversation gets its own group instead of padding 40 short ones to 3900 keys.
    assert decode_groups([300] * 40 + [3900]) == [range(40), range(40, 41)]
    assert decode_groups([10, 10, 1000]) == [range(3)]  # 3000 padded keys: under min_keys
    assert decode_groups([10, 10, 1000], min_keys=0) == [range(2), range(2, 3)]
    with pytest.raises(ValueError, match="sorted"):
        decode_groups([20, 10])
    lens = sorted((i * 7919) % 5000 + 1 for i in range(200))
    for g in decode_groups(lens, min_keys=0):  # padding at most doubles the keys read
        assert len(g) * lens[g[-1]] <= 2 * sum(lens[i] for i in g)


# ---- the dense reference -----------------------------------------------------------------------


def dense_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, prefix_len: int
) -> torch.Tensor:
    """q [L, Hq, D]; keys/values [prefix_len + L, Hkv, D] → [L, Hq * D], causal, float64."""
    num_q, num_heads, head_dim = q.shape
    ratio = num_heads // keys.shape[1]
    k = keys.double().repeat_interleave(ratio, dim=1)  # [T, Hq, D]
    v = values.double().repeat_interleave(ratio, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / head_dim**0.5  # [Hq, L, T]
    q_pos = torch.arange(prefix_len, prefix_len + num_q)[:, None]
    k_pos = torch.arange(keys.shape[0])[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)  # [L, Hq, D]
    return out.reshape(num_q, -1)


def run_case(case: Case) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    cache = KVCache(case.num_blocks, NUM_LAYERS, case.block_size, case.num_kv_heads, case.head_dim,
                    torch.float32, torch.device("cpu"))  # fmt: skip
    cache.data.copy_(torch.randn(cache.data.shape, generator=gen))  # noise everywhere
    kv_shape = (case.num_kv_heads, case.head_dim)
    # Cached prefixes: written through the documented layout [block, layer, K/V, offset, H, D].
    prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, s in enumerate(case.seqs):
        pk = torch.randn(s.prefix_len, *kv_shape, generator=gen)
        pv = torch.randn(s.prefix_len, *kv_shape, generator=gen)
        for pos in range(s.prefix_len):
            block, offset = slot(cache, s, pos)
            cache.data[block, case.layer, 0, offset] = pk[pos]
            cache.data[block, case.layer, 1, offset] = pv[pos]
        prefix[i] = (pk, pv)

    order = [case.seqs[i] for i in packed_order(case.seqs)]
    num_tokens = sum(s.query_len for s in order)
    q = torch.randn(num_tokens, case.num_heads, case.head_dim, generator=gen)
    k = torch.randn(num_tokens, *kv_shape, generator=gen)
    v = torch.randn(num_tokens, *kv_shape, generator=gen)
    expected_cache = cache.data.clone()
    meta = build_metadata(cache, order, case.min_group_keys)

    out = TorchAttentionBackend().forward(case.layer, q, k, v, cache, meta)

    assert out.shape == (num_tokens, case.num_heads * case.head_dim)
    start = 0
    for i in packed_order(case.seqs):
        s = case.seqs[i]
        sl = slice(start, start + s.query_len)
        pk, pv = prefix[i]
        want = dense_attention(q[sl], torch.cat([pk, k[sl]]), torch.cat([pv, v[sl]]), s.prefix_len)
        diff = (out[sl].double() - want).abs().max().item()
        assert diff <= TOL, f"{s}: max diff {diff}"
        for j, pos in enumerate(range(s.prefix_len, s.context_len)):
            block, offset = slot(cache, s, pos)
            expected_cache[block, case.layer, 0, offset] = k[start + j]
            expected_cache[block, case.layer, 1, offset] = v[start + j]
        start += s.query_len
    # New K/V landed in their slots of this layer, and nothing else changed.
    assert torch.equal(cache.data, expected_cache)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_paged_attention_equals_dense(case: Case) -> None:
    run_case(case)


def test_decodes_of_different_lengths_with_prefills() -> None:
    """Padding of the decode batch points at page 0, which holds another sequence's data."""
    seqs = (
        Seq(prefix_len=0, query_len=9, block_ids=(0, 5, 3)),  # owns block 0 (the padding page)
        Seq(prefix_len=13, query_len=1, block_ids=(6, 2, 4, 7)),
        Seq(prefix_len=2, query_len=1, block_ids=(1,)),
        Seq(prefix_len=6, query_len=5, block_ids=(8, 9, 10)),
    )
    run_case(Case(block_size=4, num_kv_heads=2, num_heads=8, head_dim=16, layer=1,
                  num_blocks=11, seqs=seqs, seed=3, min_group_keys=0))  # fmt: skip


def test_layer_pages_of_a_block_are_disjoint() -> None:
    """Each (layer, K/V) of a block is its own page, and a layer's rows land in its own page."""
    cache = KVCache(3, NUM_LAYERS, 4, 1, 2, torch.float32, torch.device("cpu"))
    assert cache.pages_per_block == 2 * NUM_LAYERS
    block, layer, offset = 2, 1, 3
    row = (
        block * cache.pages_per_block * cache.block_size + offset + cache.layer_k_row_offset(layer)
    )
    cache.rows[row] = 1.0
    cache.rows[row + cache.block_size] = 2.0
    assert cache.data[block, layer, 0, offset].eq(1.0).all()
    assert cache.data[block, layer, 1, offset].eq(2.0).all()
    assert cache.data.abs().sum().item() == 2 * 1.0 + 2 * 2.0
    page = block * cache.pages_per_block + cache.layer_k_page_offset(layer)
    assert torch.equal(cache.pages[page], cache.data[block, layer, 0])
    assert torch.equal(cache.block_view([block])[0], cache.data[block])

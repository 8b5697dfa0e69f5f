"""Llama-family decoder over a paged KV cache, readable top to bottom.

Weights are plain tensors (no ``nn.Module``): q/k/v and gate/up projections are fused at load so a
layer runs four matrix products instead of seven, and every matrix is *packed* in the layout its
kernel is fastest with (``ops.pack_weight``: column panels for fp32 on CPU, which run 1.2-1.8x
faster than ``F.linear``; the checkpoint's row-major layout everywhere else). Tokens of a step are packed flat (``N``
tokens of many sequences, see ``attention.base``); logits are computed only where a token is sampled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memserve.attention.base import AttentionBackend, AttentionMetadata
from memserve.mempool.kv_cache import KVCache
from memserve.model.arch import LlamaArch
from memserve.model.ops import LinearFn, Rotary, apply_rotary, rms_norm, select_linear


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # packed, hidden → q_size + 2 * kv_size
    o: torch.Tensor  # packed, q_size → hidden
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # packed, hidden → 2 * intermediate
    down: torch.Tensor  # packed, intermediate → hidden
    qkv_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


@dataclass
class LlamaWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # packed, hidden → vocab (a packed copy of ``embed`` when tied)


class LlamaModel:
    """Forward pass only. Contract: ``forward`` writes the new tokens' K/V into ``cache`` and returns
    fp32 logits for the packed positions in ``logits_indices``."""

    def __init__(self, arch: LlamaArch, weights: LlamaWeights, backend: AttentionBackend) -> None:
        self.arch = arch
        self.weights = weights
        self.backend = backend
        self.dtype = weights.embed.dtype
        self.device = weights.embed.device
        self.rotary = Rotary(arch, self.device)
        self.linear: LinearFn = select_linear(self.dtype, self.device)

    def forward(
        self,
        input_ids: torch.Tensor,  # [N] int64
        positions: torch.Tensor,  # [N] int64
        cache: KVCache,
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,  # [S] int64, positions in the packed batch to sample at
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:  # [S, vocab] fp32
        """``on_layer(l)`` is called once layer ``l`` has written its K/V to the cache (by-layer
        KV streaming starts sending it while the later layers compute)."""
        hidden = F.embedding(input_ids, self.weights.embed)  # [N, hidden]
        cos, sin = self.rotary.cos_sin(positions, self.dtype)  # [N, 1, D] each
        for layer, w in enumerate(self.weights.layers):
            hidden = hidden + self._attention(layer, w, hidden, cos, sin, cache, meta)
            if on_layer is not None:
                on_layer(layer)
            hidden = hidden + self._mlp(w, hidden)
        last = rms_norm(hidden[logits_indices], self.weights.norm, self.arch.rms_norm_eps)
        return self.linear(last, self.weights.lm_head).float()  # [S, vocab]

    def _attention(
        self,
        layer: int,
        w: LayerWeights,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        a = self.arch
        x = rms_norm(hidden, w.input_norm, a.rms_norm_eps)
        qkv = self._proj(x, w.qkv, w.qkv_bias)  # [N, q_size + 2 * kv_size]
        q, k, v = torch.split(qkv, [a.q_size, a.kv_size, a.kv_size], dim=-1)
        n = hidden.shape[0]
        q = apply_rotary(q.view(n, a.num_heads, a.head_dim), cos, sin)  # [N, Hq, D]
        k = apply_rotary(k.view(n, a.num_kv_heads, a.head_dim), cos, sin)  # [N, Hkv, D]
        v = v.reshape(n, a.num_kv_heads, a.head_dim)  # [N, Hkv, D]
        out = self.backend.forward(layer, q, k, v, cache, meta)  # [N, q_size]
        return self._proj(out, w.o, w.o_bias)

    def _mlp(self, w: LayerWeights, hidden: torch.Tensor) -> torch.Tensor:
        x = rms_norm(hidden, w.post_norm, self.arch.rms_norm_eps)
        gate, up = self._proj(x, w.gate_up, w.gate_up_bias).chunk(2, dim=-1)  # [N, I] each
        return self._proj(F.silu(gate) * up, w.down, w.down_bias)

    def _proj(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        y = self.linear(x, weight)
        return y if bias is None else y + bias

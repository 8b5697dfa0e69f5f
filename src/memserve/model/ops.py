"""Small numeric building blocks of the model: RoPE, RMSNorm and the linear kernel choice.

Linear on CPUs without native bfloat16 instructions: measured on a 2-core AVX2 EPYC, torch's native
bf16 GEMM runs at ~15-20 GFLOP/s at every batch size, while upcasting the operands to float32 in
chunks of weight rows (so the fp32 chunk stays in cache) runs at 65-100 GFLOP/s from batch 32 up.
Both read bf16 operands, accumulate in fp32 and round the result to bf16 once, like any bf16 GEMM,
so the upcast path changes speed, not the arithmetic contract. Native is faster below ~8 rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from memserve.hardware import upcast_on_cpu
from memserve.model.arch import LlamaArch

LinearFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_UPCAST_MIN_ROWS = 8
_UPCAST_CHUNK_ROWS = 1024
_PANEL_TARGET = 512
_PANEL_RANGE = (128, 2048)


def panel_width(num_out: int) -> int:
    """Columns per panel: the divisor of ``num_out`` nearest 512 within [128, 2048], else all."""
    lo, hi = _PANEL_RANGE
    divisors = [c for c in range(lo, min(hi, num_out) + 1) if num_out % c == 0]
    return min(divisors, key=lambda c: abs(c - _PANEL_TARGET)) if divisors else num_out


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """A checkpoint matrix ``[out, in]`` → the layout the kernel for its dtype and device wants.

    - fp32 on CPU: column panels ``[num_panels, in, panel]``, so one broadcast ``matmul`` runs a
      batched GEMM that MKL parallelises across panels. Measured on 2 cores: the 32000x768 lm_head
      at batch 32 takes 13.5 ms instead of 24 ms with ``F.linear``, the 4096x768 gate/up 1.5 instead
      of 2.5, and batch 8 gains ~1.6x.
    - Everything else: row-major ``[out, in]`` for ``F.linear``, the layout torch's bf16/fp16 CPU
      kernels and cuBLAS are tuned for (bf16 on the transposed layout measured 0.5 GFLOP/s on CPU
      against ~16).
    """
    if not _uses_panels(w.dtype, w.device):
        return w.contiguous()
    w_t = w.t()  # [in, out]
    width = panel_width(w_t.shape[1])
    return w_t.reshape(w_t.shape[0], -1, width).permute(1, 0, 2).contiguous()  # [P, in, C]


def unpack_weight(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_weight``, as ``[in, out]`` (a view or a copy)."""
    if packed.dim() == 2:
        return packed.t()
    return packed.permute(1, 0, 2).reshape(packed.shape[1], -1)


def select_linear(dtype: torch.dtype, device: torch.device) -> LinearFn:
    """The fastest correct ``y = x @ W.T`` for a weight packed by ``pack_weight``."""
    if _uses_panels(dtype, device):
        return matmul_packed
    return _matmul_upcast if upcast_on_cpu(dtype, device) else F.linear


def _uses_panels(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype == torch.float32


def matmul_packed(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [M, in] @ panels [P, in, C] → [M, P * C]."""
    num_panels, _, width = packed.shape
    out = torch.matmul(x, packed)  # [P, M, C]
    return out.permute(1, 0, 2).reshape(x.shape[0], num_panels * width)


def _matmul_upcast(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 ``x @ w.T`` (``w`` row-major ``[out, in]``) computed in fp32, 1024 weight rows at a
    time (their fp32 copy stays in cache); the native kernel below 8 rows, where it is faster."""
    if x.shape[0] < _UPCAST_MIN_ROWS:
        return F.linear(x, w)
    x32 = x.float()  # [M, in]
    n_out = w.shape[0]
    out = torch.empty(x.shape[0], n_out, dtype=x.dtype, device=x.device)  # [M, out]
    for start in range(0, n_out, _UPCAST_CHUNK_ROWS):
        stop = min(start + _UPCAST_CHUNK_ROWS, n_out)
        out[:, start:stop] = F.linear(x32, w[start:stop].float())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm: normalise in fp32, cast back, then scale (HF's order of operations)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class Rotary:
    """Rotary position embedding (non-interleaved halves, as HF Llama) with Llama scaling types."""

    def __init__(self, arch: LlamaArch, device: torch.device) -> None:
        self.inv_freq = _inv_freq(arch).to(device)  # [head_dim / 2] fp32

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos, sin for ``positions`` [N] → each [N, 1, head_dim], computed in fp32 then cast."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [N, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [N, 1, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D] rotated by cos/sin [N, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _inv_freq(arch: LlamaArch) -> torch.Tensor:
    dim = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = arch.rope_scaling
    if scaling.rope_type == "linear":
        return inv / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3_inv_freq(
            inv,
            scaling.factor,
            scaling.low_freq_factor,
            scaling.high_freq_factor,
            scaling.original_max_position_embeddings,
        )
    return inv


def _llama3_inv_freq(
    inv: torch.Tensor, factor: float, low: float, high: float, old_len: int
) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths / factor, short kept, a smooth blend in between."""
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_freq_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)

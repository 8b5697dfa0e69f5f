"""Packed weights and the matmul kernels chosen per dtype."""

from __future__ import annotations

import pytest
import torch

from memserve.model.ops import (
    _matmul_upcast,
    matmul_packed,
    pack_weight,
    panel_width,
    unpack_weight,
)


@pytest.mark.parametrize("num_out", [768, 1280, 4096, 32000, 997, 64])
def test_panel_width_divides_and_prefers_512(num_out: int) -> None:
    width = panel_width(num_out)
    assert num_out % width == 0
    if num_out == 997:  # prime: one panel
        assert width == 997
    if num_out == 4096:
        assert width == 512


@pytest.mark.parametrize(("num_out", "num_in"), [(768, 256), (4096, 96), (997, 32), (64, 48)])
def test_pack_round_trip_and_matmul_equal_dense(num_out: int, num_in: int) -> None:
    gen = torch.Generator().manual_seed(num_out)
    w = torch.randn(num_out, num_in, generator=gen)
    packed = pack_weight(w)
    assert packed.shape == (num_out // panel_width(num_out), num_in, panel_width(num_out))
    assert torch.equal(unpack_weight(packed), w.t())
    for rows in (0, 1, 7, 33):
        x = torch.randn(rows, num_in, generator=gen)
        ref = (x.double() @ w.double().t()).float()
        torch.testing.assert_close(matmul_packed(x, packed), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 8, 40])
def test_upcast_matmul_is_a_bf16_gemm(rows: int) -> None:
    """bf16 in, fp32 accumulate, one rounding to bf16: within one bf16 ulp of the exact product."""
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(4096, 128, generator=gen).bfloat16()
    x = torch.randn(rows, 128, generator=gen).bfloat16()
    packed = pack_weight(w)
    assert packed.shape == w.shape  # half precision keeps the row-major checkpoint layout
    out = _matmul_upcast(x, packed)
    assert out.dtype == torch.bfloat16
    assert torch.equal(unpack_weight(packed), w.t())
    exact = x.double() @ w.double().t()
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-2).all()

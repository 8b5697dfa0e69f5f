"""Facts about the machine that pick kernels; probed once, never at import time."""

from __future__ import annotations

import functools

import torch


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AVX512-BF16 or AMX).

    Without them torch's bf16 kernels on CPU run 3-6x slower than fp32 ones (measured on an AVX2
    EPYC), so bf16 compute is done by upcasting to fp32 (see ``model.ops`` and the torch backend).
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)


def upcast_on_cpu(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether half-precision math on ``device`` should be done in fp32."""
    return (
        device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float16)
        and not cpu_has_native_bf16()
    )

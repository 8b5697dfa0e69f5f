"""Facts about the machine that pick kernels; probed once, never at import time."""

from __future__ import annotations

import ctypes
import ctypes.util
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


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the heap instead of returning it to the OS.

    A step allocates activations of tens of MiB; by default glibc serves each from a fresh mmap and
    unmaps it on free, so every step page-faults it in again: measured 26 ms for a 64 MiB tensor
    (6 ms with this), and a prefill-sized linear 190 → 152 ms. The usual remedy for PyTorch CPU
    inference is tcmalloc/jemalloc via LD_PRELOAD; this is the same effect without a preload.
    Process-wide and idempotent; returns False where glibc is not the allocator.
    """
    path = ctypes.util.find_library("c")
    if path is None:
        return False
    try:
        libc = ctypes.CDLL(path)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31)
    except (OSError, AttributeError):
        return False
    return bool(ok)

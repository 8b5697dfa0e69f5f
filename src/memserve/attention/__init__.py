"""Paged attention: the interface (``base``) and its implementations, chosen once at start-up."""

from __future__ import annotations

import torch

from memserve.attention.base import AttentionBackend, AttentionMetadata, DecodeBatch, PrefillSpan
from memserve.attention.torch_backend import TorchAttentionBackend
from memserve.hardware import upcast_on_cpu

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "DecodeBatch",
    "PrefillSpan",
    "TorchAttentionBackend",
    "select_backend",
]


def select_backend(name: str, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """``auto`` → the fastest backend that runs on ``device``; ``torch`` runs everywhere.

    The xformers backend (CUDA) is not part of this build yet: asking for it explicitly is an error
    that says so, and ``auto`` picks torch.
    """
    if name in ("auto", "torch"):
        return TorchAttentionBackend(torch.float32 if upcast_on_cpu(dtype, device) else None)
    if name == "xformers":
        raise ValueError(
            "attention backend 'xformers' is not available in this build (it needs a CUDA GPU and "
            "the 'cuda' extra); use --attention-backend torch or auto"
        )
    raise ValueError(f"unknown attention backend {name!r}; choose auto, torch or xformers")

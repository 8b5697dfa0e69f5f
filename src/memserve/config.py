"""Frozen configuration objects, one per component, validated on construction.

Each component receives only its own section. ``cli.py`` turns flags into these objects; nothing
else reads the command line or the environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["colocated", "prefill", "decode", "scheduler"]
DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
AttentionBackendName = Literal["auto", "torch", "xformers"]
LogFormat = Literal["console", "json"]

ROLES: tuple[Role, ...] = ("colocated", "prefill", "decode", "scheduler")
DTYPES: tuple[DTypeName, ...] = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how: ``model`` is a Hugging Face directory or ``dummy:<preset>``."""

    model: str
    dtype: DTypeName = "auto"
    device: str = "cpu"
    seed: int = 0
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    served_model_name: str | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be a directory or dummy:<preset>")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")

    @property
    def name(self) -> str:
        """The model id clients use in the ``model`` field."""
        return self.served_model_name or self.model


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: ``block_size`` tokens per block; memory in GiB, or a fraction of free GPU memory.

    ``kv_cache_memory`` > 1 is GiB; 0 < value <= 1 is a fraction of free device memory (CUDA only;
    on CPU a fraction is taken of available system memory). ``num_blocks`` overrides both (tests).
    """

    block_size: int = 16
    kv_cache_memory: float = 1.0
    num_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory <= 0:
            raise ValueError("kv_cache_memory must be > 0")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")


@dataclass(frozen=True)
class SchedulerConfig:
    """Iteration-level batching limits.

    ``max_num_batched_tokens``: token budget of one step (prefill chunks + decodes).
    ``max_num_seqs``: requests running at once. ``max_waiting_requests``: queue length past which new
    requests are refused with 503.
    """

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_waiting_requests: int = 1024

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_waiting_requests < 0:
            raise ValueError("max_waiting_requests must be >= 0")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    log_format: LogFormat = "console"
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        if self.log_format not in ("console", "json"):
            raise ValueError("log_format must be console or json")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    attention_backend: AttentionBackendName = "auto"

    def __post_init__(self) -> None:
        if self.attention_backend not in ("auto", "torch", "xformers"):
            raise ValueError(f"unknown attention backend {self.attention_backend!r}")

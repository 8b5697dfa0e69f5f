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
    """Paged KV cache: ``block_size`` tokens per block, sized by exactly one of three knobs.

    ``num_blocks`` (tests) wins over ``memory_gib`` (GiB), which wins over ``memory_fraction``
    (fraction of free device memory after the weights, CUDA only). With none set: 1 GiB on CPU,
    0.85 of free memory on CUDA.

    Prefix caching keeps finished requests' KV as historical blocks indexed by the prompt tree
    (``enable_prefix_caching``). The host-DRAM tier takes cold cached blocks instead of dropping
    them: ``dram_num_blocks`` (tests) wins over ``dram_gib``; with neither set, 4 GiB on CUDA
    (pinned) and none on CPU, where device memory is DRAM already. 0 disables the tier.
    """

    block_size: int = 16
    memory_gib: float | None = None
    memory_fraction: float | None = None
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    dram_gib: float | None = None
    dram_num_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.memory_gib is not None and self.memory_gib <= 0:
            raise ValueError("kv cache memory must be > 0 GiB")
        if self.memory_fraction is not None and not 0 < self.memory_fraction <= 1:
            raise ValueError("kv cache fraction must be in (0, 1]")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        if self.dram_gib is not None and self.dram_gib < 0:
            raise ValueError("DRAM cache memory must be >= 0 GiB")
        if self.dram_num_blocks is not None and self.dram_num_blocks < 0:
            raise ValueError("dram_num_blocks must be >= 0")


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


PDCaching = Literal["basic", "prefill", "both", "full"]
PD_CACHING: tuple[PDCaching, ...] = ("basic", "prefill", "both", "full")
TransferMode = Literal["by-request", "by-layer"]
TRANSFER_MODES: tuple[TransferMode, ...] = ("by-request", "by-layer")


@dataclass(frozen=True)
class DisaggConfig:
    """Prefill/decode disaggregation: the paper's four stages are one workflow, configured.

    ``pd_caching``: ``basic`` (PD-Basic: nothing is kept), ``prefill`` (PD-Caching-1: the prefill
    instance keeps prompts' KV), ``both`` (PD-Caching-2: the decode instance also keeps what it
    received and generated, and is sent only the KV it lacks), ``full`` (PD-Caching-3: the decode
    instance also sends the generated tokens' KV back to the prefill instance at the end).
    ``transfer_mode``: ``by-request`` sends a request's KV in one call once its prefill is done;
    ``by-layer`` streams each layer as the prefill's last step computes it (the decode side
    posts its receives up front, so they wait up to ``transfer_timeout_s`` for the prefill).
    ``rendezvous``: ``host:port`` of the TCPStore every instance pairs through; this instance
    hosts it when ``host_rendezvous``. ``transfer_timeout_s`` bounds every send, receive and
    control call; a peer whose heartbeat stops for ``peer_timeout_s`` is gone.
    """

    rendezvous: str
    instance_id: str
    host_rendezvous: bool = False
    pd_caching: PDCaching = "full"
    transfer_mode: TransferMode = "by-request"
    transfer_timeout_s: float = 30.0
    peer_timeout_s: float = 3.0

    def __post_init__(self) -> None:
        if self.pd_caching not in PD_CACHING:
            raise ValueError(f"pd_caching must be one of {PD_CACHING}, got {self.pd_caching!r}")
        host, port = self.rendezvous_address
        if not host or not 0 < port < 65536:
            raise ValueError(f"rendezvous must be host:port, got {self.rendezvous!r}")
        if not self.instance_id or any(c in self.instance_id for c in "@>/ "):
            raise ValueError(
                f"instance id must be non-empty without '@>/ ', got {self.instance_id!r}"
            )
        if self.transfer_mode not in TRANSFER_MODES:
            raise ValueError(f"transfer_mode must be one of {TRANSFER_MODES}")
        if self.transfer_timeout_s <= 0 or self.peer_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")

    @property
    def rendezvous_address(self) -> tuple[str, int]:
        """(host, port); port -1 when ``rendezvous`` has none."""
        host, _, port = self.rendezvous.rpartition(":")
        return host, int(port) if port.isdigit() else -1

    @property
    def prefill_keeps(self) -> bool:
        """The prefill instance caches prompts (prefix caching on there)."""
        return self.pd_caching != "basic"

    @property
    def decode_keeps(self) -> bool:
        """The decode instance caches what it received and generated; transfers are deltas."""
        return self.pd_caching in ("both", "full")

    @property
    def send_back(self) -> bool:
        """The decode instance sends the generated tokens' KV back to the prefill instance."""
        return self.pd_caching == "full"


@dataclass(frozen=True)
class RouterConfig:
    """The global scheduler (``--role scheduler``).

    ``policy``: ``round_robin``, ``least_load``, ``session`` or ``prompt_tree`` (MemServe's).
    ``tree_ttl_s``: how long the global prompt trees believe an instance holds a prefix it was
    seen with (instances do not report evictions). ``tree_max_blocks``: size bound of the trees
    (one structure shared by the roles; LRU pruning past it). ``cost_profile``: a ``memserve-node profile`` JSON file (None:
    built-in rough defaults, refined online from the instances' step times). ``rendezvous``:
    ``host:port`` of the TCPStore the scheduler hosts for its instances' KV transfers.
    ``dead_after_s``: an instance silent this long is dropped. ``max_attempts``: instances a
    request is offered to when it fails before any output (re-dispatch).
    """

    rendezvous: str
    policy: str = "prompt_tree"
    tree_ttl_s: float = 300.0
    tree_max_blocks: int = 1 << 20
    cost_profile: str | None = None
    dead_after_s: float = 3.0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if self.tree_ttl_s <= 0 or self.tree_max_blocks < 1 or self.dead_after_s <= 0:
            raise ValueError("tree_ttl_s, tree_max_blocks and dead_after_s must be positive")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        host, _, port = self.rendezvous.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"rendezvous must be host:port, got {self.rendezvous!r}")

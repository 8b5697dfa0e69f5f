"""Replay of a Mooncake request trace (``../shared/traces``, see its README), scaled down.

Each trace request becomes a session of one turn (``history=False``) whose ``prefix`` is its
prompt and whose ``new_tokens`` are empty. The prompt is rebuilt from the request's ``hash_ids``:

- ``token_scale`` divides the 512-token block size and every length: a block has
  ``block_tokens = 512 // token_scale`` tokens (``token_scale`` must divide 512);
- hash id ``h`` maps to a fixed pseudo-random block, seeded by ``(seed, h)``: equal ids give equal
  tokens, so the cache sees exactly the sharing the trace recorded;
- the prompt has ``ceil(input_length / token_scale)`` tokens: its blocks, the last one cut
  (``len(hash_ids) == ceil(input_length / 512)`` holds in the traces, so no block goes empty)::

      hash_ids  [ h0        | h1        | h2   ]
      tokens    [ B tokens  | B tokens  | rest ]   rest = num_tokens - 2 * B, in 1..B

- ``max_tokens = max(1, output_length // token_scale)``;
- arrivals: a contiguous window of ``num_requests`` requests from index ``start`` (never a random
  sample: that destroys the reuse); ``arrival_s = (timestamp - window's first timestamp) / 1000
  * time_scale``. Alternatively ``rate`` (requests/s) picks ``time_scale`` so that the window's
  mean offered rate is ``rate``; giving both is an error.

The trace file: ``path``, else ``$MEMSERVE_TRACES/{trace}_trace.jsonl``, else
``{trace}_trace.jsonl`` in ``shared/traces`` beside the repository (``<repo>/../shared/traces``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from memserve.bench.workloads.base import TOKEN_RANGE, Session, Turn, Workload

TRACE_BLOCK_TOKENS = 512  # the traces' block size


@dataclass(frozen=True)
class TraceRequest:
    timestamp_ms: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def make(
    num_requests: int,
    seed: int,
    rate: float | None = None,
    *,
    trace: str = "conversation",
    path: str | Path | None = None,
    start: int = 0,
    token_scale: int = 32,
    time_scale: float | None = None,
    max_model_len: int | None = None,
) -> Workload:
    """Requests ``start .. start + num_requests`` of the trace (see the module docstring).

    ``token_scale=32`` follows the traces' README (512 -> 16 tokens per block); ``time_scale``
    defaults to 1 (real time). ``max_model_len``, if given, makes every request fit: its output is
    cut to at most half of it, then its prompt's tail to the rest (prefixes stay shared; only the
    cut tails' reuse is lost, so say so in results).
    Raises ``FileNotFoundError`` if the trace is missing, ``ValueError`` on bad parameters."""
    if token_scale < 1 or TRACE_BLOCK_TOKENS % token_scale:
        raise ValueError(f"trace: token_scale {token_scale} must divide {TRACE_BLOCK_TOKENS}")
    if max_model_len is not None and max_model_len < 2:
        raise ValueError(f"trace: max_model_len must be >= 2, got {max_model_len}")
    if rate is not None and time_scale is not None:
        raise ValueError("trace: give rate or time_scale, not both")
    requests = load_trace(resolve_path(trace, path))[max(start, 0) : start + num_requests]
    if start < 0 or len(requests) < num_requests:
        raise ValueError(f"trace: window {start}+{num_requests} is outside the trace")
    scale = _time_scale(requests, rate) if time_scale is None else time_scale
    if scale <= 0:
        raise ValueError(f"trace: time_scale must be > 0, got {scale}")
    blocks = BlockTokens(seed, TRACE_BLOCK_TOKENS // token_scale)
    t0 = requests[0].timestamp_ms if requests else 0
    sessions = []
    for i, r in enumerate(requests):
        num_tokens = math.ceil(r.input_length / token_scale)
        max_tokens = max(1, r.output_length // token_scale)
        if max_model_len is not None:
            max_tokens = min(max_tokens, max_model_len // 2)
            num_tokens = min(num_tokens, max_model_len - max_tokens)
        prompt = tuple(itertools.chain.from_iterable(map(blocks, r.hash_ids)))[:num_tokens]
        arrival_s = (r.timestamp_ms - t0) / 1000 * scale
        sessions.append(
            Session(
                f"trace-{start + i:05d}", arrival_s, prompt, (Turn((), max_tokens),), history=False
            )
        )
    return Workload(f"trace:{trace}", tuple(sessions))


class BlockTokens:
    """Hash id -> its block of ``block_tokens`` token ids, fixed by ``(seed, hash_id)``.

    BLAKE2b in counter mode (16 ids per 64-byte digest, each a 32-bit word mod the range width):
    ~3 us a block, against ~7 us just to seed a ``random.Random``; the modulo bias is < 1e-5."""

    def __init__(self, seed: int, block_tokens: int) -> None:
        self.seed, self.block_tokens = seed, block_tokens
        self._blocks: dict[int, tuple[int, ...]] = {}

    def __call__(self, hash_id: int) -> tuple[int, ...]:
        block = self._blocks.get(hash_id)
        if block is None:
            block = self._blocks[hash_id] = self._draw(hash_id)
        return block

    def _draw(self, hash_id: int) -> tuple[int, ...]:
        low, high = TOKEN_RANGE
        ids: list[int] = []
        for counter in range(-(-self.block_tokens // 16)):
            key = f"{self.seed}:{hash_id}:{counter}".encode()
            words = struct.unpack("<16I", hashlib.blake2b(key, digest_size=64).digest())
            ids += (low + w % (high - low) for w in words)
        return tuple(ids[: self.block_tokens])


def resolve_path(trace: str, path: str | Path | None) -> Path:
    """The trace file to read (see the module docstring); ``FileNotFoundError`` if missing."""
    if path is None:
        env = os.environ.get("MEMSERVE_TRACES")
        repo = Path(__file__).resolve().parents[4]
        folder = Path(env) if env else repo.parent / "shared" / "traces"
        path = folder / f"{trace}_trace.jsonl"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"trace file {path} not found: pass path=..., or set MEMSERVE_TRACES to the folder "
            "holding the Mooncake traces (see shared/traces/README.md)"
        )
    return path


def load_trace(path: Path) -> list[TraceRequest]:
    """Every request of a Mooncake JSONL trace, in file (arrival) order."""
    with path.open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [
        TraceRequest(r["timestamp"], r["input_length"], r["output_length"], tuple(r["hash_ids"]))
        for r in rows
    ]


def _time_scale(requests: list[TraceRequest], rate: float | None) -> float:
    """1, or the factor that makes the window's mean arrival rate ``rate`` requests/s."""
    if rate is None or len(requests) < 2:
        return 1.0
    span_s = (requests[-1].timestamp_ms - requests[0].timestamp_ms) / 1000
    if rate <= 0 or span_s <= 0:
        raise ValueError(f"trace: cannot set rate {rate} on a window spanning {span_s} s")
    return (len(requests) - 1) / span_s / rate

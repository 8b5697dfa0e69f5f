"""MemPool micro-benchmarks: cost of the memory calls per block, and of ``match`` / ``insert``.

Two tables, medians over ``--repeats`` runs, next to the paper's figures:

- **memory calls** on a pool shaped like ``--model`` at ``--dtype`` (one block = all layers, K and V,
  ``block_size`` tokens): ``alloc_mem`` + ``free_mem`` of n fresh blocks, ``share_mem`` of n held
  blocks, ``swap_out`` of an n-block cached prompt to DRAM and ``swap_in`` of it back, data copy
  included (both tiers are CPU tensors here), next to a plain contiguous ``copy_`` of the same bytes
  (the copy's ceiling on this machine). The same calls on a 128-byte block separate the bookkeeping
  from the copy, and ``swap_out`` of 128-byte blocks from a tree holding ``--population`` prompts
  shows what choosing the victims costs (LRU heaps: it must not grow with the tree). Paper: about
  0.8 µs per block.
- **index**: ``match`` and ``insert`` of a 4K-token prompt whose first 0/25/50/75/100 % is cached,
  on a tree that already holds ``--population`` other prompts (some sharing long documents).
  ``insert`` gets the block table the engine would pass: the matched blocks, then fresh ones.
  Paper: at most about 0.7 ms, flat in the cached ratio.

    .venv/bin/python benchmarks/mempool_micro.py [--repeats 200] [--batch-sizes 1,16,256] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from memserve.hardware import keep_freed_memory
from memserve.mempool.kv_cache import KVCache
from memserve.mempool.pool import MemPool, Tier
from memserve.model.arch import PRESETS
from memserve.tree.radix import Match

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
PAPER_MEMORY_US_PER_BLOCK = 0.8
PAPER_INDEX_MS = 0.7
VOCAB_SIZE = 32000


@dataclass(frozen=True)
class Layout:
    """The shape of one KV block: ``[num_layers, 2, block_size, num_kv_heads, head_dim]``."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int

    @property
    def num_bytes_per_block(self) -> int:
        return KVCache.bytes_per_block(
            self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype
        )

    def cache(self, num_blocks: int) -> KVCache:
        cache = KVCache(
            num_blocks,
            self.num_layers,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
            self.dtype,
            torch.device("cpu"),
        )
        cache.data.fill_(1)  # touch every page now, not inside a timed copy
        return cache


@dataclass(frozen=True)
class MemoryRow:
    call: str
    layout: str
    num_bytes_per_block: int
    batch: int
    us_per_call: float  # median
    us_per_block: float  # median per call / batch
    gb_per_s: float  # bytes copied per second (0 for calls that copy nothing)


@dataclass(frozen=True)
class IndexRow:
    cached_percent: int
    prompt_tokens: int
    population: int
    tree_blocks: int
    match_ms: float  # median
    insert_ms: float  # median
    match_ms_p90: float
    insert_ms_p90: float


def model_layout(model: str, dtype: str, block_size: int) -> Layout:
    arch = PRESETS[model.removeprefix("dummy:")]
    return Layout(
        f"{model} {dtype}",
        arch.num_layers,
        arch.num_kv_heads,
        arch.head_dim,
        _DTYPES[dtype],
        block_size,
    )


def index_only_layout(block_size: int) -> Layout:
    """One layer, one head of size 1: 128-byte blocks, so a swap is its bookkeeping."""
    return Layout("index-only float32", 1, 1, 1, torch.float32, block_size)


def _median_us(samples_ns: list[int]) -> float:
    return statistics.median(samples_ns) / 1e3


def _timed(fn: Callable[[], object]) -> int:
    start = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - start


def _random_tokens(rng: random.Random, num_tokens: int) -> list[int]:
    return [rng.randrange(3, VOCAB_SIZE) for _ in range(num_tokens)]


# ---- memory calls ------------------------------------------------------------------------------


def bench_alloc_free(pool: MemPool, batch: int, repeats: int) -> list[int]:
    """One sample = ``alloc_mem(batch)`` + ``free_mem`` of those blocks (free-list path)."""

    def once() -> None:
        pool.free_mem(pool.alloc_mem(batch))

    return [_timed(once) for _ in range(repeats)]


def bench_share(pool: MemPool, batch: int, repeats: int) -> list[int]:
    """One sample = ``share_mem`` of ``batch`` held blocks (the extra references are then freed)."""
    block_ids = pool.alloc_mem(batch)
    samples = []
    for _ in range(repeats):
        samples.append(_timed(lambda: pool.share_mem(block_ids)))
        pool.free_mem(block_ids)
    pool.free_mem(block_ids)
    return samples


def bench_plain_copy(layout: Layout, batch: int, repeats: int) -> list[int]:
    """One sample = ``copy_`` of ``batch`` whole blocks between two contiguous tensors: the
    bandwidth a swap (gather + scatter between tiers) can at best reach."""
    src, dst = layout.cache(batch).data, layout.cache(batch).data
    return [_timed(lambda: dst.copy_(src)) for _ in range(repeats)]


def bench_swap(pool: MemPool, batch: int, repeats: int) -> tuple[list[int], list[int]]:
    """Samples of ``swap_out(batch)`` and ``swap_in`` of one cached ``batch``-block prompt, the only
    one in the tree."""
    tokens = _random_tokens(random.Random(batch), batch * pool.block_size)
    block_ids = pool.alloc_mem(batch)
    pool.insert(tokens, block_ids)
    pool.free_mem(block_ids)  # the tree's reference remains: a historical prompt
    outs, ins = [], []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        moved = pool.swap_out(batch)
        outs.append(time.perf_counter_ns() - start)
        node = pool.match(tokens).node
        pool.lock(node)
        start = time.perf_counter_ns()
        moved_in = pool.swap_in(node)
        ins.append(time.perf_counter_ns() - start)
        pool.unlock(node)
        if moved != batch or moved_in != batch:
            raise AssertionError(f"swapped {moved} out and {moved_in} in, expected {batch}")
    pool.delete(tokens[: pool.block_size])
    return outs, ins


def bench_memory(layout: Layout, batches: list[int], repeats: int) -> list[MemoryRow]:
    num_blocks = 2 * max(batches)
    pool = MemPool(layout.cache(num_blocks), layout.cache(num_blocks))
    rows = []
    for batch in batches:
        bench_swap(pool, batch, 2)  # warm-up: first touches of the index tensors, allocator paths
        swap_out, swap_in = bench_swap(pool, batch, repeats)
        samples = {
            "alloc_mem + free_mem": bench_alloc_free(pool, batch, repeats),
            "share_mem": bench_share(pool, batch, repeats),
            "swap_out": swap_out,
            "swap_in": swap_in,
            "plain copy (ceiling)": bench_plain_copy(layout, batch, repeats),
        }
        for call, ns in samples.items():
            us = _median_us(ns)
            copied = batch * layout.num_bytes_per_block if "copy" in call or "swap" in call else 0
            rows.append(
                MemoryRow(
                    call, layout.name, layout.num_bytes_per_block, batch, us, us / batch,
                    copied / us / 1e3,
                )
            )  # fmt: skip
            print(_format_memory(rows[-1]), flush=True)
    pool.check_integrity()
    return rows


def bench_swap_out_populated(
    batches: list[int], population: int, repeats: int, block_size: int
) -> list[MemoryRow]:
    """``swap_out(batch)`` of 128-byte blocks from a tree of ``population`` historical prompts:
    each call moves the coldest ``batch`` blocks to DRAM (a fresh part of the tree each time)."""
    layout = index_only_layout(block_size)
    num_blocks = (population + 1) * 8192 // block_size
    pool = MemPool(layout.cache(num_blocks), layout.cache(num_blocks))
    populate(pool, random.Random(0), population)
    name = f"swap_out, {population} prompts"
    rows = []
    for batch in batches:
        ns = [_timed(lambda: pool.swap_out(batch)) for _ in range(repeats)]  # noqa: B023
        us = _median_us(ns)
        rows.append(
            MemoryRow(name, layout.name, layout.num_bytes_per_block, batch, us, us / batch, 0)
        )
        print(_format_memory(rows[-1]), flush=True)
    pool.check_integrity()
    return rows


# ---- index: match and insert ------------------------------------------------------------------


def populate(pool: MemPool, rng: random.Random, population: int) -> None:
    """``population`` historical prompts of 512-8192 tokens; 70 % start with one of 8 shared
    documents of 1-2K tokens (what makes the tree branch as a serving tree does)."""
    bs = pool.block_size
    documents = [_random_tokens(rng, rng.randrange(1024, 2049, bs)) for _ in range(8)]
    for _ in range(population):
        num_tokens = rng.randrange(512, 8193, bs)
        head = rng.choice(documents) if rng.random() < 0.7 else []
        tokens = (head + _random_tokens(rng, num_tokens))[:num_tokens]
        _insert_historical(pool, tokens)


def _insert_historical(pool: MemPool, tokens: list[int]) -> None:
    block_ids = pool.alloc_mem(len(tokens) // pool.block_size)
    pool.insert(tokens, block_ids)
    pool.free_mem(block_ids)


def bench_index(
    percents: list[int], population: int, repeats: int, block_size: int
) -> list[IndexRow]:
    prompt_tokens = 4096
    rng = random.Random(0)
    capacity = (population + 4) * 8192 // block_size
    pool = MemPool(index_only_layout(block_size).cache(capacity))
    populate(pool, rng, population)
    base = _random_tokens(rng, prompt_tokens)
    _insert_historical(pool, base)
    gc.collect()
    rows = []
    for percent in percents:
        num_cached = prompt_tokens * percent // 100 // block_size * block_size
        match_ns, insert_ns = [], []
        for _ in range(repeats + 1):  # the first run is a warm-up
            tokens = base[:num_cached] + _random_tokens(rng, prompt_tokens - num_cached)
            m, t_match = _timed_match(pool, tokens)
            if m.num_tokens != num_cached:
                raise AssertionError(f"matched {m.num_tokens} tokens, expected {num_cached}")
            new_ids = pool.alloc_mem((prompt_tokens - num_cached) // block_size)
            table = [ref.block_id for ref in m.blocks] + new_ids
            insert_ns.append(_timed(lambda: pool.insert(tokens, table)))  # noqa: B023
            match_ns.append(t_match)
            if num_cached < prompt_tokens:  # drop the new part again: the tree stays the same
                pool.delete(tokens[: num_cached + block_size])
            pool.free_mem(new_ids)
        rows.append(_index_row(percent, pool, population, match_ns[1:], insert_ns[1:]))
        print(_format_index(rows[-1]), flush=True)
    pool.check_integrity()
    return rows


def _timed_match(pool: MemPool, tokens: list[int]) -> tuple[Match, int]:
    start = time.perf_counter_ns()
    m = pool.match(tokens)
    return m, time.perf_counter_ns() - start


def _index_row(
    percent: int, pool: MemPool, population: int, match_ns: list[int], insert_ns: list[int]
) -> IndexRow:
    def p90(ns: list[int]) -> float:
        return sorted(ns)[int(0.9 * (len(ns) - 1))] / 1e6

    return IndexRow(
        percent,
        4096,
        population,
        pool.tree.num_blocks(Tier.DEVICE),
        statistics.median(match_ns) / 1e6,
        statistics.median(insert_ns) / 1e6,
        p90(match_ns),
        p90(insert_ns),
    )


# ---- output ------------------------------------------------------------------------------------


def _format_memory(r: MemoryRow) -> str:
    copy = f"{r.gb_per_s:6.2f} GB/s" if r.gb_per_s else " " * 11
    return (
        f"memory | {r.call:22} | {r.layout:24} | {r.num_bytes_per_block:>8} B/block | "
        f"batch {r.batch:>4} | {r.us_per_call:10.2f} µs/call | {r.us_per_block:9.3f} µs/block | "
        f"{copy} | paper {PAPER_MEMORY_US_PER_BLOCK} µs/block"
    )


def _format_index(r: IndexRow) -> str:
    return (
        f"index  | cached {r.cached_percent:>3} % of {r.prompt_tokens} tokens | tree "
        f"{r.population} prompts, {r.tree_blocks} blocks | match {r.match_ms:7.4f} ms "
        f"(p90 {r.match_ms_p90:7.4f}) | insert {r.insert_ms:7.4f} ms (p90 {r.insert_ms_p90:7.4f})"
        f" | paper <= {PAPER_INDEX_MS} ms"
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="dummy:small", help="dummy preset whose KV layout to use")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 16, 256], help="blocks per call")
    p.add_argument("--percents", type=_ints, default=[0, 25, 50, 75, 100], help="cached ratios")
    p.add_argument("--population", type=int, default=300, help="other prompts in the tree")
    p.add_argument("--repeats", type=int, default=200, help="samples per figure (median kept)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="a toy run (smoke test)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args()
    if args.quick:
        args.batch_sizes, args.population, args.repeats = [1, 16], 10, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the engine does on CPU: staging buffers do not page-fault each call
    print(
        f"# {platform.processor() or platform.machine()} | torch {torch.__version__} | "
        f"threads {torch.get_num_threads()} | block_size {args.block_size} | repeats {args.repeats} | medians"
    )
    layouts = [model_layout(args.model, args.dtype, args.block_size)]
    layouts.append(index_only_layout(args.block_size))
    memory = [r for layout in layouts for r in bench_memory(layout, args.batch_sizes, args.repeats)]
    memory += bench_swap_out_populated(
        args.batch_sizes, args.population, args.repeats, args.block_size
    )
    index = bench_index(args.percents, args.population, args.repeats, args.block_size)
    if args.json:
        args.json.write_text(
            json.dumps({"memory": [asdict(r) for r in memory], "index": [asdict(r) for r in index]})
        )


if __name__ == "__main__":
    main()

"""Routing decision latency: one ``Policy.choose`` over 64 registered instances whose global
prompt trees index about ``--cached-tokens`` tokens (target: P99 under 100 µs).

Clusters, 64 instances each: ``colocated-64``; ``32P+32D`` (1024 prefill/decode pairs);
``mixed`` (16 colocated + 24 prefill + 24 decode).

Trees (block size 16): ``--documents`` shared documents of 1-4K tokens, and sessions, each a
document followed by 1-8 turns of 64-512 tokens; every turn's prompt is inserted under the
instance that served it (P/D: its prefill instance in the prefill tree, its decode instance in
the decode tree), and each document under 4 random instances, until the trees hold the target.

Requests, drawn like the workload: 50 % the next turn of a known session (long hit), 30 % a new
session on a known document (document hit), 20 % unrelated prompts of 256-4K tokens (miss).
Loads (queued_s, running, waiting, pending prefill tokens, inflight) are random, one of 32
snapshots per request. Cost model: an analytic stand-in (the policies call it; its own cost is
part of the figure). Also timed: the tree matches alone (one per tree a decision needs).
Figures: the median over ``--rounds`` rounds of each round's p50 / p99 / max, in wall-clock
time (``perf_counter_ns``) and in this thread's CPU time (``thread_time_ns``, which leaves out
time the process was preempted: on a shared machine the wall-clock tail is other processes').

    .venv/bin/python benchmarks/routing_latency.py [--requests 3000] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from memserve.scheduler.policy import POLICIES, make_policy
from memserve.scheduler.types import (
    InstanceView,
    Load,
    RouteRequest,
    Trees,
    make_trees,
    tree_blocks,
)

BLOCK_SIZE = 16
VOCAB_SIZE = 32000
CLUSTERS = {"colocated-64": (64, 0, 0), "32P+32D": (0, 32, 32), "mixed": (16, 24, 24)}


class AnalyticCost:
    """Seconds for a 13B-class model on one GPU (rough): linear + quadratic prefill, a decode
    step growing with batch and context, KV at 800 KiB per token over 25 GB/s."""

    def prefill_time(self, num_tokens: int, num_cached: int) -> float:
        new = num_tokens - num_cached
        return 2e-3 + 1.2e-4 * new + 1e-9 * (num_tokens**2 - num_cached**2)

    def decode_step_time(self, batch: int, context_tokens: int) -> float:
        return 0.02 + 1e-4 * batch + 5e-8 * context_tokens

    def transfer_time(self, num_tokens: int) -> float:
        return 1e-4 + num_tokens * 800 * 1024 / 25e9


@dataclass(frozen=True)
class Row:
    cluster: str
    policy: str  # or "match only"
    requests: int  # timed decisions per round
    cached_tokens: int  # indexed by all trees together
    p50_us: float  # wall clock (perf_counter_ns)
    p99_us: float
    max_us: float
    cpu_p50_us: float  # this thread's CPU time (thread_time_ns): without preemption by others
    cpu_p99_us: float


@dataclass
class Workload:
    documents: list[list[int]]
    sessions: list[list[int]]  # each session's latest prompt


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB_SIZE) for _ in range(n)]


def build_cluster(
    shape: tuple[int, int, int], cached_tokens: int, num_documents: int, rng: random.Random
) -> tuple[list[InstanceView], Trees, Workload]:
    num_c, num_p, num_d = shape
    ids = {
        "colocated": [f"c{i:02}" for i in range(num_c)],
        "prefill": [f"p{i:02}" for i in range(num_p)],
        "decode": [f"d{i:02}" for i in range(num_d)],
    }
    views = [InstanceView(i, role) for role, role_ids in ids.items() for i in role_ids]
    trees = make_trees(BLOCK_SIZE, 1e9, 1 << 30)  # as the scheduler builds them: one, shared
    docs = [_tokens(rng, rng.randrange(1024, 4097)) for _ in range(num_documents)]
    work = Workload(docs, [])
    for doc in docs:
        for v in rng.sample(views, 4):
            trees[v.role].insert(doc, v.instance_id, 0.0)

    def indexed() -> int:
        return tree_blocks(trees) * BLOCK_SIZE

    while indexed() < cached_tokens:
        prompt = list(rng.choice(docs))
        plan = _random_plan(ids, rng)
        for _ in range(rng.randrange(1, 9)):
            prompt += _tokens(rng, rng.randrange(64, 513))
            for role, instance_id in plan:
                trees[role].insert(prompt, instance_id, 0.0)
        work.sessions.append(prompt)
    return views, trees, work


def _random_plan(ids: dict[str, list[str]], rng: random.Random) -> list[tuple[str, str]]:
    """A colocated instance or a (prefill, decode) pair, as (role, id)s."""
    num_plans = len(ids["colocated"]) + (len(ids["prefill"]) if ids["decode"] else 0)
    if rng.randrange(num_plans) < len(ids["colocated"]):
        return [("colocated", rng.choice(ids["colocated"]))]
    return [("prefill", rng.choice(ids["prefill"])), ("decode", rng.choice(ids["decode"]))]


def draw_requests(work: Workload, num: int, rng: random.Random) -> list[RouteRequest]:
    out = []
    for i in range(num):
        r = rng.random()
        if r < 0.5:
            tokens = rng.choice(work.sessions) + _tokens(rng, rng.randrange(64, 513))
        elif r < 0.8:
            tokens = rng.choice(work.documents) + _tokens(rng, rng.randrange(64, 513))
        else:
            tokens = _tokens(rng, rng.randrange(256, 4097))
        out.append(RouteRequest(tokens, session=f"s{i % 500}"))
    return out


def load_snapshots(views: list[InstanceView], rng: random.Random) -> list[list[InstanceView]]:
    snapshots = []
    for _ in range(32):
        snapshot = []
        for v in views:
            busy = rng.random() < 0.7
            load = Load(
                running=rng.randrange(0, 64) if busy else 0,
                waiting=rng.randrange(0, 8) if busy else 0,
                pending_prefill_tokens=rng.randrange(0, 8192) if busy else 0,
            )
            queued_s = rng.uniform(0, 2.0) if busy else 0.0
            snapshot.append(InstanceView(v.instance_id, v.role, load, queued_s, load.running))
        snapshots.append(snapshot)
    return snapshots


Samples = tuple[list[int], list[int]]  # (wall ns, CPU ns) per decision


def _summary(cluster: str, name: str, rounds: list[Samples], cached_tokens: int) -> Row:
    """Each figure is the median over rounds of that round's percentile (noise on a shared
    machine comes in bursts longer than a round of one policy)."""

    def median(q: float, which: int) -> float:
        return statistics.median(_percentile(r[which], q) for r in rounds) / 1e3

    return Row(
        cluster, name, len(rounds[0][0]), cached_tokens, median(0.5, 0), median(0.99, 0),
        median(1.0, 0), median(0.5, 1), median(0.99, 1),
    )  # fmt: skip


def _percentile(samples: list[int], q: float) -> int:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def bench_policy(
    name: str,
    requests: Sequence[RouteRequest],
    snapshots: list[list[InstanceView]],
    trees: Trees,
) -> Samples:
    policy = make_policy(name, AnalyticCost())
    wall, cpu = [], []
    for i, request in enumerate(requests):
        instances = snapshots[i % len(snapshots)]
        start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
        policy.choose(request, instances, trees, 1.0)
        cpu.append(time.thread_time_ns() - start_cpu)
        wall.append(time.perf_counter_ns() - start)
    return wall, cpu


def bench_match(requests: Sequence[RouteRequest], trees: Trees, roles: list[str]) -> Samples:
    wall, cpu = [], []
    for request in requests:
        start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
        for role in roles:
            trees[role].match(request.tokens, 1.0)
        cpu.append(time.thread_time_ns() - start_cpu)
        wall.append(time.perf_counter_ns() - start)
    return wall, cpu


def bench_cluster(
    cluster: str,
    cached_tokens: int,
    num_documents: int,
    num_requests: int,
    num_rounds: int,
    seed: int,
) -> list[Row]:
    rng = random.Random(seed)
    shape = CLUSTERS[cluster]
    views, trees, work = build_cluster(shape, cached_tokens, num_documents, rng)
    indexed = tree_blocks(trees) * BLOCK_SIZE
    requests = draw_requests(work, num_requests, rng)
    snapshots = load_snapshots(views, rng)
    roles = [role for role, n in zip(("colocated", "prefill", "decode"), shape, strict=True) if n]
    roles = list({id(trees[role]): role for role in roles}.values())  # each tree matched once
    mean_tokens = sum(len(r.tokens) for r in requests) / len(requests)
    print(f"# {cluster}: {shape[0]} colocated, {shape[1]} prefill, {shape[2]} decode | "
          f"prompts {mean_tokens:.0f} tokens on average")  # fmt: skip
    warm = requests[: max(1, num_requests // 20)]
    samples: dict[str, list[Samples]] = {name: [] for name in [*POLICIES, "match only"]}
    for _ in range(num_rounds):
        for name, rounds in samples.items():
            gc.collect()
            if name == "match only":
                bench_match(warm, trees, roles)
                rounds.append(bench_match(requests, trees, roles))
            else:
                bench_policy(name, warm, snapshots, trees)
                rounds.append(bench_policy(name, requests, snapshots, trees))
    rows = [_summary(cluster, name, rounds, indexed) for name, rounds in samples.items()]
    for row in rows:
        print(_format(row), flush=True)
    return rows


def _format(r: Row) -> str:
    return (
        f"{r.cluster:12} | {r.policy:11} | {r.requests:>5} requests | trees {r.cached_tokens:>8} "
        f"tokens | p50 {r.p50_us:6.1f} µs | p99 {r.p99_us:7.1f} µs | max {r.max_us:8.1f} µs | "
        f"CPU p50 {r.cpu_p50_us:6.1f} µs | p99 {r.cpu_p99_us:6.1f} µs"
    )


def main(argv: Sequence[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--clusters", default=",".join(CLUSTERS), help="comma-separated, of: %(default)s"
    )
    p.add_argument("--cached-tokens", type=int, default=1 << 20, help="tokens indexed by all trees")
    p.add_argument("--documents", type=int, default=64, help="shared documents")
    p.add_argument("--requests", type=int, default=3000, help="timed decisions per policy")
    p.add_argument("--rounds", type=int, default=5, help="rounds per policy (medians kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a toy run (smoke test)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.quick:
        args.cached_tokens, args.documents, args.requests, args.rounds = 50_000, 4, 40, 1
    print(
        f"# {platform.processor() or platform.machine()} | python {platform.python_version()} | "
        f"block_size {BLOCK_SIZE} | 64 instances | per decision, medians of {args.rounds} rounds"
    )
    rows = []
    for cluster in args.clusters.split(","):
        rows += bench_cluster(
            cluster, args.cached_tokens, args.documents, args.requests, args.rounds, args.seed
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows]))
    return rows


if __name__ == "__main__":
    main()

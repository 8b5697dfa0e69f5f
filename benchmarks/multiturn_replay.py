"""Replay a window of the Mooncake conversation trace against a real colocated node, with prefix
caching and without it (``--no-prefix-caching``): same requests, same arrival times, one run after
the other (each on a fresh node, so they never share the cores).

The trace (``../shared/traces/conversation_trace.jsonl`` beside the checkout, or ``--trace``) has lengths and 512-token block hashes,
no text. It is scaled down as its README says:

- **token scale** ``s``: a hash block becomes ``512 / s`` tokens, a pseudo-random run of token ids
  seeded by the hash id (equal ids give equal tokens, so the node sees exactly the trace's sharing);
  the prompt is the concatenation cut to ``input_length / s`` tokens (the last block may be partial);
  ``max_tokens = max(1, round(output_length / s))``, EOS ignored, greedy.
- **time scale** ``t``: request ``i`` is sent ``t * (timestamp_i - timestamp_first)`` after the start.
- **window**: ``--size`` consecutive requests from ``--start``. ``--warmup N`` first replays the
  ``N`` requests before the window as fast as possible (1 output token each, unmeasured) in the
  caching runs, so the cache holds what a long-running node would hold.

Measured at the client, streaming, with the official ``openai`` client: TTFT (send → first chunk)
and JCT (send → end of stream) of every request, and the prefix hit rate, from the node's
``/metrics`` (window delta) and from ``usage.prompt_tokens_details.cached_tokens``.

    .venv/bin/python benchmarks/multiturn_replay.py [--start 6000 --size 200 --warmup 500]
        [--time-scale 2] [--repeats 3] [--dram-run 0.25:2] [--quick]

With ``--repeats N`` the configurations run in alternation N times and every figure is the median
over the N runs (this machine's noise is ~10 % run to run).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import openai
from prometheus_client.parser import text_string_to_metric_families

from memserve.bench.launch import local_node

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "conversation_trace.jsonl"
TRACE_BLOCK_TOKENS = 512
VOCAB_SIZE = 32000  # dummy presets; ids 0-2 are left out (special tokens)
TARGET_TTFT_REDUCTION = 0.5


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # after the replay's start
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Result:
    arrival_s: float
    ttft_s: float
    jct_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    error: str  # "" when the request completed with exactly max_tokens tokens


@dataclass(frozen=True)
class Summary:
    label: str
    num_requests: int
    num_ok: int
    ttft_mean_s: float
    ttft_p99_s: float
    jct_mean_s: float
    jct_p99_s: float
    wall_s: float  # first send to last end of stream
    node_cpu_s: float  # CPU time the node process used meanwhile (user + system, all threads)
    drain_s: float  # last arrival to last end of stream: stays small unless the node saturates
    max_in_flight: int
    hit_rate_metrics: float  # /metrics: hit tokens (all tiers) / query tokens, window delta
    hit_rate_dram: float  # the DRAM tier's share of the query tokens
    hit_rate_usage: float  # sum of cached_tokens / sum of prompt_tokens


# ---- the trace -------------------------------------------------------------------------------


class BlockTokens:
    """Hash id → its fixed block of token ids (seeded by the id), memoised."""

    def __init__(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens
        self._blocks: dict[int, list[int]] = {}

    def __getitem__(self, hash_id: int) -> list[int]:
        block = self._blocks.get(hash_id)
        if block is None:
            rng = random.Random(hash_id)
            block = [rng.randrange(3, VOCAB_SIZE) for _ in range(self.num_tokens)]
            self._blocks[hash_id] = block
        return block


def read_trace(path: Path, first: int, count: int) -> list[dict[str, object]]:
    with path.open() as f:
        lines = [line for i, line in enumerate(f) if first <= i < first + count]
    return [json.loads(line) for line in lines]


def scale_requests(
    rows: Sequence[dict[str, object]], token_scale: int, time_scale: float
) -> list[TraceRequest]:
    if TRACE_BLOCK_TOKENS % token_scale:
        raise ValueError(f"token scale must divide {TRACE_BLOCK_TOKENS}")
    blocks = BlockTokens(TRACE_BLOCK_TOKENS // token_scale)
    t0 = _int(rows[0]["timestamp"])
    out = []
    for row in rows:
        hash_ids = row["hash_ids"]
        assert isinstance(hash_ids, list)
        tokens = [t for h in hash_ids for t in blocks[h]]
        num_tokens = max(1, min(len(tokens), round(_int(row["input_length"]) / token_scale)))
        out.append(
            TraceRequest(
                time_scale * (_int(row["timestamp"]) - t0) / 1000,
                tokens[:num_tokens],
                max(1, round(_int(row["output_length"]) / token_scale)),
            )
        )
    return out


def rebase(requests: Sequence[TraceRequest]) -> list[TraceRequest]:
    """The same requests with arrivals counted from the first one's."""
    t0 = requests[0].arrival_s
    return [dataclasses.replace(r, arrival_s=r.arrival_s - t0) for r in requests]


def _int(value: object) -> int:
    assert isinstance(value, int)
    return value


# ---- the node --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(url: str) -> dict[str, float]:
    """``/metrics`` samples as ``name{label=value}`` → value."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


# ---- the client ------------------------------------------------------------------------------


async def send(client: openai.AsyncOpenAI, model: str, req: TraceRequest, started: float) -> Result:
    """One streaming completion, sent at ``started + req.arrival_s`` (loop clock)."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, started + req.arrival_s - loop.time()))
    sent = loop.time()
    ttft, usage, num_chunks = math.nan, None, 0
    try:
        stream = await client.completions.create(
            model=model,
            prompt=req.prompt_token_ids,
            max_tokens=req.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            logprobs=0,  # one chunk per token: a token that decodes to no text is still sent
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and num_chunks == 0:
                ttft = loop.time() - sent
            num_chunks += len(chunk.choices)
            usage = chunk.usage or usage
    except openai.OpenAIError as e:
        return Result(req.arrival_s, ttft, loop.time() - sent, 0, 0, 0, f"{type(e).__name__}: {e}")
    jct = loop.time() - sent
    if usage is None:
        return Result(req.arrival_s, ttft, jct, 0, 0, 0, "no usage chunk")
    details = usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details is not None else 0
    error = "" if usage.completion_tokens == req.max_tokens else "wrong completion length"
    return Result(
        req.arrival_s, ttft, jct, usage.prompt_tokens, cached, usage.completion_tokens, error
    )


async def replay(url: str, model: str, requests: Sequence[TraceRequest]) -> list[Result]:
    async with openai.AsyncOpenAI(
        base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600
    ) as client:
        started = asyncio.get_running_loop().time() + 0.5
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(send(client, model, r, started)) for r in requests]
        return [t.result() for t in tasks]


async def warm_up(url: str, model: str, requests: Sequence[TraceRequest], concurrency: int) -> None:
    """Prefill ``requests`` in order, ``concurrency`` at a time, one output token each."""
    quick = [TraceRequest(0.0, r.prompt_token_ids, 1) for r in requests]
    async with openai.AsyncOpenAI(
        base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600
    ) as client:
        for i in range(0, len(quick), concurrency):
            batch = quick[i : i + concurrency]
            results = await asyncio.gather(*(send(client, model, r, 0.0) for r in batch))
            if bad := [r.error for r in results if r.error]:
                raise RuntimeError(f"warm-up request failed: {bad[0]}")


# ---- one configuration -----------------------------------------------------------------------


def run_config(
    label: str,
    node_args: Sequence[str],
    requests: Sequence[TraceRequest],
    warmup: Sequence[TraceRequest],
    args: argparse.Namespace,
) -> tuple[Summary, list[Result]]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        local_node(node_args, Path(tmp) / "node.log") as node,
    ):
        url, pid = node.url, node.proc.pid
        if warmup:
            asyncio.run(warm_up(url, args.model, warmup, concurrency=4))
        before, cpu = scrape(url), cpu_seconds(pid)
        start = time.perf_counter()
        results = asyncio.run(replay(url, args.model, requests))
        wall = time.perf_counter() - start - 0.5  # replay() starts sending 0.5 s in
        cpu = cpu_seconds(pid) - cpu
        after = scrape(url)
    return summarize(label, results, wall, cpu, before, after), results


def summarize(
    label: str,
    results: Sequence[Result],
    wall_s: float,
    node_cpu_s: float,
    before: dict[str, float],
    after: dict[str, float],
) -> Summary:
    ok = [r for r in results if not r.error]
    ttft = [r.ttft_s for r in ok]
    jct = [r.jct_s for r in ok]

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    query = delta("memserve_prefix_cache_query_tokens_total")
    hit_device = delta("memserve_prefix_cache_hit_tokens_total{tier=device}")
    hit_dram = delta("memserve_prefix_cache_hit_tokens_total{tier=dram}")
    prompt = sum(r.prompt_tokens for r in ok)
    ends = [r.arrival_s + r.jct_s for r in results]
    return Summary(
        label,
        len(results),
        len(ok),
        _mean(ttft),
        _p99(ttft),
        _mean(jct),
        _p99(jct),
        wall_s,
        node_cpu_s,
        max(ends) - max(r.arrival_s for r in results),
        _max_in_flight(results),
        (hit_device + hit_dram) / query if query else 0.0,
        hit_dram / query if query else 0.0,
        sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
    )


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def _p99(xs: Sequence[float]) -> float:
    """Nearest-rank 99th percentile."""
    return sorted(xs)[max(0, math.ceil(0.99 * len(xs)) - 1)] if xs else math.nan


def _max_in_flight(results: Sequence[Result]) -> int:
    events = sorted(
        [(r.arrival_s, 1) for r in results] + [(r.arrival_s + r.jct_s, -1) for r in results]
    )
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


# ---- output ----------------------------------------------------------------------------------


def format_summary(s: Summary) -> str:
    return (
        f"run | {s.label:28} | ok {s.num_ok}/{s.num_requests} | TTFT mean {s.ttft_mean_s:7.3f} s "
        f"p99 {s.ttft_p99_s:7.3f} s | JCT mean {s.jct_mean_s:7.3f} s p99 {s.jct_p99_s:7.3f} s | "
        f"wall {s.wall_s:6.1f} s drain {s.drain_s:5.1f} s node CPU {s.node_cpu_s:6.1f} s | max in flight {s.max_in_flight:3} | "
        f"hit rate /metrics {s.hit_rate_metrics:6.1%} (dram {s.hit_rate_dram:5.1%}) "
        f"usage {s.hit_rate_usage:6.1%}"
    )


def format_ratio(on: Summary, off: Summary) -> str:
    reduction = 1 - on.ttft_mean_s / off.ttft_mean_s
    verdict = "met" if reduction >= TARGET_TTFT_REDUCTION else "missed"
    return (
        f"ratio | {on.label} / {off.label} | TTFT mean {on.ttft_mean_s / off.ttft_mean_s:5.3f} "
        f"p99 {on.ttft_p99_s / off.ttft_p99_s:5.3f} | JCT mean {on.jct_mean_s / off.jct_mean_s:5.3f} "
        f"p99 {on.jct_p99_s / off.jct_p99_s:5.3f} | mean TTFT {reduction:.1%} lower "
        f"(target >= {TARGET_TTFT_REDUCTION:.0%}: {verdict})"
    )


def node_args(args: argparse.Namespace, kv_gib: float, extra: Sequence[str]) -> list[str]:
    return [
        "--role", "colocated", "--model", args.model, "--dtype", "float32",
        "--kv-cache-memory", str(kv_gib), "--num-threads", str(args.threads),
        "--log-level", "warning", *args.node_args.split(), *extra,
    ]  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--start", type=int, default=6000, help="first request of the window")
    p.add_argument("--size", type=int, default=200, help="requests in the window")
    p.add_argument("--warmup", type=int, default=500, help="requests before the window to prefill")
    p.add_argument("--token-scale", type=int, default=32, help="divide lengths by this")
    p.add_argument("--time-scale", type=float, default=2.0, help="multiply arrival gaps by this")
    p.add_argument("--model", default="dummy:small")
    p.add_argument("--kv-cache-memory", type=float, default=4.0, help="GiB (device tier)")
    p.add_argument(
        "--dram-run",
        default=None,
        metavar="KV_GIB:DRAM_GIB",
        help="also run caching on with this smaller device cache plus a DRAM tier",
    )
    p.add_argument(
        "--node-args", default="", help="more memserve-node flags for every configuration"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="node torch threads")
    p.add_argument("--repeats", type=int, default=1, help="rounds of all configs (medians kept)")
    p.add_argument("--quick", action="store_true", help="a toy run (smoke test)")
    p.add_argument("--json", type=Path, default=None, help="also write summaries and results")
    args = p.parse_args(argv)
    if args.quick:
        args.start, args.size, args.warmup, args.model = 0, 8, 0, "dummy:tiny"
        args.time_scale, args.kv_cache_memory = 0.05, 0.25
    return args


def main() -> None:
    args = parse_args()
    rows = read_trace(args.trace, args.start - args.warmup, args.size + args.warmup)
    scaled = scale_requests(rows, args.token_scale, args.time_scale)
    warmup, requests = scaled[: args.warmup], rebase(scaled[args.warmup :])
    print(
        f"# window {args.start}..{args.start + args.size - 1} ({args.size} requests, warm-up "
        f"{args.warmup}) | token scale 1/{args.token_scale} | time scale x{args.time_scale} | "
        f"{args.model} {args.node_args} | arrivals over {requests[-1].arrival_s:.1f} s | prompt tokens mean "
        f"{_mean([len(r.prompt_token_ids) for r in requests]):.0f} max "
        f"{max(len(r.prompt_token_ids) for r in requests)} | output tokens mean "
        f"{_mean([r.max_tokens for r in requests]):.1f}",
        flush=True,
    )
    configs = [
        ("caching on", node_args(args, args.kv_cache_memory, []), warmup),
        ("caching off", node_args(args, args.kv_cache_memory, ["--no-prefix-caching"]), []),
    ]
    if args.dram_run:
        kv, dram = (float(x) for x in args.dram_run.split(":"))
        extra = ["--dram-cache-memory", str(dram)]
        configs.append((f"caching on, {kv}+{dram} GiB DRAM", node_args(args, kv, extra), warmup))
    runs: dict[str, list[Summary]] = {label: [] for label, _, _ in configs}
    all_results: dict[str, list[list[Result]]] = {label: [] for label, _, _ in configs}
    for round_ in range(args.repeats):  # configurations alternate, so drift hits them alike
        for label, extra_args, warm in configs:
            summary, results = run_config(label, extra_args, requests, warm, args)
            runs[label].append(summary)
            all_results[label].append(results)
            print(f"[{round_ + 1}/{args.repeats}] " + format_summary(summary), flush=True)
            for r in results:
                if r.error:
                    print(f"  failed at {r.arrival_s:.2f} s: {r.error}", flush=True)
    summaries = [median_summary(runs[label]) for label, _, _ in configs]
    if args.repeats > 1:
        for s in summaries:
            print(f"median of {args.repeats} | " + format_summary(s), flush=True)
    for s in summaries[:1] + summaries[2:]:
        print(format_ratio(s, summaries[1]), flush=True)
    if args.json:
        payload = {
            "summaries": [asdict(s) for s in summaries],
            "runs": {k: [asdict(s) for s in v] for k, v in runs.items()},
            "results": {k: [[asdict(r) for r in rs] for rs in v] for k, v in all_results.items()},
        }
        args.json.write_text(json.dumps(payload))


def median_summary(runs: Sequence[Summary]) -> Summary:
    """Field by field: the median of the runs' figures (``num_ok``: the worst run's)."""
    fields = {}
    for f in dataclasses.fields(Summary):
        values = [getattr(s, f.name) for s in runs]
        if f.name == "label":
            fields[f.name] = values[0]
        elif f.name == "num_ok":
            fields[f.name] = min(values)
        elif isinstance(values[0], int):
            fields[f.name] = int(statistics.median(values))
        else:
            fields[f.name] = statistics.median(values)
    return Summary(**fields)


if __name__ == "__main__":
    main()

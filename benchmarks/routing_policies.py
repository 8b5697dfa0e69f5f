"""Routing policies on a LooGLE-like workload: the paper's scheduler experiment, scaled to a CPU.

The paper (MemServe, LooGLE-derived: 80 sessions, 250 requests, 3 prefill + 1 decode
instances) found prompt-tree routing 59 % better than session-id routing on P99 TTFT, and
least-load worst. This runs the same workload under each ``--policies`` entry, one after the
other, each on a fresh ``memserve-node cluster --prefill 3 --decode 1`` (caches start cold).

The workload, deterministic from ``--seed`` (token-id prompts, ids in ``[300, 31000)``: no
special tokens):

- ``--docs`` documents of ``--doc-tokens`` random tokens: the long shared prefixes.
- ``docs * --share-ratio`` sessions; each document is read by ``share_ratio`` sessions (in a
  shuffled order, so a document's readers are spread over the run). Sessions arrive open-loop,
  Poisson at ``--rate`` sessions per second.
- Each session asks ``--questions`` questions of ``--question-tokens`` random tokens in turn
  (closed-loop: the next is sent when the previous answer has ended). The prompt is the document,
  then this session's earlier questions and answers (the answers' real token ids), then the new
  question. Answers are ``--answer-tokens`` long (``ignore_eos``, greedy).
- Every request carries ``X-Session-Id`` (its session), so the session policy can stick.

Measured at the client (streaming, official ``openai`` client): TTFT (send -> first token), JCT
(send -> end of stream) and the prefix hit rate (sum of ``usage.prompt_tokens_details
.cached_tokens`` / sum of prompt tokens). From the prefill instances' ``/metrics``: the prompt
tokens each one computed (their sum is the cluster's prefill work; max / mean shows imbalance).
P99 is the nearest rank (with under 100 requests, the slowest one).

Default size (measured on a 2-vCPU VM, ``dummy:small``, 1 torch thread per instance): a cold
2048-token prefill takes ~3 s alone; at 0.45 sessions/s the prefill instances queue under
session routing (a cold read waits about twice its own time) and least_load nears saturation,
while at 0.3/s queueing hardly shows and at 0.6/s every policy but prompt_tree saturates. The
three policies take 7-10 minutes in all, cluster starts included (the Poisson draw sets how long
the arrivals last).

    .venv/bin/python benchmarks/routing_policies.py [--policies least_load session prompt_tree]
        [--docs 20 --share-ratio 3 --questions 3 --rate 0.45] [--log-level debug --log-dir DIR]
        [--quick]

Other ``memserve-node`` flags for every process: ``--node-args "--num-kv-blocks 1024"``.
``--log-level`` goes to every process; at ``debug`` the scheduler logs each routing decision
with its cost terms (``--log-dir`` keeps the logs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from random import Random
from typing import Any

import openai
from prometheus_client.parser import text_string_to_metric_families

from memserve.bench.launch import NODE_COMMAND, free_port, local_process, wait_serving
from memserve.model.tokenizer import Tokenizer

POLICIES = ("least_load", "session", "prompt_tree")
BASELINE = "session"  # the paper's comparison: prompt_tree vs session-id routing
TOKEN_IDS = (300, 31000)  # plain ids of the dummy vocabulary (specials are 0-2)
VOCAB_SIZE = 32000  # dummy presets
PAPER = {"sessions": 80, "requests": 250}


@dataclass(frozen=True)
class Session:
    session_id: str
    doc_id: int
    arrival_s: float  # after the run's start
    questions: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Workload:
    docs: tuple[tuple[int, ...], ...]
    sessions: tuple[Session, ...]

    @property
    def num_requests(self) -> int:
        return sum(len(s.questions) for s in self.sessions)


@dataclass(frozen=True)
class Result:
    session_id: str
    turn: int
    sent_s: float  # after the run's start
    ttft_s: float
    jct_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    error: str  # "" when it completed with exactly the answer length


@dataclass(frozen=True)
class Summary:
    policy: str
    num_requests: int  # the workload's
    num_ok: int
    ttft_p50_s: float
    ttft_p99_s: float
    ttft_mean_s: float
    jct_mean_s: float
    hit_rate: float  # usage: cached / prompt tokens
    hit_rate_router: float  # the scheduler's /metrics, prefill role
    computed_tokens: dict[str, int]  # prefill instance -> prompt tokens it computed
    wall_s: float  # first arrival to last end of stream
    loadavg: tuple[float, float]  # the machine's 1-minute load average before and after
    errors: list[str] = field(default_factory=list)

    @property
    def imbalance(self) -> float:
        """Most computed tokens on one prefill instance over the mean (1.0: even)."""
        values = list(self.computed_tokens.values())
        return max(values) / statistics.fmean(values) if values and any(values) else math.nan


# ---- the workload ------------------------------------------------------------------------------


def make_workload(args: argparse.Namespace) -> Workload:
    """Documents, then sessions (document, arrival, questions), all from ``args.seed``."""
    rng = Random(args.seed)

    def tokens(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(*TOKEN_IDS) for _ in range(n))

    docs = tuple(tokens(args.doc_tokens) for _ in range(args.docs))
    readers = [d for d in range(args.docs) for _ in range(args.share_ratio)]
    rng.shuffle(readers)
    sessions, t = [], 0.0
    for i, doc_id in enumerate(readers):
        questions = tuple(tokens(args.question_tokens) for _ in range(args.questions))
        sessions.append(Session(f"s{i:03d}-d{doc_id:02d}", doc_id, t, questions))
        t += rng.expovariate(args.rate)
    return Workload(docs, tuple(sessions))


# ---- the client --------------------------------------------------------------------------------


class AnswerIds:
    """Token strings of ``logprobs.tokens`` -> ids (the dummy vocabulary's are all distinct)."""

    def __init__(self) -> None:
        tokenizer = Tokenizer.dummy(VOCAB_SIZE)
        self._ids = {tokenizer.token_str(i): i for i in range(VOCAB_SIZE)}

    def __call__(self, token_strs: Sequence[str]) -> list[int]:
        return [self._ids[s] for s in token_strs]


async def ask(
    client: openai.AsyncOpenAI, model: str, session: str, prompt: list[int], max_tokens: int
) -> tuple[float, list[str], Any]:
    """One streaming completion -> (TTFT, the answer's token strings, the usage object)."""
    loop = asyncio.get_running_loop()
    sent, ttft, usage = loop.time(), math.nan, None
    answer: list[str] = []
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=0,  # the sampled tokens, one chunk per token
        extra_body={"ignore_eos": True},
        extra_headers={"X-Session-Id": session},
    )
    async for chunk in stream:
        for choice in chunk.choices:
            if math.isnan(ttft):
                ttft = loop.time() - sent
            answer += (choice.logprobs.tokens or []) if choice.logprobs else []
        usage = chunk.usage or usage
    return ttft, answer, usage


async def run_session(
    client: openai.AsyncOpenAI,
    args: argparse.Namespace,
    workload: Workload,
    session: Session,
    started: float,
    answer_ids: AnswerIds,
) -> list[Result]:
    """The session's questions in turn; a failed turn ends the session (its later turns are
    never sent, and count as missing)."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, started + session.arrival_s - loop.time()))
    history = list(workload.docs[session.doc_id])
    results = []
    for turn, question in enumerate(session.questions):
        prompt = history + list(question)
        sent = loop.time()
        try:
            ttft, answer, usage = await ask(
                client, args.model, session.session_id, prompt, args.answer_tokens
            )
            answer_tokens = answer_ids(answer)
            error = _check(usage, len(prompt), len(answer_tokens), args.answer_tokens)
        except (openai.OpenAIError, KeyError) as e:
            ttft, answer_tokens, usage, error = math.nan, [], None, f"{type(e).__name__}: {e}"
        details = usage.prompt_tokens_details if usage is not None else None
        results.append(
            Result(
                session.session_id,
                turn,
                sent - started,
                ttft,
                loop.time() - sent,
                usage.prompt_tokens if usage is not None else 0,
                (details.cached_tokens or 0) if details is not None else 0,
                usage.completion_tokens if usage is not None else 0,
                error,
            )
        )
        if error:
            break
        history = prompt + answer_tokens
    return results


def _check(usage: Any, num_prompt: int, num_answer: int, max_tokens: int) -> str:
    if usage is None:
        return "no usage chunk"
    if usage.prompt_tokens != num_prompt:
        return f"usage says {usage.prompt_tokens} prompt tokens, sent {num_prompt}"
    if usage.completion_tokens != max_tokens or num_answer != max_tokens:
        return f"{usage.completion_tokens} tokens ({num_answer} streamed), asked {max_tokens}"
    return ""


async def replay(url: str, args: argparse.Namespace, workload: Workload) -> list[Result]:
    answer_ids = AnswerIds()
    async with openai.AsyncOpenAI(
        base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600
    ) as client:
        started = asyncio.get_running_loop().time() + 0.5
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(run_session(client, args, workload, s, started, answer_ids))
                for s in workload.sessions
            ]
    return [r for t in tasks for r in t.result()]


# ---- the cluster -------------------------------------------------------------------------------


@contextmanager
def cluster(policy: str, args: argparse.Namespace, log_path: Path) -> Iterator[str]:
    """``memserve-node cluster --prefill N --decode 1 --policy POLICY``; yields its URL once a
    request went through (a decode instance serves once it has seen a prefill instance)."""
    port = free_port()
    cmd = [
        *NODE_COMMAND, "cluster", "--prefill", str(args.prefill), "--decode", "1",
        "--port", str(port), "--policy", policy, "--model", args.model, "--dtype", "float32",
        "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--log-level", args.log_level, *args.node_args.split(),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    # The launcher stops its members in order, 30 s each at most.
    with local_process(cmd, url, log_path, healthy_timeout_s=600, stop_timeout_s=120):
        wait_joined(url, args.prefill)
        wait_serving(url, args.model)
        yield url


def wait_joined(url: str, num_prefill: int, timeout_s: float = 120) -> None:
    """Until every instance is listed and ready (``/health`` is 200 with one pair already)."""
    deadline = time.monotonic() + timeout_s
    while True:
        instances = json.loads(get(url + "/v1/cluster"))["instances"]
        roles = sorted(i["role"] for i in instances if i["ready"])
        if roles == ["decode"] + ["prefill"] * num_prefill:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"instances ready after {timeout_s} s: {roles}")
        time.sleep(0.2)


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        body: bytes = r.read()
        return body


def scrape(url: str) -> dict[str, float]:
    """``/metrics`` samples as ``name{label=value}`` -> value."""
    samples = {}
    for family in text_string_to_metric_families(get(url + "/metrics").decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def prefill_urls(url: str) -> dict[str, str]:
    state = json.loads(get(url + "/v1/cluster"))
    return {i["id"]: i["url"] for i in state["instances"] if i["role"] == "prefill"}


def computed_tokens(urls: dict[str, str]) -> dict[str, int]:
    """Prompt tokens each prefill instance computed so far (not served from its cache)."""
    return {
        i: int(scrape(u).get("memserve_prompt_tokens_computed_total", 0)) for i, u in urls.items()
    }


# ---- one policy --------------------------------------------------------------------------------


def run_policy(
    policy: str, args: argparse.Namespace, workload: Workload, log_dir: Path
) -> tuple[Summary, list[Result]]:
    with cluster(policy, args, log_dir / f"{policy}.log") as url:
        urls = prefill_urls(url)
        before, computed, load = scrape(url), computed_tokens(urls), os.getloadavg()[0]
        results = asyncio.run(replay(url, args, workload))
        after, loadavg = scrape(url), (load, os.getloadavg()[0])
        computed = {i: n - computed[i] for i, n in computed_tokens(urls).items()}
    return summarize(policy, workload, results, (before, after), computed, loadavg), results


def summarize(
    policy: str,
    workload: Workload,
    results: Sequence[Result],
    metrics: tuple[dict[str, float], dict[str, float]],  # the scheduler's, before and after
    computed: dict[str, int],
    loadavg: tuple[float, float],
) -> Summary:
    ok = [r for r in results if not r.error]
    ttft = sorted(r.ttft_s for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)

    def delta(name: str) -> float:
        return metrics[1].get(name, 0.0) - metrics[0].get(name, 0.0)

    routed = delta("memserve_router_prompt_tokens_total{role=prefill}")
    cached = delta("memserve_router_cached_prompt_tokens_total{role=prefill}")
    return Summary(
        policy,
        workload.num_requests,
        len(ok),
        _percentile(ttft, 0.50),
        _percentile(ttft, 0.99),
        _mean(ttft),
        _mean([r.jct_s for r in ok]),
        sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
        cached / routed if routed else 0.0,
        computed,
        max((r.sent_s + r.jct_s for r in results), default=0.0),
        loadavg,
        [r.error for r in results if r.error],
    )


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def _percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Nearest rank."""
    return sorted_xs[max(0, math.ceil(q * len(sorted_xs)) - 1)] if sorted_xs else math.nan


# ---- output ------------------------------------------------------------------------------------


def describe(args: argparse.Namespace, workload: Workload) -> str:
    num_sessions = len(workload.sessions)
    last = workload.sessions[-1].arrival_s
    return (
        f"# {args.model}, {args.prefill} prefill + 1 decode | {args.docs} documents x "
        f"{args.doc_tokens} tokens, share ratio {args.share_ratio} -> {num_sessions} sessions x "
        f"{args.questions} questions of {args.question_tokens} tokens = {workload.num_requests} "
        f"requests, answers {args.answer_tokens} tokens | sessions Poisson at {args.rate}/s "
        f"(arrivals over {last:.0f} s) | --max-num-batched-tokens {args.max_num_batched_tokens} "
        f"{args.node_args} | seed {args.seed} | paper: {PAPER['sessions']} sessions, "
        f"{PAPER['requests']} requests (x{PAPER['sessions'] / num_sessions:.1f} and "
        f"x{PAPER['requests'] / workload.num_requests:.1f} ours)"
    )


def table(summaries: Sequence[Summary]) -> str:
    base = next((s for s in summaries if s.policy == BASELINE), None)
    lines = [
        "| policy | ok / requests | TTFT P50 (s) | TTFT P99 (s) | TTFT mean (s) | JCT mean (s) "
        "| prefix hit rate (usage / router) | prompt tokens computed (max/mean instance) "
        f"| P99 TTFT vs {BASELINE} | wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        change = f"{s.ttft_p99_s / base.ttft_p99_s - 1:+.0%}" if base else "-"
        lines.append(
            f"| {s.policy} | {s.num_ok} / {s.num_requests} | {s.ttft_p50_s:.2f} "
            f"| {s.ttft_p99_s:.2f} | {s.ttft_mean_s:.2f} | {s.jct_mean_s:.2f} "
            f"| {s.hit_rate:.1%} / {s.hit_rate_router:.1%} "
            f"| {sum(s.computed_tokens.values())} ({s.imbalance:.2f}) | {change} | {s.wall_s:.0f} |"
        )
    return "\n".join(lines)


# ---- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument("--model", default="dummy:small", help="a dummy:<preset> (token ids read back)")
    p.add_argument("--prefill", type=int, default=3, help="prefill instances (and 1 decode)")
    p.add_argument("--docs", type=int, default=20)
    p.add_argument("--doc-tokens", type=int, default=2048)
    p.add_argument("--share-ratio", type=int, default=3, help="sessions per document")
    p.add_argument("--questions", type=int, default=3, help="per session")
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--rate", type=float, default=0.45, help="session arrivals per second")
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--node-args", default="", help="more memserve-node flags for every process")
    p.add_argument("--log-level", default="warning", help="every process's (debug: decisions)")
    p.add_argument("--log-dir", type=Path, default=None, help="keep the clusters' logs here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a toy run (smoke test)")
    p.add_argument("--json", type=Path, default=None, help="also write summaries and results")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.prefill, args.policies = "dummy:tiny", 2, ["session", "prompt_tree"]
        args.docs, args.doc_tokens, args.share_ratio, args.questions = 2, 96, 2, 2
        args.question_tokens, args.answer_tokens, args.rate = 8, 4, 4.0
    return args


def main(argv: Sequence[str] | None = None) -> list[Summary]:
    # Started in the background of a non-interactive shell (nohup ... &), this process ignores
    # SIGINT and its children would inherit that, so stopping the cluster with SIGINT would end
    # in SIGKILLs. A handler (unlike SIG_IGN) is reset to the default on exec.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = parse_args(argv)
    workload = make_workload(args)
    print(describe(args, workload), flush=True)
    summaries, all_results = [], {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        for policy in args.policies:
            t0 = time.perf_counter()
            summary, results = run_policy(policy, args, workload, log_dir)
            summaries.append(summary)
            all_results[policy] = results
            print(
                f"{policy}: {summary.num_ok}/{summary.num_requests} ok, TTFT P99 "
                f"{summary.ttft_p99_s:.2f} s, computed {summary.computed_tokens}, "
                f"{time.perf_counter() - t0:.0f} s with start and stop, load average "
                f"{summary.loadavg[0]:.1f} -> {summary.loadavg[1]:.1f}",
                flush=True,
            )
            for error in summary.errors[:5]:
                print(f"  error: {error}", flush=True)
    print("\n" + table(summaries))
    print(f"\nwall time {time.perf_counter() - start:.0f} s for {len(summaries)} policies")
    if args.json:
        payload = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "summaries": [{**asdict(s), "imbalance": s.imbalance} for s in summaries],
            "results": {k: [asdict(r) for r in v] for k, v in all_results.items()},
        }
        args.json.write_text(json.dumps(payload))
    return summaries


if __name__ == "__main__":
    main(sys.argv[1:])

"""``memserve-node profile``: measure an engine's steps, fit the cost model, write it to a file.

The run, on one ``LLMEngine`` with prefix caching whose steps it times
(``LLMEngine.drain_step_samples``), lengths in fractions of the step budget M
(``--max-num-batched-tokens``) so that chunking is exercised at any M::

    warm-up      a few prefills, and each decode point once (caching its prefix); dropped
    rounds       every point once per round, in a new random order each round (a noisy moment,
                 or another process's periodic work, never hits the same points every round):
      prefills   chains of prompts, each extending the one before: the first is computed whole,
                 each next one finds the one before cached. Fresh random tokens per chain and
                 round, so no two points share a cached prefix.
      decodes    B requests sharing a cached prefix of C - block_size tokens prefill their last
                 block in one step, then decode ``DECODE_STEPS`` steps together.

On a shared machine other work only ever adds time, so each point's time is its fastest, and
so is each distinct step's (samples with the same features merged) before fitting. After
``ROUNDS`` rounds, points run again, up to ``MAX_ROUNDS`` times in all, while their two fastest
times differ by more than ``AGREE`` or (training points only) their fastest is more than
``SLOWER`` above what a fit of the training points so far predicts. ``--clock cpu`` times steps
by the thread's CPU time instead, which other processes' load does not inflate (the tests).

Training and held-out chains use different prompt lengths. The held-out report fits on the
training points alone and predicts each held-out prompt's whole prefill; the model written to
the file is then fitted on everything. The file is ``OperatorCostModel.to_json()`` plus a
``profile`` key with the run's facts and the held-out report (``OperatorCostModel.load`` ignores
it).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from memserve.config import DTYPES, CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from memserve.engine.llm_engine import LLMEngine
from memserve.engine.types import SamplingParams, StepSample
from memserve.scheduler.cost_model import (
    DEFAULT_BANDWIDTH_BYTES_PER_S,
    OperatorCostModel,
    StepCoefficients,
    fit_coefficients,
)

DECODE_STEPS = 4  # decode steps per batch point
ROUNDS = 3  # every point is measured this many times, in interleaved rounds
MAX_ROUNDS = 6  # and again, up to this many times, until its two fastest times agree
AGREE = 0.05  # within this fraction
SLOWER = 0.15  # a training point this much slower than the fit predicts is measured again too
_MIB = 1 << 20

Key = tuple[str, int, int]  # ("prefill", num_tokens, num_cached) or ("decode", batch, context)


@dataclass(frozen=True)
class Chain:
    """Prompts each extending the previous one's tokens (lengths multiples of the block size):
    the first is computed whole, each next one finds the one before cached."""

    lengths: tuple[int, ...]
    heldout: bool = False

    @property
    def keys(self) -> list[Key]:
        cached = (0, *self.lengths[:-1])
        return [("prefill", n, c) for n, c in zip(self.lengths, cached, strict=True)]

    def run(self, profiler: Profiler) -> list[tuple[Key, list[StepSample]]]:
        tokens = profiler.random_tokens(self.lengths[-1])
        return [(key, profiler.run([tokens[: key[1]]])) for key in self.keys]


@dataclass(frozen=True)
class Decode:
    """``batch`` requests sharing a cached prefix of ``context - block_size`` tokens prefill their
    last block together, then decode ``DECODE_STEPS`` steps together."""

    batch: int
    context: int
    heldout = False  # decode points are always training points

    @property
    def keys(self) -> list[Key]:
        return [("decode", self.batch, self.context)]

    def run(self, profiler: Profiler) -> list[tuple[Key, list[StepSample]]]:
        prefix = profiler.prefix(self.context - profiler.block_size)
        prompts = [prefix + profiler.random_tokens(profiler.block_size) for _ in range(self.batch)]
        return [(self.keys[0], profiler.run(prompts, max_tokens=DECODE_STEPS + 1))]


def make_plan(budget: int, block_size: int, max_len: int, quick: bool) -> list[Chain | Decode]:
    """Lengths as fractions of the step budget M, so that chunking is exercised at any M, and
    at most ``max_len``."""

    def tokens(sixteenths: int) -> int:
        n = min(budget * sixteenths // 16, max_len)
        return max(block_size, n // block_size * block_size)

    def chain(*sixteenths: int, heldout: bool = False) -> Chain:
        return Chain(tuple(sorted({tokens(s) for s in sixteenths})), heldout)

    # train: one block, M/16, 3M/16, M/2 then 3M/4, M then 3M/2;
    # held-out: M/8, 3M/8, 5M/8 then 9M/8, 5M/4; decode contexts: M/8 and M.
    train = [chain(0), chain(1), chain(3), chain(8, 12), chain(16, 24)]
    heldout = [chain(2, heldout=True), chain(6, heldout=True), chain(10, 18, heldout=True)]
    heldout.append(chain(20, heldout=True))
    batches = (1, 16) if quick else (1, 8, 32)
    contexts = (max(tokens(2), 2 * block_size), tokens(16))
    decodes = [Decode(b, c) for c in contexts for b in batches]
    return [*train, *heldout, *decodes]


class Profiler:
    def __init__(self, engine: LLMEngine, seed: int) -> None:
        self.engine = engine
        self.rng = random.Random(seed)
        self.block_size = engine.config.cache.block_size
        self._prefixes: dict[int, list[int]] = {}
        self._next_id = 0

    def random_tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(3, self.engine.arch.vocab_size) for _ in range(n)]

    def prefix(self, n: int) -> list[int]:
        """The same ``n`` tokens (a multiple of the block size) every time, cached: computed
        the first time and again if they were evicted since."""
        if n not in self._prefixes:
            self._prefixes[n] = self.random_tokens(n)
        tokens = self._prefixes[n]
        if self.engine.pool.match(tokens).num_tokens < n:
            self.run([tokens])
        return tokens

    def run(self, prompts: Sequence[list[int]], max_tokens: int = 1) -> list[StepSample]:
        """Run ``prompts`` together to completion; the samples of its steps."""
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        for prompt in prompts:
            self.engine.add_request(f"profile-{self._next_id}", prompt, params)
            self._next_id += 1
        while self.engine.has_unfinished():
            self.engine.step()
        return self.engine.drain_step_samples()

    def warm_up(self, plan: Sequence[Chain | Decode]) -> None:
        """Run every decode point once (which also caches their prefixes) and a few prefills."""
        budget = self.engine.config.scheduler.max_num_batched_tokens
        for n in (budget // 4, 2 * self.block_size, budget // 4):
            self.run([self.random_tokens(max(n, 2))], max_tokens=4)
        for point in plan:
            if isinstance(point, Decode):
                point.run(self)


@dataclass
class Measured:
    """Per key: the samples of its steps and its time (their sum), from every round."""

    samples: dict[Key, list[StepSample]] = field(default_factory=lambda: defaultdict(list))
    seconds: dict[Key, list[float]] = field(default_factory=lambda: defaultdict(list))
    heldout: set[Key] = field(default_factory=set)

    def add(self, key: Key, samples: list[StepSample], heldout: bool) -> None:
        self.seconds[key].append(sum(s.seconds for s in samples))
        self.samples[key] += samples
        if heldout:
            self.heldout.add(key)

    def settled(self, key: Key) -> bool:
        """Its two fastest times agree: interference (which only adds time) missed both."""
        fastest = sorted(self.seconds[key])[:2]
        return len(fastest) == 2 and fastest[1] <= fastest[0] * (1 + AGREE)

    def slower_than(self, key: Key, coefficients: StepCoefficients) -> bool:
        """Its fastest time is over ``SLOWER`` above what ``coefficients`` predict for one run."""
        one_run = self.samples[key][: len(self.samples[key]) // len(self.seconds[key])]
        predicted = sum(coefficients.predict(s) for s in one_run)
        return min(self.seconds[key]) > predicted * (1 + SLOWER)

    def train_samples(self) -> list[StepSample]:
        return [s for key, ss in self.samples.items() if key not in self.heldout for s in ss]

    def all_samples(self) -> list[StepSample]:
        return [s for ss in self.samples.values() for s in ss]


def measure(profiler: Profiler, plan: Sequence[Chain | Decode]) -> Measured:
    """``ROUNDS`` rounds over the plan, then rounds over the points to measure again (see
    ``again``), ``MAX_ROUNDS`` in all."""
    measured = Measured()
    todo = list(plan)
    for round_ in range(MAX_ROUNDS):
        profiler.rng.shuffle(todo)  # no point always runs in the same phase of a round
        for point in todo:
            for key, samples in point.run(profiler):
                measured.add(key, samples, point.heldout)
        if round_ + 1 >= ROUNDS:
            todo = again(measured, plan)
            if not todo:
                break
    return measured


def again(measured: Measured, plan: Sequence[Chain | Decode]) -> list[Chain | Decode]:
    """The points not settled, and the training points slower than a fit of the training points
    so far predicts (disturbed alike in every round). Held-out points are never judged by the
    fit: that would bias their report towards it."""
    fit = fit_coefficients(merge_repeats(measured.train_samples()))

    def suspect(point: Chain | Decode) -> bool:
        if not all(measured.settled(k) for k in point.keys):
            return True
        return not point.heldout and any(measured.slower_than(k, fit) for k in point.keys)

    return [p for p in plan if suspect(p)]


def merge_repeats(samples: Sequence[StepSample]) -> list[StepSample]:
    """One sample per distinct feature tuple, at the fastest of its times."""
    groups: dict[StepSample, list[float]] = defaultdict(list)
    for s in samples:
        groups[replace(s, seconds=0.0)].append(s.seconds)
    return [replace(step, seconds=min(times)) for step, times in groups.items()]


def heldout_report(model: OperatorCostModel, measured: Measured) -> dict[str, Any]:
    """``model``'s prediction of each held-out prompt's prefill against its fastest time."""
    points = []
    for kind, n, cached in sorted(measured.heldout):
        seconds = min(measured.seconds[kind, n, cached])
        predicted = model.prefill_time(n, cached)
        points.append(
            {
                "num_tokens": n,
                "num_cached": cached,
                "measured_s": seconds,
                "predicted_s": predicted,
                "relative_error": (predicted - seconds) / seconds,
                "num_rounds": len(measured.seconds[kind, n, cached]),
            }
        )
    errors = [abs(p["relative_error"]) for p in points]
    return {
        "points": points,
        "max_relative_error": max(errors),
        "median_relative_error": statistics.median(errors),
    }


def copy_bandwidth(num_bytes: int = 64 * _MIB) -> float:
    """Bytes per second of a host memory copy (best of five), an upper bound for transfers."""
    src = torch.ones(num_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return num_bytes / best


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memserve-node profile",
        description="Time an engine's prefill and decode steps, fit the scheduler's cost model "
        "and write it (with its error on held-out prompt lengths) to a JSON file.",
    )
    p.add_argument("--model", default="dummy:small", help="HF directory or dummy:<preset>")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (all cores)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="step token budget")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--bandwidth-gbps",
        type=float,
        default=None,
        help="KV transfer bandwidth between instances in GB/s (default 5: gloo over loopback "
        "as measured on the 2-core dev VM; a host memory copy, --bandwidth-gbps 0, measures an "
        "upper bound, 13-27 GB/s there)",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time steps by the wall clock, or by this thread's CPU time (--device cpu "
        "--num-threads 1 only), which other processes on a shared machine do not inflate",
    )
    p.add_argument("--out", default="profile.json", help="file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer decode points (tests)")
    return p


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(args.model, dtype=args.dtype, device=args.device, seed=args.seed),
        cache=CacheConfig(block_size=args.block_size, dram_num_blocks=0),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens),
    )


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = engine_config(args)
        if args.clock == "cpu" and (args.device != "cpu" or args.num_threads != 1):
            raise ValueError("--clock cpu needs --device cpu --num-threads 1")
    except ValueError as e:
        parser.exit(2, f"memserve-node profile: {e}\n")
    started = time.monotonic()
    torch.set_num_threads(args.num_threads or os.cpu_count() or 1)
    engine = LLMEngine(config)
    if args.clock == "cpu":
        engine.step_clock = time.thread_time  # torch on one thread computes in this one
    model, facts = profile(engine, args)
    facts["seconds"] = time.monotonic() - started
    model.save(args.out, {"profile": facts})
    print(summary(model, facts, args.out))
    return 0


def profile(
    engine: LLMEngine, args: argparse.Namespace
) -> tuple[OperatorCostModel, dict[str, Any]]:
    """Measure, report the held-out error of a fit on the training points, fit on all."""
    budget = engine.config.scheduler.max_num_batched_tokens
    max_len = engine.max_model_len - DECODE_STEPS - 1
    plan = make_plan(budget, args.block_size, max_len, args.quick)
    profiler = Profiler(engine, args.seed)
    profiler.warm_up(plan)
    measured = measure(profiler, plan)
    gbps = args.bandwidth_gbps
    bandwidth = DEFAULT_BANDWIDTH_BYTES_PER_S if gbps is None else gbps * 1e9 or copy_bandwidth()
    heldout = heldout_report(fit(engine, measured.train_samples(), bandwidth), measured)
    model = fit(engine, measured.all_samples(), bandwidth)
    return model, {
        "model": args.model,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "device": str(engine.device),
        "num_threads": torch.get_num_threads(),
        "block_size": args.block_size,
        "clock": args.clock,
        "bandwidth_source": {None: "default (gloo loopback)", 0: "measured host copy"}.get(
            args.bandwidth_gbps, "flag"
        ),
        "num_steps": sum(map(len, measured.samples.values())),
        "fit_median_relative_error": model.prediction_error(model.prior),
        "heldout": heldout,
    }


def fit(engine: LLMEngine, samples: Sequence[StepSample], bandwidth: float) -> OperatorCostModel:
    a = engine.arch
    return OperatorCostModel.fit(
        merge_repeats(samples),
        max_num_batched_tokens=engine.config.scheduler.max_num_batched_tokens,
        bytes_per_token=2 * a.num_layers * a.num_kv_heads * a.head_dim * engine.dtype.itemsize,
        bandwidth_bytes_per_s=bandwidth,
    )


def summary(model: OperatorCostModel, facts: dict[str, Any], out: str) -> str:
    c = model.coefficients
    lines = [
        f"profiled {facts['model']} ({facts['dtype']}, {facts['device']}, "
        f"{facts['num_threads']} threads) in {facts['seconds']:.0f} s: {facts['num_steps']} steps",
        "  seconds per " + ", ".join(f"{k[:-2]} {v:.3g}" for k, v in asdict(c).items()),
        f"  transfer {model.bandwidth_bytes_per_s / 1e9:.1f} GB/s,"
        f" {model.bytes_per_token} bytes/token",
        "  held-out prefills, predicted by a fit without them:",
    ]
    for p in facts["heldout"]["points"]:
        lines.append(
            f"    {p['num_tokens']:6d} tokens ({p['num_cached']} cached): measured"
            f" {p['measured_s'] * 1e3:8.1f} ms, predicted {p['predicted_s'] * 1e3:8.1f} ms"
            f" ({p['relative_error']:+.1%})"
        )
    lines.append(f"  max held-out error {facts['heldout']['max_relative_error']:.1%}; wrote {out}")
    return "\n".join(lines)

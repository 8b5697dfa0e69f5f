"""Parity of llama.cpp's ``llama-server`` on our GGUF export with MemServe's engine, same weights.

Exports ``--model`` with ``export_gguf`` (``--dtype`` f16 or f32 matrices), starts
``llama-server -m OUT.gguf --port PORT -t THREADS``, and sends seeded token-id prompts to its native
``/completion`` (greedy, ``n_predict``, ``n_probs``); our offline engine runs the same prompts in
float32 with top-20 logprobs. Random weights give flat distributions, so long greedy runs diverge
on near-ties; every generated position is compared while the two continuations still agree:

- logprob of each of llama.cpp's top-5 tokens against ours: max |Δ| must be <= ``--tol``;
- greedy token: a disagreement fails only where ours is not a near-tie (top-1 − top-2 > 2·tol);
- overlap of the two top-5 sets (reported).

Also checks that ``/tokenize`` and ``/detokenize`` agree with the dummy tokenizer on ASCII text, and
with ``--probe-api`` prints what ``/v1/completions`` accepts and reports (token-id prompts,
``ignore_eos``, ``stream_options.include_usage``, cached-token counts) for benchmark clients.

Exit status: 0 when all agree, 1 on a mismatch, 2 when the server does not come up.

    .venv/bin/python benchmarks/gguf_parity.py --llama-server /work/peer-venv/bin/llama-server \\
        [--model dummy:small] [--dtype f16|f32] [--tol 0.05] [--probe-api]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memserve.config import CacheConfig, EngineConfig, ModelConfig
from memserve.engine.offline import LLM
from memserve.engine.types import SamplingParams, TokenLogprob
from memserve.model.gguf_export import export_gguf
from memserve.model.loader import dummy_arch
from memserve.model.tokenizer import Tokenizer

PROMPT_LENGTHS = (1, 7, 33, 120)
TOP_K = 5
OURS_TOP = 20
TEXTS = ("Hello world, the quick brown fox jumps over 13 lazy dogs.", "  two  spaces\nand a line")

Json = dict[str, Any]


@dataclass(frozen=True)
class Step:
    """One generated position: the greedy token and the top tokens' logprobs, most likely first."""

    token_id: int
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class PositionReport:
    prompt: int
    position: int
    same_token: bool
    near_tie: bool
    top_overlap: int
    max_abs_diff: float
    missing: int  # llama.cpp top-5 tokens outside our top-20


# ---- llama-server ------------------------------------------------------------------------------


def post(url: str, body: Json, timeout_s: float = 300.0) -> Json:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        result: Json = json.loads(resp.read())
    return result


def post_stream(url: str, body: Json, timeout_s: float = 300.0) -> list[Json]:
    """The ``data:`` events of a server-sent-event response, ``[DONE]`` left out."""
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    events: list[Json] = []
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                events.append(json.loads(line[5:]))
    return events


@contextmanager
def llama_server(
    binary: str, gguf: Path, port: int, threads: int, extra: Sequence[str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Runs ``llama-server`` until the block exits (then terminates and waits for it); raises
    ``RuntimeError`` if /health does not answer 200 within 300 s."""
    cmd = [binary, "-m", str(gguf), "--port", str(port), "-t", str(threads), *extra]
    print("$", " ".join(cmd))
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}/health", 300.0)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass  # not listening yet, or 503 while loading
        time.sleep(0.5)
    raise RuntimeError(f"llama-server not healthy after {timeout_s:.0f} s")


def llama_steps(base: str, prompt: Sequence[int], n_predict: int) -> list[Step]:
    body = {
        "prompt": list(prompt),
        "n_predict": n_predict,
        "n_probs": TOP_K,
        "temperature": 0,
        "ignore_eos": True,
        "cache_prompt": False,
    }
    probs = post(base + "/completion", body)["completion_probabilities"]
    return [Step(p["id"], tuple((t["id"], t["logprob"]) for t in p["top_logprobs"])) for p in probs]


# ---- ours -------------------------------------------------------------------------------------


def our_steps(
    model: str, seed: int, prompts: Sequence[Sequence[int]], n_predict: int
) -> list[list[Step]]:
    config = EngineConfig(
        model=ModelConfig(model, dtype="float32", seed=seed), cache=CacheConfig(memory_gib=1.0)
    )
    params = SamplingParams(
        max_tokens=n_predict, temperature=0.0, ignore_eos=True, logprobs=OURS_TOP
    )
    completions = LLM(config).generate(prompts, params)
    return [[_step(lp) for lp in c.logprobs] for c in completions]


def _step(lp: TokenLogprob) -> Step:
    return Step(lp.token_id, lp.top)


# ---- comparison --------------------------------------------------------------------------------


def compare(
    prompt: int, ours: Sequence[Step], theirs: Sequence[Step], tol: float
) -> list[PositionReport]:
    """Positions up to and including the first greedy disagreement (after it, contexts differ)."""
    reports = []
    for position, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        our_lp = dict(a.top)
        diffs = [abs(our_lp[t] - lp) for t, lp in b.top if t in our_lp]
        margin = a.top[0][1] - a.top[1][1]
        reports.append(
            PositionReport(
                prompt=prompt,
                position=position,
                same_token=a.token_id == b.token_id,
                near_tie=margin <= 2 * tol,
                top_overlap=len({t for t, _ in a.top[:TOP_K]} & {t for t, _ in b.top}),
                max_abs_diff=max(diffs, default=float("inf")),
                missing=len(b.top) - len(diffs),
            )
        )
        if a.token_id != b.token_id:
            break
    return reports


def failures(reports: Sequence[PositionReport], tol: float) -> list[str]:
    out = []
    for r in reports:
        where = f"prompt {r.prompt} position {r.position}"
        if r.missing:
            out.append(f"{where}: {r.missing} of llama.cpp's top-{TOP_K} not in our top-{OURS_TOP}")
        if r.max_abs_diff > tol:
            out.append(f"{where}: logprob differs by {r.max_abs_diff:.4f} > {tol}")
        if not r.same_token and not r.near_tie:
            out.append(f"{where}: greedy tokens differ without a near-tie")
    return out


def tokenizer_failures(base: str, tokenizer: Tokenizer) -> list[str]:
    out = []
    for text in TEXTS:
        ours = tokenizer.encode(text, add_special_tokens=False)
        theirs = post(base + "/tokenize", {"content": text, "add_special": False})["tokens"]
        if theirs != ours:
            out.append(f"/tokenize {text!r}: llama.cpp {theirs} vs ours {ours}")
        back = post(base + "/detokenize", {"tokens": ours})["content"]
        if back != tokenizer.decode(ours):
            out.append(
                f"/detokenize {text!r}: llama.cpp {back!r} vs ours {tokenizer.decode(ours)!r}"
            )
    return out


def print_reports(reports: Sequence[PositionReport]) -> None:
    print("prompt pos same_token near_tie top5_overlap max|dlogprob| missing")
    for r in reports:
        print(f"{r.prompt:6} {r.position:3} {r.same_token!s:10} {r.near_tie!s:8} "
              f"{r.top_overlap:12} {r.max_abs_diff:13.5f} {r.missing:7}")  # fmt: skip


# ---- API facts for benchmark clients ----------------------------------------------------------


def probe_api(base: str, prompt: Sequence[int]) -> None:
    """What ``/v1/completions`` does with the fields a benchmark client sends (printed).

    ``prompt`` must not have been sent before (the cached-token counts start from zero)."""
    url = base + "/v1/completions"
    body: Json = {"prompt": list(prompt), "max_tokens": 4, "temperature": 0}
    for attempt in ("first", "repeat"):
        out = post(url, body)
        print(f"token-id prompt, {attempt}: usage={json.dumps(out.get('usage'))} "
              f"timings.cache_n={out.get('timings', {}).get('cache_n')}")  # fmt: skip
    eos_bias = {**body, "logit_bias": {"2": 100}}
    for ignore_eos in (False, True):
        out = post(url, {**eos_bias, "ignore_eos": ignore_eos})
        print(f"EOS forced by logit_bias, ignore_eos={ignore_eos}: "
              f"finish_reason={out['choices'][0]['finish_reason']} "
              f"completion_tokens={out['usage']['completion_tokens']}")  # fmt: skip
    for include in (True, False, None):
        options = {} if include is None else {"stream_options": {"include_usage": include}}
        events = post_stream(url, {**body, "stream": True, **options})
        last = events[-1]
        print(f"stream, include_usage={include}: {len(events)} events, "
              f"{sum(1 for e in events if e.get('usage'))} with usage; last: "
              f"choices={json.dumps(last.get('choices'))} usage={json.dumps(last.get('usage'))} "
              f"timings.cache_n={last.get('timings', {}).get('cache_n')}")  # fmt: skip


# ---- main --------------------------------------------------------------------------------------


def make_prompts(vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]
    return [*prompts, [1, *prompts[2]]]  # and one led by BOS


def run(args: argparse.Namespace, gguf: Path, log: Path) -> int:
    arch = dummy_arch(args.model)
    prompts = make_prompts(arch.vocab_size, args.seed)
    base = f"http://127.0.0.1:{args.port}"
    server = llama_server(args.llama_server, gguf, args.port, args.threads, args.server_arg, log)
    with server:
        theirs = [llama_steps(base, p, args.n_predict) for p in prompts]
        problems = tokenizer_failures(base, Tokenizer.dummy(arch.vocab_size))
        print(f"/tokenize and /detokenize: {len(TEXTS) * 2 - len(problems)}/{len(TEXTS) * 2} agree")
        if args.probe_api:
            probe_api(base, make_prompts(arch.vocab_size, args.seed + 1)[3])
    ours = our_steps(args.model, args.seed, prompts, args.n_predict)
    reports = [r for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
               for r in compare(i, a, b, args.tol)]  # fmt: skip
    print_reports(reports)
    first = [r for r in reports if r.position == 0]
    print(f"first greedy token agrees: {sum(r.same_token for r in first)}/{len(first)}; "
          f"max |dlogprob| over llama.cpp top-{TOP_K}: {max(r.max_abs_diff for r in reports):.2e}; "
          f"positions compared: {len(reports)}")  # fmt: skip
    problems += failures(reports, args.tol)
    for p in problems:
        print("MISMATCH", p)
    print("OK" if not problems else f"{len(problems)} mismatches")
    return 0 if not problems else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--llama-server", required=True, help="path of the llama-server binary")
    p.add_argument("--model", default="dummy:small", help="dummy:<preset>")
    p.add_argument("--seed", type=int, default=0, help="weight seed (and prompt seed)")
    p.add_argument("--dtype", choices=("f16", "f32"), default="f16", help="GGUF matrix dtype")
    p.add_argument("--gguf", type=Path, help="where to write the export (default: a temp dir)")
    p.add_argument("--port", type=int, default=8399)
    p.add_argument("--threads", type=int, default=1, help="llama-server -t and torch threads")
    p.add_argument("--n-predict", type=int, default=8)
    p.add_argument("--tol", type=float, default=0.05, help="max |logprob difference|")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra llama-server argument (repeat; e.g. --server-arg=-ctk --server-arg=f32)",
    )
    p.add_argument("--probe-api", action="store_true", help="print /v1/completions facts")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = args.gguf or Path(tmp) / "model.gguf"
        export_gguf(args.model, gguf, seed=args.seed, dtype=args.dtype)
        log = Path(tmp) / "llama-server.log"
        try:
            return run(args, gguf, log)
        except RuntimeError as e:
            print(f"gguf_parity: {e}; server log tail:\n{log.read_text()[-3000:]}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())

"""Offline generation throughput: MemServe's engine vs Hugging Face ``generate``, same run.

Both load the same weights (``dummy:small`` exported once as a Hugging Face directory), get the same
prompts (seeded random token ids) and produce the same number of tokens (greedy, EOS ignored).
For every dtype and batch size it prints output tokens/s of both, the ratio, the greedy agreement
of the two token streams, and the fraction of the machine's matrix-product rate each reaches
(measured by this script on the model's own shapes and that batch size).

    .venv/bin/python benchmarks/engine_throughput.py [--batch-sizes 1,8,32] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from memserve.config import CacheConfig, DTypeName, EngineConfig, ModelConfig, SchedulerConfig
from memserve.engine.offline import LLM
from memserve.engine.types import SamplingParams
from memserve.model.arch import LlamaArch
from memserve.model.loader import export_hf, read_arch
from memserve.model.ops import pack_weight, select_linear

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Row:
    dtype: str
    batch: int
    hf_tok_s: float
    ours_tok_s: float
    ratio: float
    greedy_agreement: float
    matmul_native_gflops: float
    matmul_best_gflops: float
    ours_fraction_of_best: float
    hf_fraction_of_best: float


def _timed(fn: Callable[[], list[list[int]]], repeats: int) -> tuple[float, list[list[int]]]:
    """Best wall time of ``repeats`` runs, and the last run's result."""
    best, result = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_rate(arch: LlamaArch, dtype: torch.dtype, batch: int, ours: bool) -> float:
    """GFLOP/s of a gate/up-shaped product at this batch (median of repeats): torch's own
    ``F.linear`` (what ``nn.Linear`` and HF run) when ``ours`` is False, else the engine's kernel on
    its packed weight layout."""
    x = torch.randn(batch, arch.hidden_size).to(dtype)
    w = torch.randn(2 * arch.intermediate_size, arch.hidden_size).to(dtype)
    flops = 2 * batch * w.shape[0] * w.shape[1]
    if ours:
        linear, weight = select_linear(dtype, torch.device("cpu")), pack_weight(w)
    else:
        linear, weight = F.linear, w
    runs = sorted(_time(lambda: linear(x, weight)) for _ in range(max(5, 64 // batch)))
    return flops / runs[len(runs) // 2] / 1e9


def matmul_flops_per_token(arch: LlamaArch) -> int:
    per_layer = arch.hidden_size * (2 * arch.q_size + 2 * arch.kv_size + 3 * arch.intermediate_size)
    return 2 * (arch.num_layers * per_layer + arch.vocab_size * arch.hidden_size)


def run_hf(model: LlamaForCausalLM, prompts: torch.Tensor, out_len: int) -> list[list[int]]:
    with torch.inference_mode():
        out = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=out_len,
            min_new_tokens=out_len,
            do_sample=False,
            pad_token_id=0,
        )
    return [row[prompts.shape[1] :] for row in out.tolist()]


def run_ours(llm: LLM, prompts: torch.Tensor, out_len: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    return [c.token_ids for c in llm.generate(prompts.tolist(), params)]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of sequences whose greedy tokens agree up to the first divergence, averaged."""
    total = 0.0
    for x, y in zip(a, b, strict=True):
        same = next((i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q), len(x))
        total += same / len(x)
    return total / len(a)


def bench_dtype(model_dir: Path, dtype_name: str, args: argparse.Namespace) -> list[Row]:
    dtype = _DTYPES[dtype_name]
    arch = read_arch(model_dir)
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
    hf.train(False)
    hf.generation_config.eos_token_id = None
    config = EngineConfig(
        model=ModelConfig(str(model_dir), dtype=cast(DTypeName, dtype_name)),
        cache=CacheConfig(memory_gib=2.0),
        scheduler=SchedulerConfig(max_num_seqs=max(args.batch_sizes), max_num_batched_tokens=8192),
    )
    llm = LLM(config)
    gen = torch.Generator().manual_seed(0)
    flops_per_token = matmul_flops_per_token(arch)
    rows = []
    for batch in args.batch_sizes:
        prompts = torch.randint(3, arch.vocab_size, (batch, args.prompt_len), generator=gen)
        run_hf(hf, prompts[:1, :8], 2)  # warm-up
        run_ours(llm, prompts[:1, :8], 2)
        t_hf, hf_out = _timed(lambda: run_hf(hf, prompts, args.output_len), args.repeats)  # noqa: B023
        t_ours, ours_out = _timed(lambda: run_ours(llm, prompts, args.output_len), args.repeats)  # noqa: B023
        native = matmul_rate(arch, dtype, batch, ours=False)
        best = max(native, matmul_rate(arch, dtype, batch, ours=True))
        tokens = batch * args.output_len
        hf_tok_s, ours_tok_s = tokens / t_hf, tokens / t_ours
        rows.append(
            Row(
                dtype_name,
                batch,
                hf_tok_s,
                ours_tok_s,
                ours_tok_s / hf_tok_s,
                agreement(hf_out, ours_out),
                native,
                best,
                ours_tok_s * flops_per_token / 1e9 / best,
                hf_tok_s * flops_per_token / 1e9 / best,
            )
        )
        print(_format(rows[-1]), flush=True)
    return rows


def _format(r: Row) -> str:
    return (
        f"{r.dtype:9} B={r.batch:<3} HF {r.hf_tok_s:7.1f} tok/s | ours {r.ours_tok_s:7.1f} tok/s | "
        f"ratio {r.ratio:5.2f}x | greedy agree {r.greedy_agreement:5.1%} | matmul native "
        f"{r.matmul_native_gflops:6.1f} best {r.matmul_best_gflops:6.1f} GFLOP/s | "
        f"fraction of best: ours {r.ours_fraction_of_best:5.1%} HF {r.hf_fraction_of_best:5.1%}"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="dummy:small", help="dummy preset to export and load in both")
    p.add_argument(
        "--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32]
    )
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["float32", "bfloat16"])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="runs per measurement; the best is kept")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# {platform.processor() or platform.machine()} | torch {torch.__version__} | "
        f"threads {torch.get_num_threads()} | prompt {args.prompt_len} | output {args.output_len}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export_hf(args.model, Path(tmp) / "model")
        rows = [r for d in args.dtypes for r in bench_dtype(model_dir, d, args)]
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()

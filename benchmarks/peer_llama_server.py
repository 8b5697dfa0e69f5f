"""MemServe vs llama.cpp's ``llama-server`` on the same weights and the same multi-session workload.

    .venv/bin/python benchmarks/peer_llama_server.py --llama-server /path/to/llama-server \\
        --workload sharegpt:num=24,rate=0.3,answer_tokens=96

Exports ``--model`` (a ``dummy:`` preset) to GGUF (``memserve-node export-gguf``, f16), then runs
the same workload against each engine in turn, one at a time, on the same cores:

- ``llama-server`` with ``--threads CORES --parallel SLOTS`` (continuous batching across its
  slots; each slot reuses the longest common prefix of its previous prompt, llama.cpp's prompt
  cache);
- MemServe as ``memserve-node cluster`` shapes given by ``--memserve`` (default: one colocated node
  with all cores, and two colocated instances of half the cores behind the scheduler).

The client uses ``--history stand-in`` so both engines see exactly the same prompts (their
greedy answers differ: f16 vs bf16 rounding on random weights). Prints one row per engine and the
ratios against llama-server; ``--out-dir`` gets a JSON per engine and ``peer.md``. Not part of CI (needs llama.cpp).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from memserve.bench.client import BenchmarkClient, ClientConfig, fetch_model
from memserve.bench.launch import NODE_COMMAND, free_port, local_process, wait_serving
from memserve.bench.matrix import WorkloadSpec
from memserve.bench.report import Summary, summarize

KEYS = ("mean_ttft_ms", "p99_ttft_ms", "mean_e2el_ms", "p99_e2el_ms", "mean_tpot_ms")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--llama-server", required=True, help="path of the llama-server binary")
    p.add_argument("--model", default="dummy:small")
    p.add_argument("--workload", default="sharegpt:num=24,rate=0.3,answer_tokens=96")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--slots", type=int, default=8, help="llama-server --parallel")
    p.add_argument("--ctx-per-slot", type=int, default=4096)
    p.add_argument(
        "--memserve",
        action="append",
        default=None,
        help="a MemServe shape: node (one process) or colocated:N / pd:P+D behind a scheduler",
    )
    p.add_argument("--memserve-args", default="", help="extra flags for every MemServe process")
    p.add_argument("--out-dir", type=Path, default=Path("peer-results"))
    return p.parse_args(argv)


def export(model: str, out_dir: Path) -> Path:
    path = out_dir / f"{model.replace(':', '-')}.gguf"
    if not path.exists():
        cmd = [*NODE_COMMAND, "export-gguf", model, str(path), "--dtype", "f16"]
        subprocess.run(cmd, check=True)
    return path


def llama_command(args: argparse.Namespace, gguf: Path, port: int) -> list[str]:
    return [
        args.llama_server, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "--threads", str(args.cores), "--threads-batch", str(args.cores),
        "--parallel", str(args.slots), "--ctx-size", str(args.slots * args.ctx_per_slot),
    ]  # fmt: skip


def memserve_command(args: argparse.Namespace, shape: str, port: int) -> list[str]:
    extra = args.memserve_args.split()
    common = ["--model", args.model, "--port", str(port), *extra]
    if shape == "node":
        return [*NODE_COMMAND, *common, "--num-threads", str(args.cores)]
    kind, _, count = shape.partition(":")
    if kind == "colocated":
        return [*NODE_COMMAND, "cluster", "--colocated", count, "--prefill", "0", "--decode", "0",
                *common]  # fmt: skip
    if kind == "pd":
        prefill, _, decode = count.partition("+")
        return [*NODE_COMMAND, "cluster", "--prefill", prefill, "--decode", decode, *common]
    raise SystemExit(f"unknown MemServe shape {shape!r}")


def run_engine(name: str, cmd: list[str], port: int, spec: WorkloadSpec, out_dir: Path) -> Summary:
    """Start ``cmd``, warm it up with one request, run the workload, stop it."""
    url = f"http://127.0.0.1:{port}"
    log_path = out_dir / f"{name}.log"
    with local_process(cmd, url, log_path, healthy_timeout_s=600, stop_timeout_s=60):
        model = asyncio.run(fetch_model(url))
        wait_serving(url, model, 300)
        config = ClientConfig(url=url, model=model, history="stand-in", warmup=spec.warmup)
        records = asyncio.run(BenchmarkClient(spec.make(), config).run())
    summary = summarize(records)
    body = {"engine": name, "command": cmd, **summary, "requests": [r.__dict__ for r in records]}
    (out_dir / f"{name}.json").write_text(json.dumps(body, indent=1))
    return summary


def table(results: dict[str, Summary], baseline: str) -> str:
    lines = [
        "| engine | TTFT avg / P99 (s) | JCT avg / P99 (s) | TPOT avg (ms) | output tok/s | hit rate "
        "| TTFT avg / P99 vs llama-server | JCT avg / P99 vs llama-server |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = results[baseline]
    for name, s in results.items():

        def ratio(key: str, s: Summary = s) -> str:
            a, b = s.get(key), base.get(key)
            return "—" if a is None or not b else f"{a / b:.2f}x"

        hit = s.get("hit_rate")
        lines.append(
            f"| {name} | {_sec(s, 'mean_ttft_ms')} / {_sec(s, 'p99_ttft_ms')} "
            f"| {_sec(s, 'mean_e2el_ms')} / {_sec(s, 'p99_e2el_ms')} "
            f"| {s.get('mean_tpot_ms') or 0:.1f} | {s.get('output_throughput') or 0:.1f} "
            f"| {'n/a' if hit is None else f'{100 * hit:.1f} %'} "
            f"| {ratio('mean_ttft_ms')} / {ratio('p99_ttft_ms')} "
            f"| {ratio('mean_e2el_ms')} / {ratio('p99_e2el_ms')} |"
        )
    return "\n".join(lines)


def _sec(s: Summary, key: str) -> str:
    value = s.get(key)
    return "—" if value is None else f"{value / 1000:.2f}"


def main() -> int:
    args = parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    spec = WorkloadSpec.parse(args.workload)
    gguf = export(args.model, args.out_dir)
    results: dict[str, Summary] = {}
    port = free_port()
    print(f"[peer] llama-server on {gguf}", file=sys.stderr)
    results["llama-server"] = run_engine(
        "llama-server", llama_command(args, gguf, port), port, spec, args.out_dir
    )
    for shape in args.memserve or ["node", f"colocated:{args.cores}"]:
        port = free_port()
        name = f"memserve-{shape.replace(':', '-').replace('+', '-')}"
        print(f"[peer] {name}", file=sys.stderr)
        results[name] = run_engine(
            name, memserve_command(args, shape, port), port, spec, args.out_dir
        )
    text = table(results, "llama-server")
    print(f"{time.strftime('%Y-%m-%d %H:%M')} {spec.label()}\n\n{text}")
    (args.out_dir / "peer.md").write_text(text + "\n")
    return 0 if all(s["completed"] for s in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

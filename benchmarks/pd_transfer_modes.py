"""By-layer vs by-request KV transfer in a real prefill/decode pair, at low and high load.

Starts a decode node (the front door, hosting the rendezvous store) and a prefill node on this
machine for each ``--transfer-mode``, with ``--pd-caching basic`` so every request moves its whole
prompt KV (no cache effects), and sends ``--requests`` distinct random prompts of
``--prompt-tokens`` tokens with ``max_tokens`` 4, ``--concurrency`` at a time, through the
official ``openai`` client (streaming). It reports the median and p90 time to first token (the
first token needs the whole prompt KV on the decode side) and, from the prefill node's
``/metrics``, the mean *exposed* transfer time per request: from the end of its prefill to its KV
being delivered (by layer, most of the transfer happens during the prefill).
Modes alternate ``--repeats`` times; figures are medians over the repeats.

    .venv/bin/python benchmarks/pd_transfer_modes.py [--model dummy:small] [--concurrency 1 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import openai
from prometheus_client.parser import text_string_to_metric_families

from memserve.bench.launch import free_port, local_node

MODES = ("by-request", "by-layer")


@contextmanager
def pd_pair(model: str, mode: str, kv_gib: float, log_dir: Path) -> Iterator[tuple[str, str]]:
    """A decode + prefill pair; yields (decode URL, prefill URL) once a request went through."""
    store = f"127.0.0.1:{free_port()}"
    common = [
        "--model",
        model,
        "--pd-caching",
        "basic",
        "--rendezvous",
        store,
        "--kv-cache-memory",
        str(kv_gib),
        "--num-threads",
        "1",
        "--log-level",
        "warning",
    ]
    with ExitStack() as stack:
        d = stack.enter_context(
            local_node(
                ["--role", "decode", "--host-rendezvous", "--transfer-mode", mode, *common],
                log_dir / f"d-{mode}.log",
            )
        )
        p = stack.enter_context(
            local_node(["--role", "prefill", *common], log_dir / f"p-{mode}.log")
        )
        client = openai.OpenAI(base_url=d.url + "/v1", api_key="-", max_retries=0)
        deadline = time.monotonic() + 60
        while True:  # the decode sees the prefill within a registry poll
            try:
                client.completions.create(model=model, prompt=[5, 6, 7], max_tokens=1)
                break
            except openai.APIStatusError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield d.url, p.url


def exposed(url: str) -> tuple[float, float]:
    """The prefill node's (exposed transfer seconds, transfers timed) counters."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    return tuple(  # type: ignore[return-value]
        families[name].samples[0].value
        for name in (
            "memserve_kv_transfer_exposed_seconds",
            "memserve_kv_transfer_exposed_transfers",
        )
    )


async def ttfts(
    url: str, model: str, prompts: Sequence[list[int]], concurrency: int
) -> list[float]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: list[int]) -> float:
        async with gate:
            t0 = time.perf_counter()
            stream = await client.completions.create(
                model=model, prompt=prompt, max_tokens=4, temperature=0, stream=True
            )
            first = None
            async for _ in stream:
                first = first or time.perf_counter() - t0
            assert first is not None
            return first

    try:
        return list(await asyncio.gather(*(one(p) for p in prompts)))
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dummy:small")
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-gib", type=float, default=1.0)
    ap.add_argument("--json", type=Path, default=None, help="also write the table's rows here")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: dummy:tiny, 4 short prompts, 1 repeat"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.prompt_tokens, args.requests, args.repeats = "dummy:tiny", 64, 4, 1
        args.concurrency, args.kv_gib = [1, 4], 0.25
    rng = random.Random(0)
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for mode in MODES:
                with pd_pair(args.model, mode, args.kv_gib, Path(tmp)) as (d_url, p_url):
                    for c in args.concurrency:
                        prompts = [
                            [rng.randrange(3, 32000) for _ in range(args.prompt_tokens)]
                            for _ in range(args.requests)
                        ]
                        s0, n0 = exposed(p_url)
                        t = sorted(asyncio.run(ttfts(d_url, args.model, prompts, c)))
                        s1, n1 = exposed(p_url)
                        p90 = t[min(len(t) - 1, int(0.9 * len(t)))]
                        wait_ms = 1e3 * (s1 - s0) / max(1.0, n1 - n0)
                        results.setdefault((mode, c), []).append(
                            (statistics.median(t), p90, wait_ms)
                        )
                        print(
                            f"repeat {repeat} {mode:10s} c={c}: TTFT median "
                            f"{statistics.median(t):.3f} s, exposed transfer {wait_ms:.1f} ms",
                            flush=True,
                        )
    print(
        f"\n{args.model}, {args.prompt_tokens}-token prompts, {args.requests} requests, "
        f"medians over {args.repeats} repeats\n"
    )
    print(
        "| concurrency | mode | TTFT median (s) | TTFT p90 (s) | by-layer / by-request "
        "| exposed transfer per request (ms) |"
    )
    print("|---|---|---|---|---|---|")
    rows = []
    for c in args.concurrency:
        base = statistics.median(r[0] for r in results[("by-request", c)])
        for mode in MODES:
            med, p90, wait_ms = (
                statistics.median(r[i] for r in results[(mode, c)]) for i in range(3)
            )
            print(f"| {c} | {mode} | {med:.3f} | {p90:.3f} | {med / base:.2f} | {wait_ms:.1f} |")
            rows.append(
                {
                    "concurrency": c,
                    "mode": mode,
                    "ttft_median_s": med,
                    "ttft_p90_s": p90,
                    "exposed_transfer_ms": wait_ms,
                }
            )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

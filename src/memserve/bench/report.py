"""The numbers of a ``memserve-bench`` run: pure functions over per-request records.

Definitions follow vLLM's ``bench serve`` so the JSON can be compared field by field:

- TTFT: first chunk with a choice − request sent. E2EL: end of the stream − request sent.
- TPOT: (E2EL − TTFT) / (output tokens − 1), only for outputs of more than one token.
- ITL: every gap between consecutive chunks of every successful request.
- percentiles: numpy's default (linear interpolation between closest ranks); ``std`` is the
  population standard deviation (numpy's ``np.std``).
- throughputs divide by ``duration``: first measured request sent → last measured one ended.
- goodput: successful requests meeting every given SLO bound, per second; like vLLM an output of
  one token counts as TPOT 0.

Ours on top: ``failed``, ``num_cached_tokens`` (``usage.prompt_tokens_details.cached_tokens``
summed) and ``hit_rate`` (those over the prompt tokens of the requests that reported them; None
when none did), ``p90_*``, ``input_throughput``. A statistic of no samples is None, not 0.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (90, 99)
LATENCY_HEADINGS = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}

Summary = dict[str, float | int | None]


@dataclass(frozen=True)
class RequestRecord:
    """One request as the client saw it. Times are seconds since the benchmark started."""

    session_id: str
    turn_index: int
    num_prompt_tokens: int
    num_cached_tokens: int | None  # None: the server did not report it
    num_output_tokens: int  # usage.completion_tokens, else the number of chunks
    start_s: float
    chunk_times_s: tuple[float, ...]  # arrival of each chunk carrying a choice; [0] is TTFT's
    end_s: float
    error: str | None = None  # None: success
    warmup: bool = False  # excluded from the summary

    @property
    def success(self) -> bool:
        return self.error is None

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times_s[0] - self.start_s if self.chunk_times_s else None

    @property
    def e2el_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def tpot_s(self) -> float | None:
        ttft = self.ttft_s
        if ttft is None or self.num_output_tokens <= 1:
            return None
        return (self.e2el_s - ttft) / (self.num_output_tokens - 1)

    @property
    def itls_s(self) -> list[float]:
        times = self.chunk_times_s
        return [b - a for a, b in itertools.pairwise(times)]


def percentile(values: Sequence[float], p: float) -> float:
    """numpy's default ``np.percentile``: rank ``p/100 * (n-1)``, interpolated linearly."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = p / 100 * (len(ordered) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def latency_stats(name: str, values_s: Sequence[float]) -> Summary:
    """``mean/median/std/p90/p99_<name>_ms`` of ``values_s`` (seconds in, milliseconds out)."""
    ms = [v * 1000 for v in values_s]
    if not ms:
        keys = ["mean", "median", "std", *(f"p{p}" for p in PERCENTILES)]
        return {f"{k}_{name}_ms": None for k in keys}
    mean = sum(ms) / len(ms)
    stats: Summary = {
        f"mean_{name}_ms": mean,
        f"median_{name}_ms": percentile(ms, 50),
        f"std_{name}_ms": math.sqrt(sum((v - mean) ** 2 for v in ms) / len(ms)),
    }
    for p in PERCENTILES:
        stats[f"p{p}_{name}_ms"] = percentile(ms, p)
    return stats


def meets_slo(record: RequestRecord, slo_s: Mapping[str, float]) -> bool:
    """Whether a successful ``record`` is within every bound of ``slo_s`` (keys in
    ``SLO_METRICS``, seconds)."""
    values = {"ttft": record.ttft_s, "tpot": record.tpot_s or 0.0, "e2el": record.e2el_s}
    return record.success and all(
        (v := values[k]) is not None and v <= bound for k, bound in slo_s.items()
    )


def summarize(
    records: Sequence[RequestRecord], slo_s: Mapping[str, float] | None = None
) -> Summary:
    """The summary of the non-warm-up ``records``; ``request_goodput`` is None without ``slo_s``."""
    unknown = set(slo_s or {}) - set(SLO_METRICS)
    if unknown:
        raise ValueError(f"unknown SLO metrics {sorted(unknown)}; known: {list(SLO_METRICS)}")
    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.success]
    duration = (
        (max(r.end_s for r in measured) - min(r.start_s for r in measured)) if measured else 0.0
    )
    num_input = sum(r.num_prompt_tokens for r in ok)
    num_output = sum(r.num_output_tokens for r in ok)
    reported = [r for r in ok if r.num_cached_tokens is not None]
    num_cached = sum(r.num_cached_tokens or 0 for r in reported)
    num_reported_prompt = sum(r.num_prompt_tokens for r in reported)

    def per_s(n: float) -> float | None:
        return n / duration if duration > 0 else None

    summary: Summary = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(measured) - len(ok),
        "total_input_tokens": num_input,
        "total_output_tokens": num_output,
        "request_throughput": per_s(len(ok)),
        "request_goodput": per_s(sum(meets_slo(r, slo_s) for r in ok)) if slo_s else None,
        "input_throughput": per_s(num_input),
        "output_throughput": per_s(num_output),
        "total_token_throughput": per_s(num_input + num_output),
        "num_cached_tokens": num_cached if reported else None,
        "hit_rate": num_cached / num_reported_prompt if num_reported_prompt else None,
    }
    summary |= latency_stats("ttft", [t for r in ok if (t := r.ttft_s) is not None])
    summary |= latency_stats("tpot", [t for r in ok if (t := r.tpot_s) is not None])
    summary |= latency_stats("itl", [gap for r in ok for gap in r.itls_s])
    summary |= latency_stats("e2el", [r.e2el_s for r in ok])
    return summary


def parse_slo(text: str) -> dict[str, float]:
    """``"ttft=0.5,tpot=0.05"`` (seconds) → ``{"ttft": 0.5, "tpot": 0.05}``; ``e2e`` means e2el."""
    slo: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = "e2el" if key.strip() == "e2e" else key.strip()
        if not sep or key not in SLO_METRICS:
            raise ValueError(f"bad SLO item {item!r}: want one of {list(SLO_METRICS)} = seconds")
        slo[key] = float(value)
    return slo


def format_table(
    summary: Mapping[str, float | int | None], title: str = "Serving Benchmark Result"
) -> str:
    """A text table in the shape of vLLM's ``bench serve`` summary."""
    rows: list[tuple[str, str]] = [
        ("Successful requests:", _fmt(summary["completed"])),
        ("Failed requests:", _fmt(summary["failed"])),
        ("Benchmark duration (s):", _fmt(summary["duration"])),
        ("Total input tokens:", _fmt(summary["total_input_tokens"])),
        ("Total generated tokens:", _fmt(summary["total_output_tokens"])),
        ("Cached prompt tokens:", _fmt(summary["num_cached_tokens"])),
        ("Prefix cache hit rate:", _fmt(summary["hit_rate"], 4)),
        ("Request throughput (req/s):", _fmt(summary["request_throughput"])),
        ("Request goodput (req/s):", _fmt(summary["request_goodput"])),
        ("Output token throughput (tok/s):", _fmt(summary["output_throughput"])),
        ("Total Token throughput (tok/s):", _fmt(summary["total_token_throughput"])),
    ]
    lines = [f"{f' {title} ':=^50}", *(f"{k:<40}{v:>10}" for k, v in rows)]
    for name, heading in LATENCY_HEADINGS.items():
        lines.append(f"{f' {heading} ':-^50}")
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            value = _fmt(summary[f"{stat}_{name}_ms"])
            lines.append(f"{f'{label} {name.upper()} (ms):':<40}{value:>10}")
    lines.append("=" * 50)
    return "\n".join(lines)


def _fmt(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def plot_cdfs(records: Sequence[RequestRecord], out_dir: str) -> list[str]:
    """PNG latency CDFs of TTFT, TPOT and E2EL of the measured successful records into
    ``out_dir``; returns the paths. Raises ImportError when matplotlib is not installed."""
    matplotlib = importlib.import_module("matplotlib")  # lazily: an optional dependency
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    ok = [r for r in records if r.success and not r.warmup]
    series = {
        "ttft": [t for r in ok if (t := r.ttft_s) is not None],
        "tpot": [t for r in ok if (t := r.tpot_s) is not None],
        "e2el": [r.e2el_s for r in ok],
    }
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, values in series.items():
        ms = sorted(v * 1000 for v in values)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))], drawstyle="steps-post")
        ax.set_xlabel(f"{name.upper()} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(True, alpha=0.3)
        path = os.path.join(out_dir, f"cdf_{name}.png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def plot_vs_rate(rates: Sequence[float], summaries: Sequence[Summary], out_dir: str) -> str:
    """One PNG of mean and P99 TTFT and E2EL against the offered rate; returns its path. Raises
    ImportError when matplotlib is not installed."""
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, name in zip(axes, ("ttft", "e2el"), strict=True):
        for stat in ("mean", "p99"):
            values = [s[f"{stat}_{name}_ms"] for s in summaries]
            ax.plot(rates, [math.nan if v is None else v for v in values], "o-", label=stat)
        ax.set_xlabel("offered rate (sessions/s)")
        ax.set_ylabel(f"{name.upper()} (ms)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "latency_vs_rate.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path

"""The tables and plots of ``memserve-bench matrix`` (pure functions of its cells).

``matrix_tables`` gives Markdown: per workload, one row per run (absolute figures and the change
against the colocated baseline under the same policy), then one table in the shape of the
paper's results table (../shared/MEMSERVE.md), one row per workload and policy:

- disaggregation vs colocated: PD-Basic against PD-colocated without caching, JCT avg / P99;
- + caching vs disaggregation: PD-Caching-3 against PD-Basic, JCT avg / P99;
- + caching, TTFT: the same pair, TTFT avg / P99;
- caching when colocated: PD-colocated + caching against PD-colocated, JCT avg / TTFT avg.

A change is ``(ours - theirs) / theirs`` in percent; negative is better. A cell missing from the
run (or a statistic without samples) shows as "—".
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from memserve.bench.matrix import CONFIGS, Cell

_PAPER_PAIRS = (
    ("disaggregation vs colocated: JCT avg / P99", "pd-basic", "colocated", "e2el"),
    ("+ caching vs disaggregation: JCT avg / P99", "pd-caching-3", "pd-basic", "e2el"),
    ("+ caching: TTFT avg / P99", "pd-caching-3", "pd-basic", "ttft"),
)


def change(ours: float | int | None, theirs: float | int | None) -> float | None:
    """Relative change of ``ours`` against ``theirs`` in percent (None if either is missing)."""
    if ours is None or theirs is None or theirs == 0:
        return None
    return 100.0 * (ours - theirs) / theirs


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:+.1f} %"


def _s(summary: Mapping[str, Any], key: str) -> str:
    value = summary.get(key)
    return "—" if value is None else f"{value / 1000:.2f}"


def _index(cells: Iterable[Cell]) -> dict[tuple[str, str, str], Cell]:
    return {(c.workload, c.config, c.policy): c for c in cells}


def run_table(cells: Sequence[Cell]) -> str:
    """One Markdown row per run of one workload, in matrix order."""
    index = _index(cells)
    lines = [
        "| configuration | policy | P+D+C | TTFT avg / P99 (s) | JCT avg / P99 (s) "
        "| TPOT avg (ms) | hit rate | req/s | failed | vs colocated: TTFT avg / JCT avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        base = index.get((c.workload, "colocated", c.policy))
        s = c.summary
        versus = "—"
        if base is not None and base is not c:
            ttft = change(s.get("mean_ttft_ms"), base.summary.get("mean_ttft_ms"))
            jct = change(s.get("mean_e2el_ms"), base.summary.get("mean_e2el_ms"))
            versus = f"{_pct(ttft)} / {_pct(jct)}"
        hit = s.get("hit_rate")
        tpot = s.get("mean_tpot_ms")
        rate = s.get("request_throughput")
        lines.append(
            f"| {CONFIGS[c.config].paper_name} | {c.policy} | {'+'.join(map(str, c.shape))} "
            f"| {_s(s, 'mean_ttft_ms')} / {_s(s, 'p99_ttft_ms')} "
            f"| {_s(s, 'mean_e2el_ms')} / {_s(s, 'p99_e2el_ms')} "
            f"| {'—' if tpot is None else f'{tpot:.1f}'} "
            f"| {'—' if hit is None else f'{100 * hit:.1f} %'} "
            f"| {'—' if rate is None else f'{rate:.2f}'} | {s.get('failed')} | {versus} |"
        )
    return "\n".join(lines)


def paper_table(cells: Sequence[Cell]) -> str:
    """The paper-shaped table: one row per (workload, policy) in the order first run."""
    index = _index(cells)
    rows = list(dict.fromkeys((c.workload, c.policy) for c in cells))
    header = " | ".join(title for title, *_ in _PAPER_PAIRS)
    lines = [
        f"| workload | policy | {header} | caching when colocated: JCT avg / TTFT avg |",
        "|---|---|---|---|---|---|",
    ]
    for workload, policy in rows:
        entries = []
        for _, ours, theirs, metric in _PAPER_PAIRS:
            a, b = index.get((workload, ours, policy)), index.get((workload, theirs, policy))
            entries.append(_pair(a, b, (f"mean_{metric}_ms", f"p99_{metric}_ms")))
        a, b = (
            index.get((workload, "colocated-cache", policy)),
            index.get((workload, "colocated", policy)),
        )
        entries.append(_pair(a, b, ("mean_e2el_ms", "mean_ttft_ms")))
        lines.append(f"| {workload} | {policy} | " + " | ".join(entries) + " |")
    return "\n".join(lines)


def _pair(ours: Cell | None, theirs: Cell | None, keys: tuple[str, str]) -> str:
    if ours is None or theirs is None:
        return "—"
    return " / ".join(_pct(change(ours.summary.get(k), theirs.summary.get(k))) for k in keys)


def matrix_tables(cells: Sequence[Cell], labels: Mapping[str, str] | None = None) -> str:
    """The whole Markdown report: a run table per workload, then the paper-shaped table."""
    parts = []
    for workload in dict.fromkeys(c.workload for c in cells):
        title = (labels or {}).get(workload, workload)
        parts.append(f"### {title}\n\n" + run_table([c for c in cells if c.workload == workload]))
    parts.append("### In the shape of the paper's table\n\n" + paper_table(cells))
    return "\n\n".join(parts) + "\n"


def plot_matrix(cells: Sequence[Cell], out_dir: str) -> list[str]:
    """Per workload, a bar chart of mean and P99 TTFT and JCT for every run, as PNG; returns the
    paths. Raises ImportError when matplotlib is not installed."""
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for workload in dict.fromkeys(c.workload for c in cells):
        mine = [c for c in cells if c.workload == workload]
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for ax, metric, title in ((axes[0], "ttft", "TTFT"), (axes[1], "e2el", "JCT")):
            _bars(ax, mine, metric)
            ax.set_title(f"{workload}: {title}")
        axes[0].legend(fontsize=8)
        path = os.path.join(out_dir, f"matrix_{workload}.png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def _bars(ax: Any, cells: Sequence[Cell], metric: str) -> None:
    names = [f"{c.config}\n{c.policy}" for c in cells]
    xs = range(len(cells))
    for offset, stat in ((-0.2, "mean"), (0.2, "p99")):
        values = [(c.summary.get(f"{stat}_{metric}_ms") or 0) / 1000 for c in cells]
        ax.bar([x + offset for x in xs], values, width=0.4, label=stat)
    ax.set_xticks(list(xs), names, rotation=60, fontsize=7, ha="right")
    ax.set_ylabel("seconds")
    ax.grid(True, axis="y", alpha=0.3)

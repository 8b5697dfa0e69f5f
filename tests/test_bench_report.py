"""``memserve.bench.report``: the summary against hand-computed values on a few records."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest

from memserve.bench.report import (
    RequestRecord,
    format_table,
    parse_slo,
    percentile,
    plot_cdfs,
    summarize,
)


def _record(
    start_s: float,
    chunks: tuple[float, ...],
    end_s: float,
    *,
    num_output_tokens: int,
    num_prompt_tokens: int = 10,
    num_cached_tokens: int | None = None,
    error: str | None = None,
    warmup: bool = False,
) -> RequestRecord:
    return RequestRecord(
        "s", 0, num_prompt_tokens, num_cached_tokens, num_output_tokens, start_s, chunks, end_s,
        error, warmup,
    )  # fmt: skip


# ttft 0.1 / tpot 0.2 / e2el 0.5 / itls 0.1, 0.2
R1 = _record(0.0, (0.1, 0.2, 0.4), 0.5, num_output_tokens=3, num_cached_tokens=4)
# ttft 0.3 / no tpot (one token) / e2el 0.3 / no itl
R2 = _record(1.0, (1.3,), 1.3, num_output_tokens=1, num_prompt_tokens=20)
# ttft 0.2 / tpot 0.2 / e2el 0.4 / itl 0.1
R3 = _record(0.5, (0.7, 0.8), 0.9, num_output_tokens=2, num_prompt_tokens=30, num_cached_tokens=15)
FAILED = _record(0.2, (), 2.0, num_output_tokens=0, error="HTTP 500: boom")
WARMUP = _record(5.0, (5.1,), 10.0, num_output_tokens=1, num_cached_tokens=0, warmup=True)
RECORDS = [R1, R2, R3, FAILED, WARMUP]


def test_record_latencies() -> None:
    assert R1.ttft_s == pytest.approx(0.1)
    assert R1.tpot_s == pytest.approx(0.2)
    assert R1.e2el_s == pytest.approx(0.5)
    assert R1.itls_s == pytest.approx([0.1, 0.2])
    assert R2.tpot_s is None and R2.itls_s == []
    assert FAILED.ttft_s is None and not FAILED.success


def test_percentile_matches_numpy() -> None:
    assert percentile([100, 200, 300], 90) == pytest.approx(280)
    assert percentile([100, 200, 300], 99) == pytest.approx(298)
    assert percentile([7.0], 50) == 7.0
    rng = random.Random(0)
    for n in (1, 2, 5, 17):
        values = [rng.random() for _ in range(n)]
        for p in (0, 25, 50, 90, 99, 100):
            assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))
    with pytest.raises(ValueError):
        percentile([], 50)


def test_counts_and_throughputs() -> None:
    s = summarize(RECORDS)
    # Warm-up is left out; the failed request still counts in the duration (0.0 .. 2.0).
    assert s["duration"] == pytest.approx(2.0)
    assert (s["completed"], s["failed"]) == (3, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (60, 6)
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["input_throughput"] == pytest.approx(30)
    assert s["output_throughput"] == pytest.approx(3)
    assert s["total_token_throughput"] == pytest.approx(33)
    assert s["request_goodput"] is None


def test_latency_stats() -> None:
    s = summarize(RECORDS)
    assert s["mean_ttft_ms"] == pytest.approx(200)
    assert s["median_ttft_ms"] == pytest.approx(200)
    assert s["p90_ttft_ms"] == pytest.approx(280)
    assert s["p99_ttft_ms"] == pytest.approx(298)
    assert s["std_ttft_ms"] == pytest.approx(np.std([100, 300, 200]))
    assert s["mean_tpot_ms"] == pytest.approx(200)  # R2 (one token) has no TPOT
    assert s["std_tpot_ms"] == pytest.approx(0)
    assert s["mean_itl_ms"] == pytest.approx(400 / 3)  # gaps 100, 200, 100
    assert s["median_itl_ms"] == pytest.approx(100)
    assert s["p90_itl_ms"] == pytest.approx(180)
    assert s["mean_e2el_ms"] == pytest.approx(400)
    assert s["p99_e2el_ms"] == pytest.approx(498)


def test_goodput() -> None:
    # ttft <= 0.25: R1 and R3 over 2 s.
    assert summarize(RECORDS, {"ttft": 0.25})["request_goodput"] == pytest.approx(1.0)
    # tpot <= 0.15: only R2, whose single token counts as TPOT 0 (as in vLLM).
    assert summarize(RECORDS, {"tpot": 0.15})["request_goodput"] == pytest.approx(0.5)
    assert summarize(RECORDS, {"ttft": 0.25, "tpot": 0.15})["request_goodput"] == 0
    # Bounds are inclusive.
    assert summarize(RECORDS, {"e2el": 0.5})["request_goodput"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="itl"):
        summarize(RECORDS, {"itl": 1.0})


def test_hit_rate_over_requests_that_reported_cached_tokens() -> None:
    s = summarize(RECORDS)
    assert s["num_cached_tokens"] == 19  # R2 reported nothing
    assert s["hit_rate"] == pytest.approx(19 / 40)
    unreported = summarize([R2])
    assert unreported["num_cached_tokens"] is None and unreported["hit_rate"] is None


def test_vllm_field_names_and_empty_run() -> None:
    s = summarize([])
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p90", "p99"):
            assert s[f"{stat}_{name}_ms"] is None
    vllm = {"completed", "total_input_tokens", "total_output_tokens", "request_throughput",
            "request_goodput", "output_throughput", "total_token_throughput", "duration"}  # fmt: skip
    assert vllm | {"failed", "num_cached_tokens", "hit_rate"} <= s.keys()
    assert s["completed"] == 0 and s["request_throughput"] is None
    assert "n/a" in format_table(s)


def test_parse_slo_and_table() -> None:
    assert parse_slo("ttft=0.5, tpot=0.05,e2e=3") == {"ttft": 0.5, "tpot": 0.05, "e2el": 3.0}
    with pytest.raises(ValueError):
        parse_slo("ttft:0.5")
    table = format_table(summarize(RECORDS))
    assert "Successful requests:" in table and "P90 TTFT (ms):" in table
    assert "280.00" in table and "0.4750" in table


def test_plot_cdfs(tmp_path: Path) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(ImportError):
            plot_cdfs(RECORDS, str(tmp_path))
        return
    paths = plot_cdfs(RECORDS, str(tmp_path))
    assert [Path(p).name for p in paths] == ["cdf_ttft.png", "cdf_tpot.png", "cdf_e2el.png"]

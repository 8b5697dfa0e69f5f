"""Benchmarks must keep running: each script once, at a toy size (figures are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_engine_throughput_runs(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    args = ["--model", "dummy:tiny", "--batch-sizes", "1,2", "--dtypes", "float32,bfloat16",
            "--prompt-len", "4", "--output-len", "3", "--threads", "1", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "engine_throughput.py"), *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["dtype"], r["batch"]) for r in rows] == [
        ("float32", 1), ("float32", 2), ("bfloat16", 1), ("bfloat16", 2)
    ]  # fmt: skip
    for r in rows:
        assert r["hf_tok_s"] > 0 and r["ours_tok_s"] > 0
        assert r["ratio"] == r["ours_tok_s"] / r["hf_tok_s"]
    assert rows[0]["greedy_agreement"] == 1.0  # float32: same weights, same greedy tokens


def _run_quick(script: str, json_path: Path, *extra: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--json", str(json_path), *extra],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_mempool_micro_runs(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    stdout = _run_quick("mempool_micro.py", out)
    rows = json.loads(out.read_text())
    calls = {(r["call"], r["layout"], r["batch"]) for r in rows["memory"]}
    for call in (
        "alloc_mem + free_mem",
        "share_mem",
        "swap_out",
        "swap_in",
        "plain copy (ceiling)",
    ):
        for layout in ("dummy:small float32", "index-only float32"):
            assert {(call, layout, 1), (call, layout, 16)} <= calls
    assert all(r["us_per_block"] > 0 for r in rows["memory"])
    assert [r["cached_percent"] for r in rows["index"]] == [0, 25, 50, 75, 100]
    assert all(r["match_ms"] > 0 and r["insert_ms"] > 0 for r in rows["index"])
    assert stdout.count("index  | cached") == 5


def write_trace(path: Path) -> None:
    """Eight requests in the Mooncake trace format: two conversations of four turns, each turn's
    hash ids extending the previous turn's (so later turns share their history's blocks)."""
    rows = []
    for turn in range(4):
        for conv in range(2):
            hash_ids = [100 * conv + i for i in range(2 + 2 * turn)]
            rows.append({
                "timestamp": 1000 * (2 * turn + conv), "input_length": 512 * len(hash_ids) - 100,
                "output_length": 64, "hash_ids": hash_ids,
            })  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_multiturn_replay_runs(tmp_path: Path) -> None:
    out, trace = tmp_path / "replay.json", tmp_path / "trace.jsonl"
    write_trace(trace)  # CI has the repository only, not ../shared/traces
    stdout = _run_quick("multiturn_replay.py", out, "--trace", str(trace))
    assert "run | caching on" in stdout and "run | caching off" in stdout and "ratio |" in stdout
    on, off = json.loads(out.read_text())["summaries"]
    assert (on["label"], off["label"]) == ("caching on", "caching off")
    for s in (on, off):
        assert s["num_requests"] == 8 and s["num_ok"] == 8  # every request completed, exact length
        assert 0 < s["ttft_mean_s"] <= s["jct_mean_s"]
    assert on["hit_rate_metrics"] > 0 and on["hit_rate_usage"] > 0  # the trace's prompts share
    assert off["hit_rate_metrics"] == 0 and off["hit_rate_usage"] == 0


def test_pd_transfer_modes_runs(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "pd_transfer_modes.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {(r["concurrency"], r["mode"]) for r in rows} == {
        (c, m) for c in (1, 4) for m in ("by-request", "by-layer")
    }
    assert all(0 < r["ttft_median_s"] <= r["ttft_p90_s"] for r in rows)
    assert all(r["exposed_transfer_ms"] > 0 for r in rows)


def test_kv_transfer_runs(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    _run_quick("kv_transfer.py", out)
    data = json.loads(out.read_text())
    layers = data["shape"]["layers"]
    for row in data["rows"]:
        calls = row["calls"]
        assert calls["adjacent"] == calls["staging"] == 1  # aggregated: one send per request
        assert calls["scattered"] == row["num_runs"] <= row["blocks"]
        if "baseline" in calls:  # measured at the small sizes only
            assert calls["baseline"] == 2 * layers * row["blocks"]  # one per page
        assert all(ms > 0 for ms in row["ms"].values())
    assert any("baseline" in row["calls"] for row in data["rows"])


def test_routing_policies_runs(tmp_path: Path) -> None:
    out = tmp_path / "routing.json"
    stdout = _run_quick("routing_policies.py", out)
    assert "| session |" in stdout and "| prompt_tree |" in stdout
    session, tree = json.loads(out.read_text())["summaries"]
    assert (session["policy"], tree["policy"]) == ("session", "prompt_tree")
    for s in (session, tree):
        assert s["num_requests"] == 8 and s["num_ok"] == 8, s["errors"]  # exact answer lengths
        assert 0 < s["ttft_p50_s"] <= s["ttft_p99_s"] and s["ttft_mean_s"] <= s["jct_mean_s"]
        assert 0 <= s["hit_rate"] <= 1 and 0 <= s["hit_rate_router"] <= 1
        assert sum(s["computed_tokens"].values()) > 0
    assert tree["hit_rate"] > 0  # the sessions share documents, and each asks twice

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

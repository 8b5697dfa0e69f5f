"""``memserve-bench matrix``: specs, cluster commands, the tables' arithmetic, and one real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memserve.bench.cli import main
from memserve.bench.matrix import CONFIGS, Cell, MatrixSettings, WorkloadSpec, cluster_command
from memserve.bench.matrix_report import change, matrix_tables, paper_table, run_table
from memserve.bench.report import Summary


def test_workload_spec_parse() -> None:
    spec = WorkloadSpec.parse("sharegpt:num=12,rate=0.5,mean_turns=3,warmup=2")
    assert (spec.name, spec.num, spec.rate, spec.seed, spec.warmup) == ("sharegpt", 12, 0.5, 0, 2)
    assert spec.params == {"mean_turns": 3}
    assert spec.make().num_requests == len([t for s in spec.make().sessions for t in s.turns])
    assert WorkloadSpec.parse("react") == WorkloadSpec("react")
    with pytest.raises(ValueError, match="unknown workload"):
        WorkloadSpec.parse("nope:num=3")
    with pytest.raises(ValueError, match="key=value"):
        WorkloadSpec.parse("loogle:num")


def test_shapes_and_commands_are_at_equal_resources() -> None:
    settings = MatrixSettings("dummy:tiny", 4, Path("/tmp"), node_args=("--dtype", "float32"))
    for config in CONFIGS.values():
        assert sum(config.shape(4)) == 4
        cmd = cluster_command(config, "least_load", settings, 9000)
        assert cmd[cmd.index("--policy") + 1] == "least_load"
        assert cmd[-2:] == ["--dtype", "float32"]
    assert CONFIGS["pd-basic"].shape(3) == (1, 2, 0)
    assert CONFIGS["colocated"].shape(3) == (0, 0, 3)
    cmd = cluster_command(CONFIGS["pd-caching-2"], "prompt_tree", settings, 9000)
    assert cmd[cmd.index("--pd-caching") + 1] == "both"
    assert "--no-prefix-caching" in cluster_command(CONFIGS["colocated"], "x", settings, 1)
    with pytest.raises(ValueError):
        CONFIGS["pd-basic"].shape(1)


def _cell(config: str, policy: str, ttft: float, e2el: float, p99: float = 0.0) -> Cell:
    summary: Summary = {
        "mean_ttft_ms": ttft,
        "p99_ttft_ms": p99 or 2 * ttft,
        "mean_e2el_ms": e2el,
        "p99_e2el_ms": p99 or 2 * e2el,
        "mean_tpot_ms": 10.0,
        "hit_rate": 0.25,
        "request_throughput": 1.5,
        "failed": 0,
        "completed": 10,
    }
    return Cell("sharegpt", config, policy, CONFIGS[config].shape(2), summary, 1.0)


def test_tables_by_hand() -> None:
    cells = [
        _cell("colocated", "prompt_tree", 1000, 4000),
        _cell("colocated-cache", "prompt_tree", 500, 3000),
        _cell("pd-basic", "prompt_tree", 800, 3600, p99=9000),
        _cell("pd-caching-3", "prompt_tree", 200, 2700, p99=4500),
        _cell("colocated", "least_load", 1000, 4000),
    ]
    assert change(50, 200) == -75.0
    assert change(None, 1) is None and change(1, 0) is None
    paper = paper_table(cells).splitlines()
    # PD-Basic vs colocated: JCT 3600 vs 4000 (-10 %), P99 9000 vs 8000 (+12.5 %); caching:
    # JCT 2700 vs 3600 (-25 %), P99 4500 vs 9000 (-50 %); TTFT 200 vs 800 (-75 %), P99 4500 vs
    # 9000 (-50 %); colocated caching: JCT 3000 vs 4000 (-25 %), TTFT 500 vs 1000 (-50 %).
    assert paper[2] == (
        "| sharegpt | prompt_tree | -10.0 % / +12.5 % | -25.0 % / -50.0 % | -75.0 % / -50.0 % "
        "| -25.0 % / -50.0 % |"
    )
    assert paper[3] == "| sharegpt | least_load | — | — | — | — |"
    rows = run_table(cells).splitlines()
    assert rows[2].startswith("| PD-colocated | prompt_tree | 0+0+2 | 1.00 / 2.00 | 4.00 / 8.00 |")
    assert rows[2].endswith("| — |")
    assert rows[5].endswith("| -80.0 % / -32.5 % |")  # PD-Caching-3 vs colocated
    text = matrix_tables(cells, {"sharegpt": "sharegpt (num=3)"})
    assert text.startswith("### sharegpt (num=3)\n")
    assert "In the shape of the paper's table" in text


def test_cell_json_round_trip() -> None:
    cell = _cell("pd-caching-1", "least_load", 10, 20)
    assert Cell.from_json(cell.to_json() | {"requests": []}) == cell


def test_matrix_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two real clusters, one after the other, on the same multi-turn workload."""
    workload = (
        "sharegpt:num=3,rate=5,user_tokens=40,answer_tokens=8,mean_turns=2,max_turns=2,"
        "max_model_len=1024"
    )
    argv = ["matrix", "--workload", workload, "--configs", "colocated,pd-caching-3",
            "--policies", "prompt_tree", "--model", "dummy:tiny", "--output-dir", str(tmp_path),
            "--node-args", "--dtype float32 --num-kv-blocks 256", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    body = json.loads((tmp_path / "matrix.json").read_text())
    cells = {c["config"]: c for c in body["cells"]}
    num_requests = WorkloadSpec.parse(workload).make().num_requests
    for name in ("colocated", "pd-caching-3"):
        assert cells[name]["completed"] == num_requests and cells[name]["failed"] == 0
        run = json.loads((tmp_path / "sharegpt" / f"{name}-prompt_tree.json").read_text())
        assert len(run["requests"]) == num_requests
    assert cells["colocated"]["hit_rate"] == 0  # --no-prefix-caching
    assert cells["pd-caching-3"]["hit_rate"] > 0  # the second turns hit
    assert cells["pd-caching-3"]["shape"] == [1, 1, 0]
    out = capsys.readouterr().out
    assert "| PD-Caching-3 | prompt_tree | 1+1+0 |" in out
    assert (tmp_path / "matrix.md").read_text() in out
    # Re-rendering the JSON gives the same tables.
    assert main(["matrix", "--from-json", str(tmp_path / "matrix.json")]) == 0
    assert (tmp_path / "matrix.md").read_text() in capsys.readouterr().out

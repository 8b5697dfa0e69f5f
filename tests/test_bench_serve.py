"""``memserve-bench serve`` end to end against a real dummy node (and against nothing)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from memserve.bench.cli import build_parser, main, serve, workload_params
from memserve.bench.launch import free_port, local_node
from memserve.bench.workloads import Session, Turn, Workload, make_workload

NODE_ARGS = ["--model", "dummy:tiny", "--dtype", "float32", "--num-kv-blocks", "256"]
SHAREGPT = ["--workload", "sharegpt", "--num", "3", "--rate", "20", "--seed", "0"]
SMALL = ["user_tokens=40", "answer_tokens=8", "mean_turns=3", "max_turns=3", "max_model_len=1024"]


@pytest.fixture(scope="module")
def node_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("node") / "node.log"
    with local_node([*NODE_ARGS, "--num-threads", "1"], log_path=log) as node:
        yield node.url


def _small_args() -> list[str]:
    return [arg for p in SMALL for arg in ("--param", p)]


def test_serve_sharegpt(node_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result.json"
    argv = ["serve", "--url", node_url, *SHAREGPT, *_small_args(), "--output", str(out)]
    assert main([*argv, "--slo", "ttft=30,tpot=5", "--plot", str(tmp_path / "plots")]) == 0
    assert "Serving Benchmark Result" in capsys.readouterr().out
    num_requests = make_workload(
        "sharegpt", 3, 0, 20.0, **workload_params(_args(argv))
    ).num_requests
    result = json.loads(out.read_text())
    assert result["completed"] == num_requests == len(result["requests"]) > 3
    assert result["failed"] == 0
    assert result["mean_ttft_ms"] > 0 and result["p90_ttft_ms"] > 0
    # Later turns carry the earlier prompt, which the node still holds.
    assert result["num_cached_tokens"] > 0 and 0 < result["hit_rate"] < 1
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    for name in ("total_input_tokens", "total_output_tokens", "request_throughput",
                 "output_throughput", "total_token_throughput", "median_tpot_ms",
                 "p99_itl_ms", "std_e2el_ms", "model_id"):  # fmt: skip
        assert result[name] is not None, name
    first = {(r["session_id"], r["turn_index"]): r for r in result["requests"]}
    assert first["sharegpt-00000", 1]["num_cached_tokens"] > 0
    assert all(r["error"] is None for r in result["requests"])


def _args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_serve_hand_built_workload_with_warmup(node_url: str, tmp_path: Path) -> None:
    prefix = tuple(range(1000, 1048))  # three blocks of 16 shared by both sessions
    sessions = tuple(
        Session(f"s{i}", 0.01 * i, prefix, (Turn((2000 + i,) * 5, 4), Turn((3000,) * 3, 2)))
        for i in range(2)
    )
    workload = Workload("hand", sessions)
    out = tmp_path / "r.json"
    argv = ["serve", "--url", node_url, "--workload", "sharegpt", "--warmup", "1",
            "--max-concurrency", "1", "--output", str(out), "--quiet"]  # fmt: skip
    assert serve(_args(argv), workload) == 0
    result = json.loads(out.read_text())
    assert (result["completed"], result["failed"]) == (3, 0)
    assert sum(r["warmup"] for r in result["requests"]) == 1
    assert result["total_output_tokens"] == 4 + 2 + 2  # the warm-up's 4 are left out
    assert result["hit_rate"] > 0.5


def test_unreachable_server_records_errors(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "r.json"
    argv = ["serve", "--url", url, *SHAREGPT, *_small_args(), "--model", "m", "--output", str(out)]
    assert main([*argv, "--quiet"]) == 1
    result = json.loads(out.read_text())
    assert result["completed"] == 0 and result["failed"] == len(result["requests"]) > 0
    assert all("ClientConnectorError" in r["error"] for r in result["requests"])

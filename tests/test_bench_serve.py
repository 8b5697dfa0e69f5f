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


@pytest.mark.parametrize(("history", "cached"), [("real", 80), ("stand-in", 48)])
def test_history_holds_the_generated_answer(
    node_url: str, tmp_path: Path, history: str, cached: int
) -> None:
    """Turn 1 repeats turn 0's 48-token prompt and its 40-token answer. The node keeps the KV of
    prompt + answer but the last token (87 tokens: 5 blocks of 16); only the real answer lets
    turn 1 reuse the answer's blocks, a stand-in only the prompt's 3."""
    turns = (Turn(tuple(range(500, 516)), 40), Turn((3000,) * 8, 2))
    session = Session(f"h-{history}", 0.0, tuple(range(600, 632)), turns)
    out = tmp_path / "r.json"
    argv = ["serve", "--url", node_url, "--workload", "sharegpt", "--output", str(out),
            "--quiet", "--history", history]  # fmt: skip
    assert serve(_args(argv), Workload("hand", (session,))) == 0
    result = json.loads(out.read_text())
    assert result["num_stand_in_answers"] == (0 if history == "real" else None)
    records = sorted(result["requests"], key=lambda r: r["turn_index"])
    assert records[1]["num_prompt_tokens"] == 48 + 40 + 8
    assert records[1]["num_cached_tokens"] == cached


def test_rate_sweep(node_url: str, tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    argv = ["serve", "--url", node_url, *SHAREGPT, *_small_args(), "--rates", "5,40",
            "--output", str(out), "--plot", str(tmp_path / "plots"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    for rate in (5, 40):
        result = json.loads((tmp_path / f"sweep-rate{rate}.json").read_text())
        assert result["request_rate"] == rate and result["failed"] == 0
        assert (tmp_path / "plots" / f"rate{rate}" / "cdf_ttft.png").stat().st_size > 0
    assert (tmp_path / "plots" / "latency_vs_rate.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        main(["serve", "--url", node_url, "--workload", "sharegpt", "--rates", "1,-2"])


def test_unreachable_server_records_errors(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "r.json"
    argv = ["serve", "--url", url, *SHAREGPT, *_small_args(), "--model", "m", "--output", str(out)]
    assert main([*argv, "--quiet"]) == 1
    result = json.loads(out.read_text())
    assert result["completed"] == 0 and result["failed"] == len(result["requests"]) > 0
    assert all("ClientConnectorError" in r["error"] for r in result["requests"])
    assert result["num_stand_in_answers"] == len(result["requests"])  # no answer came back

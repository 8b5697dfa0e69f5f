"""A real ``memserve-node`` process, driven with the official ``openai`` client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch

from memserve.bench.launch import NODE_COMMAND, free_port, local_node, wait_healthy
from memserve.config import CacheConfig, EngineConfig, ModelConfig
from memserve.engine.offline import LLM
from memserve.engine.types import SamplingParams

MODEL = "dummy:tiny"
NODE = list(NODE_COMMAND)


@pytest.fixture(scope="module")
def node() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    args = ["--role", "colocated", "--model", MODEL, "--dtype", "float32"]
    with local_node([*args, "--num-kv-blocks", "512", "--num-threads", "1"], None, 60, 20) as n:
        yield n.url, n.proc


@pytest.fixture(scope="module")
def offline() -> LLM:
    config = EngineConfig(ModelConfig(MODEL, dtype="float32"), CacheConfig(num_blocks=512))
    return LLM(config)


@pytest.fixture
def client(node: tuple[str, subprocess.Popen[bytes]]) -> openai.OpenAI:
    return openai.OpenAI(base_url=node[0] + "/v1", api_key="unused", max_retries=0)


def _offline_text(llm: LLM, prompt_ids: list[int], max_tokens: int) -> tuple[str, list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    done = llm.generate([prompt_ids], params)[0]
    llm.engine.check_integrity()
    return done.text, done.token_ids


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_equals_offline_engine(client: openai.OpenAI, offline: LLM) -> None:
    prompt = "The quick brown fox jumps over the lazy dog, again and again."
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    ids = offline.engine.tokenizer.encode(prompt)
    text, tokens = _offline_text(offline, ids, 12)
    assert out.choices[0].text == text
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == len(tokens)
    assert out.usage.total_tokens == len(ids) + len(tokens)
    assert out.usage.prompt_tokens_details is not None
    assert out.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_and_streaming_chat_agree(client: openai.OpenAI, offline: LLM) -> None:
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three colours."},
    ]
    full = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    assert chunks[-1].usage is not None and full.usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    tok = offline.engine.tokenizer
    prompt_ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    text, _ = _offline_text(offline, prompt_ids, 10)
    assert full.choices[0].message.content == text
    assert full.usage.prompt_tokens == len(prompt_ids)


def _chat_ids(llm: LLM, messages: list[openai.types.chat.ChatCompletionMessageParam]) -> list[int]:
    tok = llm.engine.tokenizer
    return tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)


def test_second_turn_of_a_chat_hits_the_cache(
    client: openai.OpenAI, node: tuple[str, subprocess.Popen[bytes]], offline: LLM
) -> None:
    """Turn 2 carries turn 1's history: usage counts exactly the whole 16-token blocks of what
    turn 1 computed that turn 2's prompt starts with; the answer equals the offline engine's;
    /metrics shows the hit."""
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "system", "content": "You answer in one long sentence about the sea. " * 4},
        {"role": "user", "content": "Tell me about tides."},
    ]
    first = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=9, temperature=0
    )
    reply = first.choices[0].message.content
    assert reply is not None
    first_ids = _chat_ids(offline, messages)
    _, first_out = _offline_text(offline, first_ids, 9)
    computed = [*first_ids, *first_out][:-1]  # the last sampled token has no KV
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Waves?"}]
    second = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=9, temperature=0
    )
    second_ids = _chat_ids(offline, messages)
    common = next(
        (i for i, (a, b) in enumerate(zip(computed, second_ids, strict=False)) if a != b),
        min(len(computed), len(second_ids)),
    )
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == min(common, len(second_ids) - 1) // 16 * 16
    assert cached >= 48  # the system prompt alone is several blocks
    text, _ = _offline_text(offline, second_ids, 9)
    assert second.choices[0].message.content == text
    with urllib.request.urlopen(node[0] + "/metrics", timeout=5) as r:
        body = r.read().decode()
    hits = [
        float(line.split()[-1])
        for line in body.splitlines()
        if line.startswith('memserve_prefix_cache_hit_tokens_total{tier="device"}')
    ]
    assert hits and hits[0] >= cached


def test_streaming_completion(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL, prompt=[5, 6, 7, 8], max_tokens=8, temperature=0, stream=True
    )
    texts = [c.choices[0].text for c in stream if c.choices]
    full = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=8, temperature=0)
    assert "".join(texts) == full.choices[0].text
    assert full.choices[0].finish_reason in ("length", "stop")


def test_bad_requests_get_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=10**6)
    assert "maximum context length" in str(e.value)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_node_stops_cleanly_on_signal(sig: signal.Signals) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*NODE, "--model", MODEL, "--port", str(port), "--num-threads", "1"],
        stderr=subprocess.PIPE,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, 60)
    finally:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert b"stopped" in err  # the cleanup path ran, not a default signal death


def test_cli_bad_layout_and_cluster_shape_fail_cleanly() -> None:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "3"}
    layout = [*NODE, "--layout", "prefill:1,scheduler:1,decode:1"]
    out = subprocess.run(layout, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2
    assert "must start with scheduler:1" in out.stderr
    wrong_size = [*NODE, "--layout", "scheduler:1,decode:1"]
    out = subprocess.run(wrong_size, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2
    assert "names 2 processes, torchrun started 3" in out.stderr
    shape = [*NODE, "cluster", "--prefill", "1", "--decode", "0", "--colocated", "1"]
    out = subprocess.run(shape, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "prefill and decode instances come together" in out.stderr


def test_cli_disaggregated_roles_need_a_rendezvous() -> None:
    out = subprocess.run([*NODE, "--role", "prefill"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--scheduler-url URL or --rendezvous" in out.stderr


def test_cli_unreachable_rendezvous_fails_cleanly() -> None:
    args = [
        "--role",
        "decode",
        "--rendezvous",
        f"127.0.0.1:{free_port()}",
        "--transfer-timeout",
        "1",
    ]
    out = subprocess.run([*NODE, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "cannot reach the rendezvous store" in out.stderr + out.stdout


def test_cli_help_documents_flags() -> None:
    out = subprocess.run([*NODE, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--role", "--model", "--host", "--port", "--device", "--dtype", "--block-size",
                 "--kv-cache-memory", "--max-num-batched-tokens", "--max-num-seqs",
                 "--attention-backend", "--log-format", "--no-prefix-caching",
                 "--dram-cache-memory"):  # fmt: skip
        assert flag in out.stdout


def test_cli_export_hf(tmp_path: Path) -> None:
    out = subprocess.run(
        [*NODE, "export-hf", MODEL, str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["hidden_size"] == 256 and config["architectures"] == ["LlamaForCausalLM"]
    assert (tmp_path / "m" / "tokenizer.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on CUDA-less hosts")
def test_cuda_device_without_cuda_is_a_clear_error() -> None:
    out = subprocess.run(
        [*NODE, "--device", "cuda:0", "--port", "0"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "CUDA is not available" in out.stdout + out.stderr

"""The global scheduler end to end: real processes (a scheduler, and P/D or colocated instances
joined to it), the official ``openai`` client, greedy outputs compared with the offline engine
(the single colocated node's code path), failures injected with signals."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from memserve.bench.launch import free_port, stop, wait_healthy
from memserve.config import CacheConfig, EngineConfig, ModelConfig
from memserve.engine.offline import LLM, Completion
from memserve.engine.types import SamplingParams
from pd_harness import metrics
from sched_harness import MODEL, SchedCluster, cluster_state, ids_of, start_sched_cluster

pytestmark = pytest.mark.slow

SHAPES = {"pd": {"prefill": 1, "decode": 1}, "colocated": {"colocated": 2}}
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def reference() -> LLM:
    return LLM(EngineConfig(ModelConfig(MODEL, dtype="float32"), CacheConfig(num_blocks=512)))


@pytest.fixture(scope="module", params=sorted(SHAPES))
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SchedCluster]:
    log_dir = tmp_path_factory.mktemp(f"sched-{request.param}")
    with start_sched_cluster(log_dir, SHAPES[request.param]) as c:
        yield c


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(300, 31000) for _ in range(n)]  # plain merges, no special tokens


def greedy(llm: LLM, prompt: list[int], max_tokens: int = MAX_TOKENS) -> Completion:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=3)
    return llm.generate([prompt], params)[0]


def test_completions_match_single_node(cluster: SchedCluster, reference: LLM) -> None:
    client, rng = cluster.client(), random.Random(1)
    tok = reference.engine.tokenizer
    for n in (5, 40, 70):
        prompt = ids(rng, n)
        ref = greedy(reference, prompt)
        out = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=3
        )
        choice = out.choices[0]
        assert choice.text == ref.text
        assert choice.finish_reason == ref.finish_reason
        assert choice.logprobs is not None
        assert choice.logprobs.tokens == [tok.token_str(t) for t in ref.token_ids]
        want = [e.logprob for e in ref.logprobs]
        assert choice.logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
        assert out.usage is not None and out.usage.prompt_tokens == n
        stream = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks) == ref.text
        assert chunks[-1].choices[0].finish_reason == ref.finish_reason
        assert len(chunks) > 2  # token by token, not one blob


def test_chat_matches_single_node(cluster: SchedCluster, reference: LLM) -> None:
    client = cluster.client()
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "Tell me about the MemServe paper, please."}
    ]
    tok = reference.engine.tokenizer
    text = tok.apply_chat_template([dict(m) for m in messages], True)
    prompt = tok.encode(text, add_special_tokens=False)
    ref = greedy(reference, prompt)
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    assert out.choices[0].message.content == ref.text
    assert out.usage is not None and out.usage.prompt_tokens == len(prompt)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ref.text


def test_next_turn_hits_where_the_prefix_lives(cluster: SchedCluster, reference: LLM) -> None:
    """Turn 2 goes where turn 1's prefix is (prompt_tree) and reports the hit; the scheduler's
    trees and metrics show it."""
    client, rng = cluster.client(), random.Random(2)
    history = ids(rng, 80)
    first = client.completions.create(model=MODEL, prompt=history, max_tokens=4, temperature=0)
    assert first.usage is not None
    assert first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    ref = greedy(reference, history, 4)
    prompt = history + ref.token_ids + ids(rng, 20)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert second.choices[0].text == greedy(reference, prompt, 4).text
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens == 80 // 16 * 16
    state = cluster_state(cluster.url)
    assert state["policy"] == "prompt_tree" and state["healthy"]
    assert state["tree_blocks"] >= 5
    for i in state["instances"]:
        assert i["device"] == "cpu" and i["ready"] and i["healthy"]
        if i["role"] != "colocated":  # its KV transport endpoint: id@incarnation
            assert i["endpoint"].startswith(i["id"] + "@")
    m = metrics(cluster.url)
    role = "prefill" if "prefill" in {i["role"] for i in state["instances"]} else "colocated"
    plan = "pd" if role == "prefill" else "colocated"
    assert m[f'memserve_router_decisions_total{{plan="{plan}",policy="prompt_tree"}}'] >= 2
    assert m[f'memserve_router_cached_prompt_tokens_total{{role="{role}"}}'] >= 80 // 16 * 16
    assert 0 < m[f'memserve_router_prefix_hit_rate{{role="{role}"}}'] < 1


def test_client_disconnect_aborts_on_the_instance(cluster: SchedCluster) -> None:
    client, rng = cluster.client(), random.Random(3)
    stream = client.completions.create(
        model=MODEL, prompt=ids(rng, 30), max_tokens=400, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    stream.close()
    deadline = time.monotonic() + 15
    while True:
        instances = cluster_state(cluster.url)["instances"]
        busy = [i["id"] for i in instances if i["load"]["running"] or i["load"]["inflight"]]
        if not busy:
            break
        assert time.monotonic() < deadline, f"still running after the disconnect: {instances}"
        time.sleep(0.1)


def test_bad_requests_get_clear_answers(cluster: SchedCluster) -> None:
    client = cluster.client()
    with pytest.raises(openai.BadRequestError, match="out of range"):
        client.completions.create(model=MODEL, prompt=[10**9], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt=[5, 6], max_tokens=10**6)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=[5, 6], max_tokens=2)
    req = urllib.request.Request(
        cluster.url + "/internal/heartbeat", b'{"id": "x"}', {"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400


def stream_text(client: openai.OpenAI, prompt: list[int], max_tokens: int) -> str:
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    return "".join(c.choices[0].text for c in stream)


def test_decode_instance_dies_and_another_joins(tmp_path: Path, reference: LLM) -> None:
    """Kill one of two decode instances while requests stream on both: those on it fail with a
    clear error, the rest finish exactly; the scheduler drops it and keeps serving; a decode
    instance that joins later gets requests."""
    fast = ("--peer-timeout", "1", "--transfer-timeout", "5")
    shape = {"prefill": 1, "decode": 2}
    with start_sched_cluster(tmp_path, shape, fast, fast) as c:
        rng = random.Random(4)
        prompts = [ids(rng, 20 + i) for i in range(6)]
        client = c.client(60)
        victim = c.instances["d0"]
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(stream_text, client, p, 150) for p in prompts]
            deadline = time.monotonic() + 30
            while metrics(victim.url).get("memserve_num_requests_running", 0) < 1:
                assert time.monotonic() < deadline, "d0 never got a request"
                time.sleep(0.02)
            victim.proc.send_signal(signal.SIGKILL)
            outcomes: list[str | Exception] = []
            for f in futures:
                try:
                    outcomes.append(f.result(timeout=90))
                except Exception as e:  # judged below
                    outcomes.append(e)
        failed = [o for o in outcomes if isinstance(o, Exception)]
        assert failed, "no request was on the killed instance"
        assert all("d0" in str(e) for e in failed), failed
        for prompt, o in zip(prompts, outcomes, strict=True):
            if not isinstance(o, Exception):
                assert o == greedy(reference, prompt, 150).text
        deadline = time.monotonic() + 10
        while "d0" in ids_of(c.url):
            assert time.monotonic() < deadline, "the scheduler never dropped d0"
            time.sleep(0.1)
        for _ in range(3):
            prompt = ids(rng, 30)
            assert stream_text(client, prompt, 8) == greedy(reference, prompt, 8).text
        d2 = c.spawn("decode", "d2", *fast)
        c.wait_joined("d2")
        for _ in range(40):  # d2 is idle, d1 has streams: the router tries d2 soon
            prompt = ids(rng, 30)
            with ThreadPoolExecutor(2) as pool:
                texts = list(pool.map(lambda p: stream_text(client, p, 8), [prompt, prompt]))
            assert texts == [greedy(reference, prompt, 8).text] * 2
            if metrics(d2.url).get("memserve_e2e_request_latency_seconds_count", 0) > 0:
                break
        else:
            pytest.fail("the new decode instance never served")


def test_cluster_command_and_torchrun_layout(tmp_path: Path, reference: LLM) -> None:
    """`memserve-node cluster` (what bin/serve runs) and torchrun with --layout both come up,
    serve exactly, and stop cleanly on SIGINT."""
    prompt = ids(random.Random(5), 24)
    want = greedy(reference, prompt, 6).text
    node_args = ["--model", MODEL, "--dtype", "float32", "--num-kv-blocks", "256"]
    port = free_port()
    cluster_cmd = [sys.executable, "-m", "memserve.cli", "cluster", "--port", str(port), *node_args]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                "3", "-m", "memserve.node", "--layout", "scheduler:1,prefill:1,decode:1",
                "--port", str(port), *node_args]  # fmt: skip
    for name, cmd in (("cluster", cluster_cmd), ("torchrun", torchrun)):
        log = tmp_path / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc, 120, log)
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
            deadline = time.monotonic() + 30
            while True:  # the decode instance's registry sees the prefill one within a beat
                try:
                    out_ = client.completions.create(
                        model=MODEL, prompt=prompt, max_tokens=6, temperature=0
                    )
                    break
                except openai.APIStatusError as e:
                    assert e.status_code == 503 and time.monotonic() < deadline, e
                    time.sleep(0.2)
            assert out_.choices[0].text == want, name
            roles = sorted(i["role"] for i in cluster_state(url)["instances"])
            assert roles == ["decode", "prefill"], name
        finally:
            stop(proc, 60)
        text = log.read_text(errors="replace")
        # torchrun itself exits 1 on SIGINT (SignalException) after stopping its workers.
        assert proc.returncode == (0 if name == "cluster" else 1), (name, text[-3000:])
        assert text.count("[info     ] stopped") == 3, (name, text[-3000:])


def post_json(url: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_kv_moves_between_prefill_instances(tmp_path: Path, reference: LLM) -> None:
    """`/internal/kv/migrate` (what the router calls when moving beats recomputing): the
    holder sends its cached prefix; the other prefill instance then serves the prompt from it,
    exactly."""
    computed = "memserve_prompt_tokens_computed_total"
    received = 'memserve_kv_transfer_blocks_total{direction="received"}'
    shape = {"prefill": 2, "decode": 1}
    with start_sched_cluster(
        tmp_path, shape, ("--policy", "round_robin"), ("--pd-caching", "prefill")
    ) as c:
        client, rng = c.client(), random.Random(6)
        p0, p1 = c.instances["p0"], c.instances["p1"]
        before = {n: metrics(n.url)[computed] for n in (p0, p1)}
        doc = ids(rng, 64)
        first = client.completions.create(model=MODEL, prompt=doc, max_tokens=2, temperature=0)
        assert first.choices[0].text == greedy(reference, doc, 2).text
        holder, other = (p0, p1) if metrics(p0.url)[computed] > before[p0] else (p1, p0)
        other_id = "p1" if other is p1 else "p0"
        status, reply = post_json(holder.url + "/internal/kv/migrate", {"tokens": doc, "to": "x"})
        assert status == 404, reply
        got = metrics(other.url)[received]
        deadline = time.monotonic() + 15
        while True:  # 404 until the holder's registry has seen the other one's heartbeat move
            status, reply = post_json(
                holder.url + "/internal/kv/migrate", {"tokens": doc, "to": other_id}
            )
            if status != 404 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == 200 and reply == {"num_tokens": 64}, reply
        assert metrics(other.url)[received] - got == 4
        for _ in range(4):  # round robin: within two requests one lands on the other instance
            prompt = doc + ids(rng, 10)
            was = metrics(other.url)[computed]
            out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
            assert out.choices[0].text == greedy(reference, prompt, 4).text
            if metrics(other.url)[computed] > was:
                assert out.usage is not None and out.usage.prompt_tokens_details is not None
                assert out.usage.prompt_tokens_details.cached_tokens == 64
                assert metrics(other.url)[computed] - was == 10
                break
        else:
            pytest.fail("round robin never used the other prefill instance")

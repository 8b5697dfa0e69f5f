"""Prefill/decode disaggregation end to end: real ``memserve-node`` processes (gloo process
groups between them), the official ``openai`` client, greedy outputs compared with the offline
engine. Cache hits and KV transfer sizes are predicted from token ids: hits are whole 16-token
blocks, P's capped one token short of the prompt; a request's computed tokens are its prompt and
all but its last output token."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from openai.types import Completion as APICompletion

from memserve.config import CacheConfig, EngineConfig, ModelConfig
from memserve.engine.offline import LLM, Completion
from memserve.engine.types import SamplingParams
from memserve.mempool.pool import Tier
from pd_harness import (
    BLOCK,
    COMPUTED,
    MODEL,
    RECEIVED,
    RECEIVED_BYTES,
    SENT,
    SENT_BYTES,
    Cluster,
    healthy,
    metrics,
    start_cluster,
    wait_settled,
)

pytestmark = pytest.mark.slow

MODES = ("basic", "prefill", "both", "full")
MAX_TOKENS = 12
FAST_FAIL = ("--transfer-timeout", "5", "--peer-timeout", "1")
SLOW_PREFILL = ("--max-num-batched-tokens", "32")  # P stays busy ~2 s with the long prompts


@pytest.fixture(scope="module")
def reference() -> LLM:
    return LLM(EngineConfig(ModelConfig(MODEL, dtype="float32"), CacheConfig(num_blocks=512)))


@pytest.fixture(scope="module", params=MODES)
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:  # fmt: skip
    mode: str = request.param
    with start_cluster(mode, tmp_path_factory.mktemp(f"pd-{mode}")) as c:
        yield c


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(300, 31000) for _ in range(n)]  # plain merges, no special tokens


def common(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))  # fmt: skip


def p_hit(cached: list[list[int]], prompt: list[int]) -> int:
    """P's prefix-cache hit in tokens: whole blocks, at least one prompt token computed."""
    best = max((common(s, prompt) for s in cached), default=0)
    return min(best, len(prompt) - 1) // BLOCK * BLOCK


def held_blocks(cached: list[list[int]], tokens: list[int]) -> int:
    """Leading whole blocks of ``tokens`` an instance holding ``cached`` has already."""
    return max((common(s, tokens) for s in cached), default=0) // BLOCK


def bytes_per_block(llm: LLM) -> int:
    block = llm.engine.pool.caches[Tier.DEVICE].data[0]
    return block.numel() * block.element_size()


def complete(client: openai.OpenAI, prompt: list[int], max_tokens: int = MAX_TOKENS) -> APICompletion:  # fmt: skip
    return client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=3
    )


def assert_same(out: APICompletion, llm: LLM, prompt: list[int], max_tokens: int = MAX_TOKENS) -> Completion:  # fmt: skip
    """``out`` (tokens, text, logprobs, usage) equals the offline engine's greedy answer."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=3)
    ref = llm.generate([prompt], params)[0]
    tok = llm.engine.tokenizer
    choice = out.choices[0]
    assert choice.text == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert choice.logprobs is not None and choice.logprobs.top_logprobs is not None
    assert choice.logprobs.tokens == [tok.token_str(t) for t in ref.token_ids]
    want_lps = [e.logprob for e in ref.logprobs]
    assert choice.logprobs.token_logprobs == pytest.approx(want_lps, abs=1e-4)
    for got, e in zip(choice.logprobs.top_logprobs, ref.logprobs, strict=True):
        want = {tok.token_str(t): lp for t, lp in e.top}
        want.setdefault(tok.token_str(e.token_id), e.logprob)
        assert got == pytest.approx(want, abs=1e-4)
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), len(ref.token_ids))  # fmt: skip
    return ref


@dataclass
class Turn:
    prompt: list[int]
    output: list[int]
    cached: int  # usage.prompt_tokens_details.cached_tokens
    moved: dict[str, float]  # counter deltas: "d_received", "d_received_bytes", "d_sent", ...


def converse(cluster: Cluster, llm: LLM, seed: int) -> list[Turn]:
    """Three turns, each prompt = the previous prompt + its output + a new user line; waits for
    both nodes to settle after each turn (in mode full: for the send-back)."""
    rng = random.Random(seed)
    client, d, p = cluster.client(), cluster.decode.url, cluster.prefills[0].url
    turns: list[Turn] = []
    prompt = ids(rng, 37)
    for n in range(3):
        if n:
            prompt = [*prompt, *turns[-1].output, *ids(rng, 9)]
        before = (metrics(d), metrics(p))
        out = complete(client, prompt)
        ref = assert_same(out, llm, prompt)
        wait_settled(d)
        wait_settled(p)
        after = (metrics(d), metrics(p))
        names = {"received": RECEIVED, "received_bytes": RECEIVED_BYTES, "sent": SENT, "sent_bytes": SENT_BYTES}  # fmt: skip
        moved = {f"{side}_{k}": after[i][m] - before[i][m] for i, side in enumerate("dp") for k, m in names.items()}  # fmt: skip
        assert out.usage is not None and out.usage.prompt_tokens_details is not None
        cached = out.usage.prompt_tokens_details.cached_tokens or 0
        turns.append(Turn(prompt, ref.token_ids, cached, moved))
    return turns


def test_conversation_matches_colocated_reference(cluster: Cluster, reference: LLM) -> None:
    mode = cluster.mode
    on_p: list[list[int]] = []  # what P caches, as token sequences
    turns = converse(cluster, reference, seed=1)
    for n, turn in enumerate(turns):
        assert turn.cached == p_hit(on_p, turn.prompt), (n, mode)
        if n == 0 or mode == "basic":
            assert turn.cached == 0
        else:
            assert turn.cached > 0  # P holds the previous prompt
        if n and mode == "full":  # ... and the previous output, sent back by D
            assert turn.cached > len(turns[n - 1].prompt) // BLOCK * BLOCK
        if mode != "basic":
            on_p.append(turn.prompt)
        if mode == "full":
            on_p.append([*turn.prompt, *turn.output[:-1]])
    for node in (cluster.decode, *cluster.prefills):
        assert wait_settled(node.url)["free_blocks"] > 0


def test_only_missing_blocks_move(cluster: Cluster, reference: LLM) -> None:
    mode, per_block = cluster.mode, bytes_per_block(reference)
    on_p: list[list[int]] = []
    on_d: list[list[int]] = []
    for n, turn in enumerate(converse(cluster, reference, seed=2)):
        m = turn.moved
        prompt_blocks = -(-len(turn.prompt) // BLOCK)
        expect = prompt_blocks - held_blocks(on_d, turn.prompt)
        assert m["d_received"] == m["p_sent"] == expect, (n, mode, m)
        if mode in ("basic", "prefill") or n == 0:
            assert expect == prompt_blocks  # D keeps nothing (or has nothing yet): all moves
        else:
            assert 0 < expect < prompt_blocks  # only the tail D lacks
        assert m["d_received_bytes"] == m["p_sent_bytes"] == expect * per_block
        if mode != "basic":
            on_p.append(turn.prompt)
        computed = [*turn.prompt, *turn.output[:-1]]
        back = len(computed) // BLOCK - held_blocks(on_p, computed) if mode == "full" else 0
        assert m["d_sent"] == m["p_received"] == back, (n, mode, m)
        assert m["d_sent_bytes"] == m["p_received_bytes"] == back * per_block
        if mode == "full":
            assert back > 0
            on_p.append(computed)
        if mode in ("both", "full"):
            on_d.append(computed)


def test_prefill_instance_joins(tmp_path: Path, reference: LLM) -> None:
    rng = random.Random(3)
    with start_cluster("full", tmp_path) as c:
        client = c.client()
        for _ in range(2):
            prompt = ids(rng, 40)
            assert_same(complete(client, prompt), reference, prompt)
        p1 = c.add_prefill()
        p0_before = metrics(c.prefills[0].url)[COMPUTED]
        for _ in range(30):
            prompt = ids(rng, 40)
            assert_same(complete(client, prompt), reference, prompt)
            served = (metrics(p1.url), metrics(c.prefills[0].url)[COMPUTED] - p0_before)
            if served[0][COMPUTED] > 0 and served[0][SENT] > 0 and served[1] > 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"both prefill instances did not serve: {served}")
        for node in (c.decode, *c.prefills):
            wait_settled(node.url)


def run_and_kill(cluster: Cluster, kill: str) -> list[tuple[list[int], object]]:
    """Eight concurrent long requests (600 tokens, 32 out); SIGKILL ``kill`` ("prefill" or
    "decode") while P is part-way through their prefills. Each result: the completion or the
    exception; none may hang."""
    rng = random.Random(4)
    prompts = [ids(rng, 600) for _ in range(8)]
    p = cluster.prefills[0]
    start = metrics(p.url)[COMPUTED]
    client = cluster.client(60)
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures: list[Future[APICompletion]] = [pool.submit(complete, client, x, 32) for x in prompts]  # fmt: skip
        deadline = time.monotonic() + 30
        while metrics(p.url)[COMPUTED] - start < 1000 and time.monotonic() < deadline:
            time.sleep(0.02)
        (p if kill == "prefill" else cluster.decode).proc.kill()
        results: list[object] = []
        for f in futures:
            try:
                results.append(f.result(timeout=90))
            except Exception as e:  # kept, judged by the caller
                results.append(e)
    return list(zip(prompts, results, strict=True))


def test_prefill_killed_mid_flight(tmp_path: Path, reference: LLM) -> None:
    with start_cluster("full", tmp_path, FAST_FAIL, (*FAST_FAIL, *SLOW_PREFILL)) as c:
        outcomes = run_and_kill(c, kill="prefill")
        failed = 0
        for prompt, result in outcomes:
            if isinstance(result, APICompletion):
                assert_same(result, reference, prompt, 32)
            else:
                assert isinstance(result, openai.APIStatusError), repr(result)
                assert result.status_code in (502, 503), result
                assert "prefill" in result.message, result.message
                failed += 1
        assert failed > 0  # P died with prompts not yet computed
        assert healthy(c.decode.url)
        wait_settled(c.decode.url)
        with pytest.raises(openai.APIStatusError) as e:  # once P's heartbeat is gone
            complete(c.client(), [5, 6, 7], 2)
        assert e.value.status_code == 503
        c.add_prefill()  # a replacement joins: served again
        c.wait_ready()
        prompt = ids(random.Random(5), 50)
        assert_same(complete(c.client(), prompt), reference, prompt)
        wait_settled(c.decode.url)


def test_decode_killed_while_prefill_busy(tmp_path: Path, reference: LLM) -> None:
    slow_p = (*FAST_FAIL, *SLOW_PREFILL)
    with start_cluster("full", tmp_path, FAST_FAIL, slow_p, store_on="prefill") as c:
        outcomes = run_and_kill(c, kill="decode")
        for _, result in outcomes:
            assert isinstance(result, APICompletion | openai.APIConnectionError), repr(result)
        p = c.prefills[0].url
        assert healthy(p)
        wait_settled(p, timeout_s=40)  # handoff holds released after the failed pushes
        c.start_decode(*FAST_FAIL)  # a new incarnation of d0 pairs with P afresh
        c.wait_ready()
        prompt = ids(random.Random(6), 50)
        assert_same(complete(c.client(), prompt), reference, prompt)
        wait_settled(c.decode.url)
        wait_settled(p)

"""Prefix caching in the engine (``dummy:tiny``, float32, CPU): reuse is exact and counted.

The reference for every cached run is an engine with prefix caching off, so each of its runs is a
cold prefill. Greedy outputs must be equal token for token and the top-5 logprobs equal within
``LOGPROB_TOL`` (random weights repeat tokens, so distributions are compared too). Every engine is
checked at teardown (``engine_fixtures``): integrity holds and no block is still held.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine_fixtures import (  # noqa: F401 - fixtures
    Collected,
    EngineFactory,
    Job,
    add_job,
    assert_same_logprobs,
    collect,
    engine_config,
    generate_alone,
    make_engine_fixture,
    tiny_fixture,
)
from memserve.engine.llm_engine import LLMEngine
from memserve.engine.types import SamplingParams
from memserve.mempool.pool import Tier
from memserve.model.loader import LoadedModel

BS = 8
GREEDY = SamplingParams(temperature=0, logprobs=5, ignore_eos=True, max_tokens=6)


def tokens(n: int, seed: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(3, 32000) for _ in range(n))


@pytest.fixture(name="cold", scope="module")
def cold_fixture(tiny: LoadedModel) -> Iterator[LLMEngine]:
    """An engine with caching off: every request is prefilled from scratch."""
    engine = LLMEngine(
        engine_config(num_blocks=256, block_size=BS, enable_prefix_caching=False), loaded=tiny
    )
    yield engine
    engine.check_integrity()
    assert engine.allocator.num_used == 0  # caching off: nothing is kept


def assert_same_as_cold(got: Collected, cold: LLMEngine, job: Job) -> None:
    want = generate_alone(cold, dataclasses.replace(job, request_id="cold-" + job.request_id))
    assert want.num_cached_tokens == 0
    assert got.token_ids == want.token_ids, job.request_id
    assert_same_logprobs(got.logprobs, want.logprobs)
    assert got.text == want.text


def run_alone(engine: LLMEngine, job: Job) -> tuple[Collected, int]:
    """The job's output and the number of prompt tokens the engine actually prefilled for it."""
    before = engine.num_prompt_tokens_computed
    got = generate_alone(engine, job)
    return got, engine.num_prompt_tokens_computed - before


def expected_hit(num_prompt_tokens: int, num_history_tokens: int) -> int:
    """What a turn whose prompt extends a cached history of ``num_history_tokens`` computed tokens
    must find: whole blocks of the history, one token short of the prompt."""
    return min(num_history_tokens // BS, (num_prompt_tokens - 1) // BS) * BS


# ---- reuse is exact and counted -----------------------------------------------------------------


def test_shared_prefix_prefills_only_the_suffix(
    make_engine: EngineFactory, cold: LLMEngine
) -> None:
    engine = make_engine(num_blocks=64, block_size=BS)
    doc = tokens(43, seed=1)
    first = Job("first", (*doc, *tokens(5, seed=2)), GREEDY)
    second = Job("second", (*doc, *tokens(20, seed=3)), GREEDY)
    got1, computed1 = run_alone(engine, first)
    got2, computed2 = run_alone(engine, second)
    assert (got1.num_cached_tokens, computed1) == (0, len(first.prompt))
    assert (
        got2.num_cached_tokens == 40
    )  # the doc's 5 whole blocks; token 41.. differ or are partial
    assert got2.num_cached_tokens_dram == 0
    assert computed2 == len(second.prompt) - 40
    assert_same_as_cold(got1, cold, first)
    assert_same_as_cold(got2, cold, second)


def test_identical_prompt_recomputes_only_its_last_block(
    make_engine: EngineFactory, cold: LLMEngine
) -> None:
    engine = make_engine(num_blocks=64, block_size=BS)
    job = Job("a", tokens(32, seed=4), GREEDY)
    run_alone(engine, job)
    got, computed = run_alone(engine, dataclasses.replace(job, request_id="b"))
    assert got.num_cached_tokens == 24 and computed == 8  # never a 0-token prefill
    assert_same_as_cold(got, cold, job)


def test_random_conversations_hit_their_whole_history(
    make_engine: EngineFactory, cold: LLMEngine
) -> None:
    """Interleaved multi-turn chats: turn k's prompt is the previous prompt + output + a new
    message. Every turn finds its whole history (in whole blocks), prefills exactly the rest,
    and answers as a cold engine does."""
    engine = make_engine(num_blocks=128, block_size=BS)
    rng = random.Random(5)
    histories: dict[int, tuple[int, ...]] = {c: () for c in range(4)}
    computed_history: dict[int, int] = dict.fromkeys(histories, 0)
    for turn in range(3):
        for conv in rng.sample(sorted(histories), len(histories)):
            message = tokens(rng.randrange(3, 20), seed=rng.randrange(1 << 30))
            params = dataclasses.replace(GREEDY, max_tokens=rng.randrange(1, 9))
            job = Job(f"c{conv}t{turn}", (*histories[conv], *message), params)
            got, computed = run_alone(engine, job)
            hit = expected_hit(len(job.prompt), computed_history[conv])
            assert got.num_cached_tokens == hit, job.request_id
            assert computed == len(job.prompt) - hit, job.request_id
            assert_same_as_cold(got, cold, job)
            histories[conv] = (*job.prompt, *got.token_ids)
            computed_history[conv] = len(histories[conv]) - 1  # the last token has no KV yet
    assert engine.pool.num_historical(Tier.DEVICE) > 0


def test_no_prefix_caching_keeps_nothing(make_engine: EngineFactory) -> None:
    engine = make_engine(num_blocks=64, block_size=BS, enable_prefix_caching=False)
    job = Job("a", tokens(40, seed=6), GREEDY)
    run_alone(engine, job)
    got, computed = run_alone(engine, dataclasses.replace(job, request_id="b"))
    assert (got.num_cached_tokens, computed) == (0, 40)
    assert engine.allocator.num_used == 0 and engine.pool.tree.num_blocks() == 0


# ---- sharing between running requests -----------------------------------------------------------


def test_concurrent_requests_share_prefix_blocks(
    make_engine: EngineFactory, cold: LLMEngine
) -> None:
    """Two requests with one long prefix arrive together; once the prefix is computed they run
    on the same blocks (refcount: the tree + each request), and both answer as cold runs do."""
    engine = make_engine(num_blocks=64, block_size=BS, max_num_batched_tokens=16)
    doc = tokens(48, seed=7)
    a = Job("a", (*doc, *tokens(4, seed=8)), GREEDY)
    b = Job("b", (*doc, *tokens(9, seed=9)), GREEDY)
    ra, rb = add_job(engine, a), add_job(engine, b)
    results: dict[str, Collected] = {}
    shared_seen = 0
    while engine.has_unfinished():
        for out in engine.step():
            results.setdefault(out.request_id, Collected()).add(out)
        engine.check_integrity()
        common = [x for x, y in zip(ra.block_ids, rb.block_ids, strict=False) if x == y]
        shared_seen = max(shared_seen, len(common))
        for block in common:
            assert engine.allocator.refcount(block) == 3
    assert shared_seen == 6  # all of the doc's blocks
    assert_same_as_cold(results["a"], cold, a)
    assert_same_as_cold(results["b"], cold, b)


def test_later_request_hits_a_prompt_still_being_prefilled(
    make_engine: EngineFactory, cold: LLMEngine
) -> None:
    """Chunked prefill publishes each chunk: a request arriving mid-prefill of the same document
    reuses the chunks already computed."""
    engine = make_engine(num_blocks=64, block_size=BS, max_num_batched_tokens=16)
    doc = tokens(64, seed=10)
    a = Job("a", (*doc, 11, 12), GREEDY)
    b = Job("b", (*doc, 13), GREEDY)
    add_job(engine, a)
    results: dict[str, Collected] = {}
    for _ in range(2):  # two chunks of 16: 32 tokens of the doc computed and published
        for out in engine.step():
            results.setdefault(out.request_id, Collected()).add(out)
    add_job(engine, b)
    collect(engine, results)
    assert results["b"].num_cached_tokens >= 32
    assert_same_as_cold(results["a"], cold, a)
    assert_same_as_cold(results["b"], cold, b)


# ---- the DRAM tier and memory pressure ----------------------------------------------------------


def test_cold_history_moves_to_dram_and_hits_from_there(
    make_engine: EngineFactory, cold: LLMEngine
) -> None:
    engine = make_engine(num_blocks=12, block_size=BS, dram_num_blocks=32)
    history = Job("chat-t0", tokens(41, seed=11), GREEDY)
    got0, _ = run_alone(engine, history)
    for i in range(3):  # other traffic fills the device: the chat's blocks are swapped out
        run_alone(engine, Job(f"other{i}", tokens(60, seed=20 + i), GREEDY))
    assert engine.pool.counters.swap_out_blocks > 0
    assert engine.pool.tree.num_blocks(Tier.DRAM) > 0
    turn1 = Job("chat-t1", (*history.prompt, *got0.token_ids, *tokens(7, seed=12)), GREEDY)
    got1, computed = run_alone(engine, turn1)
    hit = expected_hit(len(turn1.prompt), len(history.prompt) + len(got0.token_ids) - 1)
    assert got1.num_cached_tokens == hit
    assert got1.num_cached_tokens_dram > 0
    assert computed == len(turn1.prompt) - hit
    assert engine.pool.counters.swap_in_blocks * BS >= got1.num_cached_tokens_dram
    assert_same_as_cold(got1, cold, turn1)


def test_swap_ins_of_one_step_are_bounded(make_engine: EngineFactory, cold: LLMEngine) -> None:
    """Two turns whose histories sit in DRAM arrive together. A step swaps in at most its token
    budget in blocks (2 blocks here), except that its first swap-in may be any size: so the
    second turn waits one step, then both complete exactly."""
    engine = make_engine(
        num_blocks=12, block_size=BS, dram_num_blocks=40, max_num_batched_tokens=2 * BS
    )
    firsts = [Job(f"t0-{i}", tokens(33, seed=40 + i), GREEDY) for i in range(2)]
    outs = [run_alone(engine, job)[0] for job in firsts]
    for i in range(3):
        run_alone(engine, Job(f"other{i}", tokens(60, seed=50 + i), GREEDY))
    seconds = [
        Job(f"t1-{i}", (*job.prompt, *out.token_ids, *tokens(5, seed=60 + i)), GREEDY)
        for i, (job, out) in enumerate(zip(firsts, outs, strict=True))
    ]
    requests = [add_job(engine, job) for job in seconds]
    results: dict[str, Collected] = {}
    for out in engine.step():
        results.setdefault(out.request_id, Collected()).add(out)
    assert [r.request_id for r in engine.scheduler.running] == ["t1-0"]
    assert requests[0].num_cached_tokens_dram > 2 * BS
    collect(engine, results)
    for job, request in zip(seconds, requests, strict=True):
        assert request.num_cached_tokens_dram > 2 * BS
        assert_same_as_cold(results[job.request_id], cold, job)


def metric_values(engine: LLMEngine) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = engine.metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_memory_pressure_ten_times_the_device(make_engine: EngineFactory, cold: LLMEngine) -> None:
    """Conversations needing ~10x the device blocks complete exactly; swaps and evictions show in
    the metrics; running requests' blocks are never reclaimed (integrity every step)."""
    device_blocks = 24
    engine = make_engine(num_blocks=device_blocks, block_size=BS, dram_num_blocks=40)
    rng = random.Random(13)
    histories: dict[int, tuple[int, ...]] = {c: () for c in range(20)}
    total_blocks = 0
    jobs: list[Job] = []
    results: dict[str, Collected] = {}
    for turn in range(3):
        for conv in sorted(histories):
            message = tokens(16, rng.randrange(1 << 30))
            job = Job(f"c{conv}t{turn}", (*histories[conv], *message), GREEDY)
            jobs.append(job)
            add_job(engine, job)
            total_blocks += -(-(len(job.prompt) + GREEDY.max_tokens) // BS)
            if len(jobs) % 3 == 0:  # a few arrive together, the rest while those run
                for out in engine.step():
                    results.setdefault(out.request_id, Collected()).add(out)
                engine.check_integrity()
        while engine.has_unfinished():
            for out in engine.step():
                results.setdefault(out.request_id, Collected()).add(out)
            engine.check_integrity()
        for conv in histories:
            done = results[f"c{conv}t{turn}"]
            histories[conv] = (*jobs[turn * len(histories) + conv].prompt, *done.token_ids)
    assert total_blocks >= 10 * device_blocks
    values = metric_values(engine)
    assert values[("memserve_kv_swap_blocks_total", (("direction", "out"),))] > 0
    assert values[("memserve_kv_swap_blocks_total", (("direction", "in"),))] > 0
    evicted = sum(
        values[("memserve_kv_evicted_blocks_total", (("tier", t),))] for t in ("device", "dram")
    )
    assert evicted > 0
    assert values[("memserve_prefix_cache_hit_tokens_total", (("tier", "dram"),))] > 0
    assert values[("memserve_kv_blocks", (("state", "active"), ("tier", "device")))] == 0
    for job in jobs:
        assert results[job.request_id].num_finished == 1
        assert_same_as_cold(results[job.request_id], cold, job)

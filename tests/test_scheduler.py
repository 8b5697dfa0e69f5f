"""``Scheduler`` + ``KVCacheManager`` over tiny pools: token budget, chunked prefill, FCFS,
``max_num_seqs``, preemption of the newest running request, with prefix caching off (its tests are
in test_prefix_caching.py). No model: a "step" here is schedule,
``update_computed``, and appending a fake token for every chunk that samples."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memserve.config import SchedulerConfig
from memserve.engine.detokenizer import IncrementalDetokenizer
from memserve.engine.kv_manager import KVCacheManager
from memserve.engine.request import Request, RequestStatus
from memserve.engine.scheduler import Scheduler, SchedulerOutput
from memserve.engine.types import SamplingParams
from memserve.mempool.kv_cache import KVCache
from memserve.mempool.pool import MemPool, Tier
from memserve.model.tokenizer import Tokenizer

BLOCK_SIZE = 4
FAKE_TOKEN = 7

Chunk = tuple[str, int, int]  # (request id, start, num_tokens)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.dummy(300)


def new_request(
    tok: Tokenizer, request_id: str, num_prompt_tokens: int, max_tokens: int = 16
) -> Request:
    prompt = [10 + i % 200 for i in range(num_prompt_tokens)]
    params = SamplingParams(max_tokens=max_tokens)
    return Request(request_id, prompt, params, IncrementalDetokenizer(tok, prompt), frozenset({2}))


def new_scheduler(num_blocks: int, budget: int = 2048, max_num_seqs: int = 64) -> Scheduler:
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs)
    cache = KVCache(num_blocks, 1, BLOCK_SIZE, 1, 1, torch.float32, torch.device("cpu"))
    return Scheduler(config, KVCacheManager(MemPool(cache), enable_caching=False))


def check_blocks(sched: Scheduler) -> None:
    """Every used block is held by exactly one queued request; running ones cover their tokens."""
    allocator = sched.kv.pool.allocators[Tier.DEVICE]
    allocator.check_integrity()
    held = [b for r in [*sched.running, *sched.waiting] for b in r.block_ids]
    assert len(held) == len(set(held)) == allocator.num_used
    for r in sched.waiting:
        assert r.block_ids == [] and r.num_computed_tokens == 0
    for r in sched.running:
        assert len(r.block_ids) == -(-r.num_computed_tokens // BLOCK_SIZE)


@dataclass(frozen=True)
class Step:
    out: SchedulerOutput
    samples: list[bool]  # per chunk, as it was when scheduled (``samples`` is read live)

    @property
    def chunks(self) -> list[Chunk]:
        return [(c.request.request_id, c.start, c.num_tokens) for c in self.out.chunks]


def step(sched: Scheduler) -> Step:
    out = sched.schedule()
    for c in out.chunks:
        assert c.start == c.request.num_computed_tokens
        assert len(c.request.block_ids) * BLOCK_SIZE >= c.start + c.num_tokens
    samples = [c.samples for c in out.chunks]
    sched.update_computed(out)
    for c, sampled in zip(out.chunks, samples, strict=True):
        if sampled:
            c.request.token_ids.append(FAKE_TOKEN)
    check_blocks(sched)
    return Step(out, samples)


def ids(requests: Iterable[Request]) -> list[str]:
    return [r.request_id for r in requests]


def test_token_budget_chunks_prompts_and_keeps_decodes(tok: Tokenizer) -> None:
    sched = new_scheduler(num_blocks=64, budget=16)
    r0, r1, r2 = (new_request(tok, f"r{i}", 10) for i in range(3))
    for r in (r0, r1, r2):
        sched.add(r)

    out = step(sched)
    assert out.chunks == [("r0", 0, 10), ("r1", 0, 6)]  # budget used up; r2 not admitted
    assert out.samples == [True, False]
    assert (r0.block_ids, r1.block_ids) == ([0, 1, 2], [3, 4])
    assert ids(sched.waiting) == ["r2"]

    out = step(sched)
    assert out.chunks == [("r0", 10, 1), ("r1", 6, 4), ("r2", 0, 10)]
    assert (r1.block_ids, r2.block_ids) == ([3, 4, 5], [6, 7, 8])

    out = step(sched)
    assert out.chunks == [("r0", 11, 1), ("r1", 10, 1), ("r2", 10, 1)]
    out = step(sched)  # r0 reaches position 12: its fourth block
    assert r0.block_ids == [0, 1, 2, 9]
    assert out.out.num_tokens == 3


def test_chunked_prefill_of_a_long_prompt(tok: Tokenizer) -> None:
    sched = new_scheduler(num_blocks=16, budget=8)
    r = new_request(tok, "long", 20)
    sched.add(r)
    expected = [
        ((0, 8), False, [0, 1]),
        ((8, 8), False, [0, 1, 2, 3]),
        ((16, 4), True, [0, 1, 2, 3, 4]),
    ]
    for (start, n), samples, blocks in expected:
        out = step(sched)
        assert out.chunks == [("long", start, n)]
        assert out.samples == [samples]
        assert r.block_ids == blocks
        assert r.num_output_tokens == (1 if samples else 0)
    out = step(sched)
    assert out.chunks == [("long", 20, 1)]  # now a decode
    assert out.samples == [True]


def test_max_num_seqs_limits_running_requests(tok: Tokenizer) -> None:
    sched = new_scheduler(num_blocks=32, max_num_seqs=2)
    r0, r1, r2 = (new_request(tok, f"r{i}", 4) for i in range(3))
    for r in (r0, r1, r2):
        sched.add(r)
    for _ in range(3):
        out = step(sched)
        assert {c[0] for c in out.chunks} == {"r0", "r1"}
        assert len(sched.running) == 2
    sched.finish(r0)
    assert r0.status is RequestStatus.FINISHED and r0.block_ids == []
    out = step(sched)
    assert out.chunks == [("r1", 6, 1), ("r2", 0, 4)]


def test_first_come_first_served_even_when_a_later_request_would_fit(tok: Tokenizer) -> None:
    sched = new_scheduler(num_blocks=4)
    big, medium, small = (
        new_request(tok, "big", 12),
        new_request(tok, "medium", 8),
        new_request(tok, "small", 2),
    )
    for r in (big, medium, small):
        sched.add(r)
    out = step(sched)
    assert out.chunks == [("big", 0, 12)]  # medium needs 2 blocks, 1 free; small must not jump
    assert ids(sched.waiting) == ["medium", "small"]
    out = step(sched)
    assert out.chunks == [("big", 12, 1)]
    assert big.block_ids == [0, 1, 2, 3]
    sched.finish(big)
    out = step(sched)
    assert out.chunks == [("medium", 0, 8), ("small", 0, 2)]


def place_running(sched: Scheduler, request: Request, num_computed: int) -> None:
    """Put ``request`` in the running list as if ``num_computed`` tokens had been computed and
    every token after them sampled."""
    while request.num_tokens < num_computed + 1:
        request.token_ids.append(FAKE_TOKEN)
    request.block_ids = sched.kv.pool.allocators[Tier.DEVICE].allocate(
        sched.kv.blocks_for(num_computed)
    )
    request.num_computed_tokens = num_computed
    request.status = RequestStatus.RUNNING
    sched.running.append(request)


def test_preemption_picks_newest_and_admits_nothing_in_that_step(tok: Tokenizer) -> None:
    sched = new_scheduler(num_blocks=6, budget=6)
    r0, r1, r2 = new_request(tok, "r0", 8), new_request(tok, "r1", 5), new_request(tok, "r2", 8)
    place_running(sched, r0, 8)  # blocks [0, 1]; token 9 needs a third block
    place_running(sched, r1, 5)  # blocks [2, 3]; token 6 fits
    place_running(sched, r2, 8)  # blocks [4, 5]
    r3 = new_request(tok, "r3", 2)
    sched.add(r3)
    check_blocks(sched)

    out = step(sched)
    assert out.out.preempted == ("r2",)
    assert out.chunks == [("r0", 8, 1), ("r1", 5, 1)]
    assert r0.block_ids == [0, 1, 4]
    # r2 goes back to the front of the queue, ahead of r3 which waited before it was preempted.
    assert ids(sched.waiting) == ["r2", "r3"]
    assert (r2.status, r2.num_computed_tokens, r2.num_preemptions) == (RequestStatus.WAITING, 0, 1)
    # Block 5 was free and 4 tokens of budget were left, enough for a first chunk of r2 (or r3):
    # nothing is admitted in a step that preempted.
    assert sched.kv.pool.allocators[Tier.DEVICE].num_free == 1

    out = step(sched)
    assert out.out.preempted == ()
    assert out.chunks == [("r0", 9, 1), ("r1", 6, 1), ("r2", 0, 4)]
    assert r2.block_ids == [5]
    assert ids(sched.waiting) == ["r3"]


def test_preemption_of_several_keeps_their_order(tok: Tokenizer) -> None:
    sched = new_scheduler(num_blocks=4)
    r0, r1, r2 = new_request(tok, "r0", 16), new_request(tok, "r1", 3), new_request(tok, "r2", 3)
    place_running(sched, r0, 4)  # [0]; its next chunk (positions 4..15) needs three more blocks
    place_running(sched, r1, 3)  # [1]
    place_running(sched, r2, 3)  # [2]
    r3 = new_request(tok, "r3", 1)
    sched.add(r3)
    out = step(sched)
    assert out.out.preempted == ("r2", "r1")  # newest first, until r0 fits
    assert out.chunks == [("r0", 4, 12)]
    assert ids(sched.waiting) == ["r1", "r2", "r3"]
    assert r0.block_ids == [0, 3, 2, 1]  # the never-used block first, then r2's, then r1's


def test_a_request_that_cannot_grow_preempts_itself(tok: Tokenizer) -> None:
    sched = new_scheduler(num_blocks=3)
    r0, r1 = new_request(tok, "r0", 4), new_request(tok, "r1", 4)
    place_running(sched, r0, 3)  # [0]; fits its next token
    place_running(sched, r1, 8)  # [1, 2]; token 9 needs a block; r1 is the newest
    out = step(sched)
    assert out.out.preempted == ("r1",)
    assert out.chunks == [("r0", 3, 1)]
    assert ids(sched.waiting) == ["r1"]
    assert sched.kv.pool.allocators[Tier.DEVICE].num_free == 2
    out = step(sched)
    assert out.out.preempted == ()
    assert out.chunks == [("r0", 4, 1)]  # r1 must recompute 9 tokens: 3 blocks, 1 left
    assert r0.block_ids == [0, 1]
    assert ids(sched.waiting) == ["r1"]


def test_finish_of_a_waiting_request(tok: Tokenizer) -> None:
    sched = new_scheduler(num_blocks=2, max_num_seqs=1)
    r0, r1 = new_request(tok, "r0", 2), new_request(tok, "r1", 2)
    sched.add(r0)
    sched.add(r1)
    step(sched)
    sched.finish(r1)
    assert ids(sched.waiting) == [] and r1.is_finished
    sched.finish(r0)
    assert not sched.has_unfinished()
    assert sched.kv.pool.allocators[Tier.DEVICE].num_free == 2


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 30), st.integers(1, 6)), min_size=1, max_size=8),
    st.integers(1, 24),
    st.integers(1, 4),
    st.integers(0, 16),
)
def test_random_workloads_respect_limits_and_finish(
    tok: Tokenizer,
    jobs: list[tuple[int, int]],
    budget: int,
    max_num_seqs: int,
    spare_blocks: int,
) -> None:
    """Any mix: budget and max_num_seqs hold every step, blocks are conserved, all requests end."""
    largest = max(-(-(p + m) // BLOCK_SIZE) for p, m in jobs)
    sched = new_scheduler(
        num_blocks=largest + spare_blocks, budget=budget, max_num_seqs=max_num_seqs
    )
    requests = [new_request(tok, f"r{i}", p, m) for i, (p, m) in enumerate(jobs)]
    for r in requests:
        sched.add(r)
    for _ in range(10_000):
        if not sched.has_unfinished():
            break
        out = step(sched)
        assert out.out.num_tokens <= budget
        assert len(sched.running) <= max_num_seqs
        assert len({c[0] for c in out.chunks}) == len(out.chunks)
        for r in list(sched.running):
            if r.num_output_tokens >= r.params.max_tokens:
                sched.finish(r)
    assert not sched.has_unfinished()
    assert all(r.num_output_tokens == r.params.max_tokens for r in requests)
    assert (
        sched.kv.pool.allocators[Tier.DEVICE].num_free
        == sched.kv.pool.allocators[Tier.DEVICE].num_blocks
    )

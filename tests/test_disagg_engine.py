"""Disaggregated prefill/decode inside one process: the engine-side pieces of the P/D workflow.

A prefill engine P runs the prompt with ``keep_kv`` (its blocks become an in-flight hold), a
decode engine D ``reserve``-s blocks for the prompt (reusing what it caches), the missing blocks
are copied across (``read_blocks`` / ``write_blocks``: what the transport moves), and D
``add_prefilled``-s the request. Outputs must equal a colocated engine's, token for token and in
logprobs, in every caching stage and across turns; ``cached_tokens`` counts P's skipped prefill;
only blocks D lacks move; every hold is accounted for by ``check_integrity`` and released.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
import time
from typing import cast

import pytest

from engine_fixtures import (  # noqa: F401 - fixtures
    Collected,
    EngineFactory,
    Job,
    assert_same_logprobs,
    collect,
    generate_alone,
    make_engine_fixture,
    tiny_fixture,
)
from memserve.engine.async_engine import AsyncEngine
from memserve.engine.disagg import PrefillWorker, prefill_params
from memserve.engine.kv_manager import hand_off_key
from memserve.engine.llm_engine import LLMEngine
from memserve.engine.types import Prefilled, RequestOutput, SamplingParams
from memserve.engine.wire import params_from_json, params_to_json
from memserve.mempool.block_allocator import NoFreeBlocksError
from memserve.mempool.distributed import DistributedMemPool, Ticket
from memserve.mempool.pool import Tier
from memserve.transport.channels import TransferError

BS = 8
GREEDY = SamplingParams(temperature=0, logprobs=5, ignore_eos=True, max_tokens=7)


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 32000) for _ in range(n)]


def prefill(p: LLMEngine, rid: str, prompt: list[int], params: SamplingParams) -> Collected:
    p.add_request(rid, prompt, prefill_params(params), keep_kv=True)
    results: dict[str, Collected] = {}
    collect(p, results)
    assert results[rid].finish_reason == "length" and len(results[rid].token_ids) == 1
    return results[rid]


def move(src: LLMEngine, src_key: str, dst: LLMEngine, dst_key: str, start: int) -> int:
    """Copy the blocks the destination hold lacks (from block ``start`` on) from the source
    hold (the transfer; the source may hold more, e.g. a partly filled last block)."""
    dst_ids = dst.pool.holds[dst_key].block_ids[start:]
    src_ids = src.pool.holds[src_key].block_ids[start : start + len(dst_ids)]
    assert len(src_ids) == len(dst_ids)
    if src_ids:
        dst.pool.write_blocks(dst_ids, src.pool.read_blocks(src_ids))
    return len(src_ids)


def serve_pd(
    p: LLMEngine,
    d: LLMEngine,
    rid: str,
    prompt: list[int],
    params: SamplingParams,
    decode_keeps: bool,
    send_back: bool,
) -> tuple[Collected, int, int]:
    """One request through P then D; returns D's output, blocks moved P->D and D->P."""
    first = prefill(p, rid, prompt, params)
    out_key, in_key = hand_off_key(rid), f"req/{rid}"
    num_cached = d.pool.reserve(in_key, prompt, use_cache=decode_keeps)
    d.check_integrity()  # the reservation is in flight, counted
    moved = move(p, out_key, d, in_key, num_cached)
    p.pool.release(out_key)
    kv = Prefilled(
        hold_key=in_key,
        num_cached_blocks=num_cached,
        first_token=first.token_ids[0],
        first_logprob=first.logprobs[0] if first.logprobs else None,
        num_cached_tokens=first.num_cached_tokens,
        arrival_time=time.monotonic(),
        keep_kv=send_back,
    )
    results = {rid: Collected()}
    results[rid].add(d.add_prefilled(rid, prompt, params, kv))
    collect(d, results)
    back = 0
    if send_back:
        hold = d.pool.holds[hand_off_key(rid)]
        whole = len(hold.tokens) // BS * BS
        p_key = f"in/{rid}"
        p_cached = p.pool.reserve(p_key, hold.tokens[:whole])
        back = move(d, hand_off_key(rid), p, p_key, p_cached)
        p.pool.insert_hold(p_key)
        d.pool.release(hand_off_key(rid))
    p.check_integrity()
    d.check_integrity()
    return results[rid], moved, back


@pytest.mark.parametrize("stage", ["basic", "prefill", "both", "full"])
def test_pd_equals_colocated_across_turns(make_engine: EngineFactory, stage: str) -> None:
    prefill_keeps, decode_keeps, send_back = (
        stage != "basic",
        stage in ("both", "full"),
        stage == "full",
    )
    p = make_engine(num_blocks=128, block_size=BS, enable_prefix_caching=prefill_keeps)
    d = make_engine(num_blocks=128, block_size=BS, enable_prefix_caching=decode_keeps)
    ref = make_engine(num_blocks=128, block_size=BS, enable_prefix_caching=False)
    history: list[int] = []
    last_prompt_len = 0  # P caches prompts (computed fully); with send-back, the history too
    for turn in range(3):
        prompt = history + tokens(13 + 5 * turn, seed=turn)
        params = dataclasses.replace(GREEDY, max_tokens=5 + turn)
        got, moved, _ = serve_pd(p, d, f"t{turn}", prompt, params, decode_keeps, send_back)
        want = generate_alone(ref, Job(f"ref{turn}", tuple(prompt), params))
        assert got.token_ids == want.token_ids
        assert_same_logprobs(got.logprobs, want.logprobs)
        assert got.text == want.text
        num_blocks = -(-len(prompt) // BS)
        if turn == 0 or not decode_keeps:
            assert moved == num_blocks  # D holds nothing of it: everything moves
        else:  # D holds the whole blocks of the last turn's prompt + output (computed part)
            held = (len(history) - 1) // BS
            assert moved == num_blocks - held
        cached_at_p = len(history) - 1 if send_back and turn else last_prompt_len
        expect_hit = min(cached_at_p // BS, (len(prompt) - 1) // BS) * BS
        assert got.num_cached_tokens == (expect_hit if prefill_keeps else 0), turn
        last_prompt_len = len(prompt)
        history = prompt + got.token_ids


def test_seeded_sampling_continues_exactly_on_the_decode_side(make_engine: EngineFactory) -> None:
    p = make_engine(num_blocks=64, block_size=BS)
    d = make_engine(num_blocks=64, block_size=BS)
    ref = make_engine(num_blocks=64, block_size=BS)
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=8, ignore_eos=True)
    prompt = tokens(21, seed=9)
    p.add_request("s", prompt, prefill_params(params), keep_kv=True)
    results: dict[str, Collected] = {}
    state = None
    while p.has_unfinished():
        for out in p.step():
            results.setdefault(out.request_id, Collected()).add(out)
            state = out.sampler_state if out.finished else state
    assert state is not None
    num_cached = d.pool.reserve("req/s", prompt)
    move(p, hand_off_key("s"), d, "req/s", num_cached)
    p.pool.release(hand_off_key("s"))
    kv = Prefilled("req/s", num_cached, results["s"].token_ids[0], None, 0, time.monotonic(), state)
    got = {"s": Collected()}
    got["s"].add(d.add_prefilled("s", prompt, params, kv))
    collect(d, got)
    want = generate_alone(ref, Job("r", tuple(prompt), params))
    assert got["s"].token_ids == want.token_ids


def test_reserve_without_room_changes_nothing(make_engine: EngineFactory) -> None:
    d = make_engine(num_blocks=8, block_size=BS)
    free = d.pool.num_free(Tier.DEVICE)
    with pytest.raises(NoFreeBlocksError):
        d.pool.reserve("big", tokens(9 * BS, seed=1))
    assert d.pool.num_free(Tier.DEVICE) == free and not d.pool.holds
    d.check_integrity()


def test_reserve_swaps_the_cached_dram_part_in(make_engine: EngineFactory) -> None:
    d = make_engine(num_blocks=12, block_size=BS, dram_num_blocks=16)
    history = tokens(4 * BS, seed=3)
    generate_alone(d, Job("h", tuple(history), dataclasses.replace(GREEDY, max_tokens=1)))
    d.pool.swap_out(100)  # the whole history goes cold into DRAM
    assert d.pool.num_blocks(Tier.DRAM) and d.pool.tree.num_blocks(Tier.DRAM) == 4
    num_cached = d.pool.reserve("r", [*history, 5, 6, 7])
    assert num_cached == 4 and d.pool.tree.num_blocks(Tier.DRAM) == 0
    d.check_integrity()
    assert d.pool.release("r") and not d.pool.release("r")
    d.check_integrity()


def test_abandoned_hand_off_is_visible_to_the_integrity_check(make_engine: EngineFactory) -> None:
    p = make_engine(num_blocks=32, block_size=BS)
    prefill(p, "x", tokens(20, seed=5), GREEDY)
    hold = p.pool.holds[hand_off_key("x")]
    assert len(hold.block_ids) == 3 and hold.node is not None
    p.check_integrity()  # in flight, accounted
    p.pool.holds.clear()  # a transfer that forgot its blocks
    with pytest.raises(AssertionError):
        p.check_integrity()
    p.pool.holds[hand_off_key("x")] = hold
    p.pool.release(hand_off_key("x"))


def test_sampling_params_round_trip_through_json() -> None:
    params = SamplingParams(
        max_tokens=9, temperature=0.5, top_k=4, stop=("a", "bc"), stop_token_ids=(7,), logprobs=2
    )
    assert params_from_json(params_to_json(params)) == params


# ---- hand-off holds are released on every path (the async engine and the prefill worker) -------


class _StuckDecode:
    """Stands in for the DistributedMemPool of a prefill worker: ``push`` fails or never ends."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.fail = asyncio.Event()

    async def push(self, *_: object) -> None:
        self.entered.set()
        await self.fail.wait()
        raise TransferError("the decode instance is gone")


def _checked_holds(engine: LLMEngine) -> list[str]:
    engine.check_integrity()
    return sorted(engine.pool.holds)


PREFILL_BODY = {  # /internal/prefill from decode instance d0: 40 prompt tokens, 3 blocks to push
    "decode": {"id": "d0", "inc": "x", "url": "http://127.0.0.1:1"},
    "request_id": "r",
    "ticket": Ticket("t", 0, 0, 0, 3).to_dict(),
    "params": params_to_json(GREEDY),
    "prompt_token_ids": tokens(40, seed=2),
}


async def _holds(engine: AsyncEngine) -> list[str]:
    await asyncio.sleep(0.05)  # let queued releases run
    return await engine.call(_checked_holds)


async def test_stream_closed_during_the_finishing_step_releases_the_hand_off(
    make_engine: EngineFactory,
) -> None:
    llm = make_engine(num_blocks=32, block_size=BS)
    in_step, go = threading.Event(), threading.Event()
    real_step = llm.step

    def step() -> list[RequestOutput]:  # hold the one step until the consumer has gone
        in_step.set()
        go.wait(10)
        return real_step()

    llm.step = step  # type: ignore[method-assign]
    engine = AsyncEngine(llm)
    engine.start()

    async def consume() -> None:
        async for _ in engine.generate("r", tokens(20, seed=1), prefill_params(GREEDY), True):
            pass

    task = asyncio.create_task(consume())
    await asyncio.to_thread(in_step.wait, 10)
    task.cancel()  # e.g. aiohttp cancels /internal/prefill: the decode instance went away
    await asyncio.gather(task, return_exceptions=True)
    go.set()
    assert await _holds(engine) == []
    await engine.stop()


@pytest.mark.parametrize("fail", [True, False], ids=["push fails", "cancelled in push"])
async def test_prefill_worker_releases_its_hand_off(make_engine: EngineFactory, fail: bool) -> None:
    engine = AsyncEngine(make_engine(num_blocks=32, block_size=BS))
    engine.start()
    decode = _StuckDecode()
    worker = PrefillWorker(engine, cast(DistributedMemPool, decode))
    task = asyncio.create_task(worker.prefill(PREFILL_BODY))
    await decode.entered.wait()
    assert await engine.call(lambda e: sorted(e.pool.holds)) == ["out/d0/r"]
    if fail:
        decode.fail.set()
    else:
        task.cancel()  # the handler is cancelled while its push waits
    results: list[object] = await asyncio.gather(task, return_exceptions=True)
    assert isinstance(results[0], TransferError if fail else asyncio.CancelledError)
    assert await _holds(engine) == []
    await engine.stop()


async def test_prefill_worker_cancelled_while_releasing_still_releases(
    make_engine: EngineFactory,
) -> None:
    """The handler is cancelled after the push failed, while the release waits for the engine
    (busy in a step): the release must happen anyway."""
    llm = make_engine(num_blocks=32, block_size=BS)
    engine = AsyncEngine(llm)
    engine.start()
    decode = _StuckDecode()
    worker = PrefillWorker(engine, cast(DistributedMemPool, decode))
    task = asyncio.create_task(worker.prefill(PREFILL_BODY))
    await decode.entered.wait()
    in_step, go = threading.Event(), threading.Event()
    real_step = llm.step

    def step() -> list[RequestOutput]:
        in_step.set()
        go.wait(10)
        return real_step()

    llm.step = step  # type: ignore[method-assign]
    busy = engine.generate("busy", tokens(10, seed=3), GREEDY)
    first = asyncio.ensure_future(anext(busy))
    await asyncio.to_thread(in_step.wait, 10)  # the engine is inside a step now
    decode.fail.set()  # the push fails; the worker's finally submits the release
    while not any(type(item).__name__ == "_Call" for item in engine._pending):  # noqa: ASYNC110  (polls a private queue)
        await asyncio.sleep(0.001)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    go.set()
    await first
    async for _ in busy:
        pass
    assert await _holds(engine) == []
    await engine.stop()

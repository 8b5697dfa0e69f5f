"""``AsyncEngine`` over a real ``LLMEngine`` (dummy:tiny): concurrency, early close, overload, stop.

Every ``AsyncEngine`` is stopped at teardown, then its engine's blocks must all be free
(``make_engine``'s check).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence

import pytest

from engine_fixtures import (  # noqa: F401 - fixtures
    Collected,
    EngineFactory,
    assert_all_blocks_released,
    engine_config,
    make_engine_fixture,
    tiny_fixture,
)
from memserve.engine.async_engine import AsyncEngine
from memserve.engine.llm_engine import LLMEngine
from memserve.engine.offline import LLM
from memserve.engine.types import EngineOverloadedError, RequestError, RequestOutput, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)  # never finishes in a test
WAIT_S = 10.0

AsyncFactory = Callable[..., AsyncEngine]


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [*(rng.randrange(3, 32000) for _ in range(n - 1)), 3 + ord(".")]


@pytest.fixture
async def start_async(make_engine: EngineFactory) -> AsyncIterator[AsyncFactory]:
    """Builds and starts ``AsyncEngine``s; stops each at teardown (before the block check)."""
    started: list[AsyncEngine] = []

    def start(
        *, block_size: int = 16, max_num_seqs: int = 64, max_waiting_requests: int = 1024
    ) -> AsyncEngine:
        engine = AsyncEngine(
            make_engine(
                block_size=block_size,
                max_num_seqs=max_num_seqs,
                max_waiting_requests=max_waiting_requests,
            )
        )
        engine.start()
        started.append(engine)
        return engine

    yield start
    for engine in started:
        await engine.stop()


@pytest.fixture
def recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[LLMEngine], list[RequestOutput]]]:
    """Wraps an engine's ``step`` to record every output it produces (even undelivered ones)."""

    def record(engine: LLMEngine) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        step = engine.step

        def recording_step() -> list[RequestOutput]:
            out = step()
            outputs.extend(out)
            return out

        monkeypatch.setattr(engine, "step", recording_step)
        return outputs

    yield record


async def consume(agen: AsyncIterator[RequestOutput]) -> Collected:
    result = Collected()
    async for out in agen:
        result.add(out)
    return result


async def close(agen: AsyncIterator[RequestOutput]) -> None:
    """Close a ``generate()`` stream early, as a disconnecting client does."""
    assert isinstance(agen, AsyncGenerator)
    await agen.aclose()


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.005)


def idle_and_free(engine: LLMEngine) -> Callable[[], bool]:
    return lambda: not engine.has_unfinished() and engine.num_active_blocks == 0


async def test_concurrent_generate_equals_offline(start_async: AsyncFactory) -> None:
    prompts = [prompt(n, seed=n) for n in (4, 19, 9, 30)]
    aengine = start_async(block_size=8)
    results = await asyncio.gather(
        *(consume(aengine.generate(f"c{i}", p, GREEDY)) for i, p in enumerate(prompts))
    )
    offline = LLM(engine_config(num_blocks=64))
    completions = offline.generate(prompts, GREEDY)
    assert_all_blocks_released(offline.engine)
    for got, want in zip(results, completions, strict=True):
        assert got.num_finished == 1 and got.finish_reason == want.finish_reason == "length"
        assert got.token_ids == want.token_ids
        assert got.text == want.text
        assert [lp.token_id for lp in got.logprobs] == want.token_ids
        for g, w in zip(got.logprobs, want.logprobs, strict=True):
            assert abs(g.logprob - w.logprob) <= 1e-4
    await asyncio.wait_for(aengine.wait_idle(), WAIT_S)
    assert idle_and_free(aengine.engine)()


async def test_closing_the_generator_aborts_and_frees_blocks(
    start_async: AsyncFactory, recorded: Callable[[LLMEngine], list[RequestOutput]]
) -> None:
    aengine = start_async()
    outputs = recorded(aengine.engine)
    agen = aengine.generate("early", prompt(10, 1), LONG)
    first = await anext(agen)
    assert not first.finished
    assert aengine.engine.allocator.num_used > 0
    await close(agen)
    await wait_until(idle_and_free(aengine.engine), "the aborted request's blocks are free")
    final = [o for o in outputs if o.request_id == "early" and o.finished]
    assert [o.finish_reason for o in final] == ["abort"]
    assert final[0].num_output_tokens < LONG.max_tokens


async def test_cancelling_the_consumer_aborts(
    start_async: AsyncFactory, recorded: Callable[[LLMEngine], list[RequestOutput]]
) -> None:
    aengine = start_async()
    outputs = recorded(aengine.engine)
    got_one = asyncio.Event()

    async def client() -> None:
        async for _ in aengine.generate("gone", prompt(10, 2), LONG):
            got_one.set()

    task = asyncio.create_task(client())
    await asyncio.wait_for(got_one.wait(), WAIT_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(idle_and_free(aengine.engine), "the cancelled request's blocks are free")
    assert [o.finish_reason for o in outputs if o.request_id == "gone" and o.finished] == ["abort"]


async def test_overload_when_the_waiting_queue_is_full(start_async: AsyncFactory) -> None:
    aengine = start_async(max_num_seqs=1, max_waiting_requests=1)
    running = aengine.generate("running", prompt(5, 3), LONG)
    await anext(running)  # running now: max_num_seqs=1 keeps the next one waiting
    waiting = aengine.generate("waiting", prompt(5, 4), LONG)
    waiting_task = asyncio.create_task(first_output(waiting))
    await wait_until(lambda: aengine.num_waiting == 1, "one request waits")
    with pytest.raises(EngineOverloadedError):
        await anext(aengine.generate("refused", prompt(5, 5), LONG))
    waiting_task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting_task
    await close(running)
    await wait_until(idle_and_free(aengine.engine), "both requests are aborted")


async def test_invalid_request_raises_before_the_first_output(start_async: AsyncFactory) -> None:
    aengine = start_async()
    with pytest.raises(RequestError):
        await anext(aengine.generate("empty", [], GREEDY))
    with pytest.raises(RequestError):
        await anext(
            aengine.generate(
                "too-long", prompt(10, 6), dataclasses.replace(GREEDY, max_tokens=5000)
            )
        )
    assert aengine.is_healthy()


async def test_stop_cancels_the_loop_and_frees_everything(start_async: AsyncFactory) -> None:
    aengine = start_async()
    agen = aengine.generate("inflight", prompt(8, 7), LONG)
    await anext(agen)
    await asyncio.wait_for(aengine.stop(), WAIT_S)
    assert not aengine.is_healthy()
    assert aengine.engine.num_active_blocks == 0
    aengine.engine.check_integrity()
    with pytest.raises(EngineOverloadedError, match="not running"):
        await anext(aengine.generate("late", prompt(8, 8), GREEDY))
    await aengine.stop()  # idempotent
    await close(agen)


async def test_stop_ends_in_flight_generators(start_async: AsyncFactory) -> None:
    """A caller still iterating when the engine stops gets a final output, not a hang."""
    aengine = start_async()
    agen = aengine.generate("inflight", prompt(8, 9), LONG)
    await anext(agen)
    rest = asyncio.create_task(consume_rest(agen))
    await asyncio.sleep(0.05)
    await aengine.stop()
    try:
        outputs = await asyncio.wait_for(asyncio.shield(rest), 2.0)
    except TimeoutError:
        rest.cancel()
        with pytest.raises(asyncio.CancelledError):
            await rest
        raise AssertionError("generate() still waits for outputs after stop()") from None
    assert outputs[-1].finished and outputs[-1].finish_reason == "abort"


async def first_output(agen: AsyncIterator[RequestOutput]) -> RequestOutput:
    return await anext(agen)


async def consume_rest(agen: AsyncIterator[RequestOutput]) -> Sequence[RequestOutput]:
    return [out async for out in agen]


async def test_a_broken_block_invariant_on_idle_makes_the_engine_unhealthy(
    start_async: AsyncFactory,
) -> None:
    aengine = start_async()
    await consume(aengine.generate("ok", prompt(5, seed=1), GREEDY))
    assert aengine.is_healthy()
    leaked = aengine.engine.allocator.allocate(1)  # used, but held by no request: a leak
    await consume(aengine.generate("next", prompt(5, seed=2), GREEDY))
    await wait_until(lambda: not aengine.is_healthy(), "the idle integrity check failed")
    aengine.engine.allocator.free(leaked)  # let the fixture's own checks pass

"""Engines over ``dummy:tiny`` (float32, CPU) for engine-level tests, with block accounting checked.

Import the fixtures explicitly (``from engine_fixtures import make_engine_fixture  # noqa: F401``);
the test then asks for ``make_engine`` (and ``tiny``). Every engine built through ``make_engine`` is
checked at teardown: ``check_integrity()`` passes and no request holds a block (each is free or
cached), so a test that leaks blocks (an abort, a preemption, a stop that forgot to free) fails even
if its outputs are right.

The weights are loaded once per process (``load_tiny``); engines never write to them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypedDict

import pytest
import torch
from typing_extensions import Unpack

from memserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from memserve.engine.llm_engine import LLMEngine
from memserve.engine.request import Request
from memserve.engine.types import FinishReason, RequestOutput, SamplingParams, TokenLogprob
from memserve.model.loader import LoadedModel, load_model

TINY = "dummy:tiny"
CPU = torch.device("cpu")
EOS_TOKEN_ID = 2  # the dummy tokenizer's </s>


@functools.cache
def load_tiny() -> LoadedModel:
    return load_model(TINY, torch.float32, CPU)


def engine_config(
    *,
    num_blocks: int = 64,
    block_size: int = 16,
    max_num_batched_tokens: int = 2048,
    max_num_seqs: int = 64,
    max_waiting_requests: int = 1024,
    max_model_len: int | None = None,
    enable_prefix_caching: bool = True,
    dram_num_blocks: int = 0,
) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(TINY, dtype="float32", max_model_len=max_model_len),
        cache=CacheConfig(
            block_size=block_size,
            num_blocks=num_blocks,
            enable_prefix_caching=enable_prefix_caching,
            dram_num_blocks=dram_num_blocks,
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            max_waiting_requests=max_waiting_requests,
        ),
    )


class EngineSettings(TypedDict, total=False):
    """The keyword arguments of ``engine_config`` (defaults live there)."""

    num_blocks: int
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_waiting_requests: int
    max_model_len: int | None
    enable_prefix_caching: bool
    dram_num_blocks: int


class EngineFactory(Protocol):
    def __call__(
        self, *, loaded: LoadedModel | None = None, **settings: Unpack[EngineSettings]
    ) -> LLMEngine: ...


def assert_all_blocks_released(engine: LLMEngine) -> None:
    """Integrity holds and no request holds a block: each is free or historical (cached)."""
    engine.check_integrity()
    assert engine.num_active_blocks == 0, f"{engine.num_active_blocks} blocks still held"
    assert engine.pool.tree.num_locked_blocks() == 0


@pytest.fixture(name="tiny", scope="module")
def tiny_fixture() -> LoadedModel:
    return load_tiny()


@pytest.fixture(name="make_engine")
def make_engine_fixture(tiny: LoadedModel) -> Iterator[EngineFactory]:
    """Builds engines sharing the tiny weights; at teardown no block of any may be held."""
    engines: list[LLMEngine] = []

    def make(*, loaded: LoadedModel | None = None, **settings: Unpack[EngineSettings]) -> LLMEngine:
        engine = LLMEngine(engine_config(**settings), loaded=loaded or tiny)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        assert_all_blocks_released(engine)


# ---- driving an engine --------------------------------------------------------------------------


@dataclass
class Collected:
    """Everything one request produced, increment by increment."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_outputs: int = 0
    num_finished: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0
    num_cached_tokens_dram: int = 0

    def add(self, out: RequestOutput) -> None:
        assert self.num_finished == 0, f"{out.request_id}: output after the final one"
        self.num_outputs += 1
        self.token_ids.extend(out.new_token_ids)
        self.text += out.new_text
        self.logprobs.extend(out.new_logprobs or ())
        assert out.num_output_tokens == len(self.token_ids)
        if out.finished:
            self.num_finished += 1
            self.finish_reason = out.finish_reason
            self.stop_reason = out.stop_reason
            self.num_cached_tokens = out.num_cached_tokens
            self.num_cached_tokens_dram = out.num_cached_tokens_dram


@dataclass(frozen=True)
class Job:
    request_id: str
    prompt: tuple[int, ...]
    params: SamplingParams


def add_job(engine: LLMEngine, job: Job) -> Request:
    """Add ``job`` and return the engine's ``Request`` for it (to read its preemption count)."""
    engine.add_request(job.request_id, job.prompt, job.params)
    request = engine.scheduler.waiting[-1]
    assert request.request_id == job.request_id
    return request


def collect(
    engine: LLMEngine,
    results: dict[str, Collected],
    max_steps: int = 1000,
) -> int:
    """Step until the engine has nothing unfinished; route outputs into ``results``; steps taken."""
    for steps in range(max_steps):
        if not engine.has_unfinished():
            return steps
        for out in engine.step():
            results.setdefault(out.request_id, Collected()).add(out)
    raise AssertionError(f"engine still busy after {max_steps} steps")


def run_with_arrivals(
    engine: LLMEngine, arrivals: Mapping[int, Sequence[Job]]
) -> tuple[dict[str, Collected], dict[str, Request]]:
    """Add ``arrivals[s]`` before step ``s`` (steps counted from 0), run until all finish."""
    results: dict[str, Collected] = {}
    requests: dict[str, Request] = {}
    last = max(arrivals, default=0)
    for step in range(last + 1):
        for job in arrivals.get(step, ()):
            requests[job.request_id] = add_job(engine, job)
        for out in engine.step():
            results.setdefault(out.request_id, Collected()).add(out)
    collect(engine, results)
    return results, requests


def generate_alone(engine: LLMEngine, job: Job) -> Collected:
    """Run ``job`` with nothing else in the engine (the reference for batched runs)."""
    assert not engine.has_unfinished()
    add_job(engine, job)
    results: dict[str, Collected] = {}
    collect(engine, results)
    return results[job.request_id]


LOGPROB_TOL = 1e-4


def assert_same_logprobs(got: Sequence[TokenLogprob], want: Sequence[TokenLogprob]) -> None:
    """Same sampled tokens and top alternatives, logprobs equal within ``LOGPROB_TOL``."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.token_id == w.token_id, i
        assert abs(g.logprob - w.logprob) <= LOGPROB_TOL, i
        assert [t for t, _ in g.top] == [t for t, _ in w.top], i
        for (_, gv), (_, wv) in zip(g.top, w.top, strict=True):
            assert abs(gv - wv) <= LOGPROB_TOL, i

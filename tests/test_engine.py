"""``LLMEngine`` end to end on ``dummy:tiny``: batching never changes a request's result.

The reference for every batched run is the same request generated alone. Greedy decoding with
``logprobs=5`` compares the model's distributions, not only tokens (random weights repeat tokens).
Every engine is checked at teardown: all blocks free, integrity holds (``engine_fixtures``).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch

from engine_fixtures import (  # noqa: F401 - fixtures
    EOS_TOKEN_ID,
    LOGPROB_TOL,
    Collected,
    EngineFactory,
    Job,
    add_job,
    assert_all_blocks_released,
    assert_same_logprobs,
    collect,
    engine_config,
    generate_alone,
    make_engine_fixture,
    run_with_arrivals,
    tiny_fixture,
)
from memserve.engine.llm_engine import LLMEngine
from memserve.engine.scheduler import SchedulerOutput
from memserve.engine.types import RequestError, SamplingParams
from memserve.model.loader import LoadedModel
from memserve.model.ops import pack_weight, unpack_weight
from model_harness import llama_model, paged_logits

DOT_TOKEN_ID = 3 + ord(".")  # the dummy tokenizer's byte tokens start at id 3
GREEDY = SamplingParams(temperature=0, logprobs=5, ignore_eos=True, max_tokens=8)

Solo = Callable[[Job], Collected]


def prompt(n: int, seed: int) -> tuple[int, ...]:
    """``n`` random token ids ending with the byte token of "." (a prompt whose text ends inside
    a UTF-8 character would absorb the first output bytes into its own replacement character)."""
    rng = random.Random(seed)
    return (*(rng.randrange(3, 32000) for _ in range(n - 1)), DOT_TOKEN_ID)


def jobs(lengths: Sequence[int], params: SamplingParams = GREEDY) -> list[Job]:
    return [Job(f"req{i}", prompt(n, seed=n), params) for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def solo(tiny: LoadedModel) -> Iterator[Solo]:
    """Generates a job alone in one engine kept for the module, with prefix caching off (a cold
    run every time); results are memoized."""
    engine = LLMEngine(engine_config(num_blocks=64, enable_prefix_caching=False), loaded=tiny)
    memo: dict[Job, Collected] = {}

    def run(job: Job) -> Collected:
        if job not in memo:
            memo[job] = generate_alone(engine, job)
        return memo[job]

    yield run
    assert_all_blocks_released(engine)


def assert_same_as_alone(
    results: dict[str, Collected], all_jobs: Sequence[Job], solo: Solo
) -> None:
    assert set(results) == {j.request_id for j in all_jobs}
    for job in all_jobs:
        got, want = results[job.request_id], solo(job)
        assert got.num_finished == 1
        assert got.token_ids == want.token_ids, job.request_id
        assert_same_logprobs(got.logprobs, want.logprobs)
        assert (got.finish_reason, got.text) == (want.finish_reason, want.text)


def check_text(engine: LLMEngine, result: Collected) -> None:
    """The streamed text is the decoded output, a final stop token excluded."""
    ids = result.token_ids
    if result.finish_reason == "stop" and not isinstance(result.stop_reason, str):
        ids = ids[:-1]  # a stop token id or EOS
    assert result.text == engine.tokenizer.decode(ids)


# ---- batching equals one-at-a-time --------------------------------------------------------------

LENGTHS = (5, 17, 33, 9, 24)
# Random sampling with its own seed: the same tokens whatever else is in the batch.
SEEDED_JOB = Job("seeded", prompt(13, 77), dataclasses.replace(GREEDY, temperature=1.0, seed=42))


def staggered(all_jobs: Sequence[Job]) -> dict[int, list[Job]]:
    """Two at once, then one every few steps (some arrive while others decode)."""
    return {0: list(all_jobs[:2]), 2: [all_jobs[2]], 3: [all_jobs[3]], 6: list(all_jobs[4:])}


def test_staggered_arrivals_equal_alone(make_engine: EngineFactory, solo: Solo) -> None:
    all_jobs = [*jobs(LENGTHS), SEEDED_JOB]
    engine = make_engine(num_blocks=64, block_size=8)
    results, _ = run_with_arrivals(engine, staggered(all_jobs))
    assert_same_as_alone(results, all_jobs, solo)
    assert len(set(results["seeded"].token_ids)) > 1
    for r in results.values():
        assert r.finish_reason == "length" and len(r.token_ids) == GREEDY.max_tokens
        check_text(engine, r)


def test_chunked_prefill_equals_alone(make_engine: EngineFactory, solo: Solo) -> None:
    all_jobs = jobs(LENGTHS)
    engine = make_engine(num_blocks=64, block_size=4, max_num_batched_tokens=7, max_num_seqs=3)
    results, _ = run_with_arrivals(engine, staggered(all_jobs))
    assert_same_as_alone(results, all_jobs, solo)


@pytest.mark.parametrize("token_budget", [2048, 7])
def test_preemption_under_a_tiny_kv_budget_equals_alone(
    make_engine: EngineFactory, solo: Solo, monkeypatch: pytest.MonkeyPatch, token_budget: int
) -> None:
    all_jobs = [*jobs(LENGTHS), SEEDED_JOB]
    # 12 blocks of 4 admit the longest request (33 + 8 tokens); together they need 36 blocks.
    # With a small token budget, prompts are also chunked, and a preempted one restarts mid-way.
    engine = make_engine(num_blocks=12, block_size=4, max_num_batched_tokens=token_budget)
    preempted: list[tuple[str, ...]] = []
    schedule = engine.scheduler.schedule

    def recording_schedule() -> SchedulerOutput:
        out = schedule()
        preempted.append(out.preempted)
        return out

    monkeypatch.setattr(engine.scheduler, "schedule", recording_schedule)
    results, requests = run_with_arrivals(engine, staggered(all_jobs))
    assert any(preempted), "the KV budget was meant to force preemption"
    counts = {rid: r.num_preemptions for rid, r in requests.items()}
    assert sum(counts.values()) == sum(len(p) for p in preempted)
    assert_same_as_alone(results, all_jobs, solo)


# ---- logprobs against the model's logits ---------------------------------------------------------


def test_logprobs_equal_log_softmax_of_reference_logits(
    make_engine: EngineFactory, tiny: LoadedModel
) -> None:
    job = Job("lp", prompt(20, seed=99), dataclasses.replace(GREEDY, max_tokens=6))
    engine = make_engine()
    result = generate_alone(engine, job)
    full = list(job.prompt) + result.token_ids
    logits = paged_logits(llama_model(tiny), full[:-1], [11, 1, 9, 1, 1, 1, 1])  # [len - 1, V]
    logp = torch.log_softmax(logits[len(job.prompt) - 1 :].double(), dim=-1)  # one row per output
    assert len(result.logprobs) == len(result.token_ids) == 6
    for i, lp in enumerate(result.logprobs):
        assert lp.token_id == result.token_ids[i] == int(logp[i].argmax())
        assert abs(lp.logprob - float(logp[i, lp.token_id])) <= LOGPROB_TOL
        top = logp[i].topk(5)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert (
            max(abs(v - float(w)) for (_, v), w in zip(lp.top, top.values, strict=True))
            <= LOGPROB_TOL
        )


# ---- stop conditions ----------------------------------------------------------------------------


def first_new_token_at(tokens: Sequence[int], min_index: int) -> int:
    """The first index >= ``min_index`` whose token did not occur before it."""
    for k in range(min_index, len(tokens)):
        if tokens[k] not in tokens[:k]:
            return k
    raise AssertionError(f"no fresh token after index {min_index} in {tokens}")


def test_max_tokens_finishes_with_length(make_engine: EngineFactory) -> None:
    engine = make_engine()
    result = generate_alone(
        engine, Job("a", prompt(7, 1), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    )
    assert (len(result.token_ids), result.finish_reason, result.stop_reason) == (5, "length", None)
    assert result.num_outputs == 5 and result.num_finished == 1
    assert result.logprobs == []  # none asked for
    check_text(engine, result)


def test_stop_token_id_is_counted_and_cuts_text(make_engine: EngineFactory, solo: Solo) -> None:
    base = Job("s", prompt(12, 5), dataclasses.replace(GREEDY, max_tokens=12))
    reference = solo(base).token_ids
    k = first_new_token_at(reference, 2)
    stop_id = reference[k]
    engine = make_engine()
    params = dataclasses.replace(base.params, stop_token_ids=(stop_id,))
    result = generate_alone(engine, dataclasses.replace(base, params=params))
    assert result.token_ids == reference[: k + 1]  # the stop token is part of the output ids
    assert (result.finish_reason, result.stop_reason) == ("stop", stop_id)
    assert result.text == engine.tokenizer.decode(reference[:k])


def test_min_tokens_suppresses_stop_tokens(make_engine: EngineFactory, solo: Solo) -> None:
    base = Job("m", prompt(12, 5), dataclasses.replace(GREEDY, max_tokens=12))
    reference = solo(base).token_ids
    k = first_new_token_at(reference, 2)
    stop_id = reference[k]
    engine = make_engine()
    params = dataclasses.replace(base.params, stop_token_ids=(stop_id,), min_tokens=k + 2)
    result = generate_alone(engine, dataclasses.replace(base, params=params))
    assert result.token_ids[:k] == reference[:k]
    assert stop_id not in result.token_ids[: k + 2]
    assert len(result.token_ids) >= k + 2
    # At position k the raw distribution still prefers the stop token; the runner-up was taken.
    lp = result.logprobs[k]
    assert lp.top[0][0] == stop_id and lp.token_id == lp.top[1][0]
    if result.finish_reason == "stop":
        assert result.token_ids[-1] == stop_id and result.stop_reason == stop_id
    check_text(engine, result)


def eos_job(ignore_eos: bool, min_tokens: int = 0, seed: int = 3) -> Job:
    params = dataclasses.replace(
        GREEDY, max_tokens=10, ignore_eos=ignore_eos, min_tokens=min_tokens
    )
    return Job("eos", prompt(10, seed), params)


@pytest.fixture(scope="module")
def eos_setup(tiny: LoadedModel, solo: Solo) -> tuple[LoadedModel, int]:
    """``tiny`` with the lm_head row of EOS set to 1.01 x the row of a token that greedy decoding
    produces a few tokens in: where that token would win, EOS wins (random weights never emit EOS).
    Returns the model and the prompt seed of ``eos_job`` to use with it."""
    for seed in range(3, 13):
        reference = solo(eos_job(ignore_eos=True, seed=seed)).token_ids
        fresh = [k for k in range(2, len(reference)) if reference[k] not in reference[:k]]
        if fresh:
            lm_head = unpack_weight(tiny.weights.lm_head).t().contiguous()  # [vocab, hidden]
            lm_head[EOS_TOKEN_ID] = lm_head[reference[fresh[0]]] * 1.01
            weights = dataclasses.replace(tiny.weights, lm_head=pack_weight(lm_head))
            return dataclasses.replace(tiny, weights=weights), seed
    raise AssertionError("every greedy run repeats a single token")


def test_eos_ends_generation_unless_ignored(
    make_engine: EngineFactory, eos_setup: tuple[LoadedModel, int]
) -> None:
    eos_model, seed = eos_setup
    engine = make_engine(loaded=eos_model)
    assert engine.eos_token_ids == frozenset({EOS_TOKEN_ID})
    ignored = generate_alone(engine, eos_job(ignore_eos=True, seed=seed))
    assert EOS_TOKEN_ID in ignored.token_ids  # the model now emits EOS...
    i = ignored.token_ids.index(EOS_TOKEN_ID)
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == 10  # ...and goes on
    honoured = generate_alone(engine, eos_job(ignore_eos=False, seed=seed))
    assert honoured.token_ids == ignored.token_ids[: i + 1]
    assert (honoured.finish_reason, honoured.stop_reason) == ("stop", None)
    assert honoured.text == engine.tokenizer.decode(ignored.token_ids[:i])
    check_text(engine, honoured)


def test_min_tokens_suppresses_eos(
    make_engine: EngineFactory, eos_setup: tuple[LoadedModel, int]
) -> None:
    eos_model, seed = eos_setup
    engine = make_engine(loaded=eos_model)
    ignored = generate_alone(engine, eos_job(ignore_eos=True, seed=seed))
    i = ignored.token_ids.index(EOS_TOKEN_ID)
    result = generate_alone(engine, eos_job(ignore_eos=False, min_tokens=i + 2, seed=seed))
    assert result.token_ids[:i] == ignored.token_ids[:i]
    assert EOS_TOKEN_ID not in result.token_ids[: i + 2]
    assert result.logprobs[i].top[0][0] == EOS_TOKEN_ID  # EOS was the argmax, and was banned
    assert len(result.token_ids) >= i + 2
    check_text(engine, result)


def pick_stop_string(text: str) -> tuple[int, str]:
    """A 2-character piece of ``text`` (no U+FFFD) at its first occurrence, not at the start."""
    for j in range(1, len(text) - 1):
        piece = text[j : j + 2]
        if "\ufffd" not in piece and text.find(piece) == j and not piece.isspace():
            return j, piece
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_the_text(make_engine: EngineFactory, solo: Solo, include: bool) -> None:
    base = Job("str", prompt(8, 11), dataclasses.replace(GREEDY, max_tokens=16))
    reference = solo(base)
    j, stop = pick_stop_string(reference.text)
    engine = make_engine()
    params = dataclasses.replace(base.params, stop=(stop,), include_stop_str_in_output=include)
    result = generate_alone(engine, dataclasses.replace(base, params=params))
    assert (result.finish_reason, result.stop_reason) == ("stop", stop)
    assert result.text == reference.text[: j + len(stop) if include else j]
    assert result.token_ids == reference.token_ids[: len(result.token_ids)]
    assert len(result.token_ids) < len(reference.token_ids)


def test_stop_string_before_min_tokens_is_ignored(make_engine: EngineFactory, solo: Solo) -> None:
    """As in vLLM, stop strings (like stop tokens) count only once ``min_tokens`` are out."""
    base = Job("str", prompt(8, 11), dataclasses.replace(GREEDY, max_tokens=16))
    reference = solo(base)
    _, stop = pick_stop_string(reference.text)
    engine = make_engine()
    params = dataclasses.replace(base.params, stop=(stop,), min_tokens=16)
    result = generate_alone(engine, dataclasses.replace(base, params=params))
    assert result.token_ids == reference.token_ids
    assert (result.finish_reason, result.text) == ("length", reference.text)


def test_max_model_len_caps_prompt_plus_output(make_engine: EngineFactory) -> None:
    engine = make_engine(max_model_len=24)
    assert engine.max_model_len == 24
    with pytest.raises(RequestError, match="maximum context length is 24") as err:
        engine.add_request("over", prompt(16, 1), SamplingParams(max_tokens=9))
    assert err.value.param == "max_tokens"
    result = generate_alone(
        engine,
        Job("fits", prompt(16, 1), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)),
    )
    assert len(result.token_ids) == 8 and result.finish_reason == "length"


# ---- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt_ids", "max_tokens", "param", "message"),
    [
        ((), 4, "prompt", "at least one token"),
        ((5, -1), 4, "prompt", r"in \[0, 32000\)"),
        ((5, 32000), 4, "prompt", r"in \[0, 32000\)"),
        (tuple(range(3, 23)), 13, "max_tokens", "KV cache"),  # 33 tokens > 2 blocks of 16
    ],
)
def test_invalid_requests_raise_request_error(
    make_engine: EngineFactory,
    prompt_ids: tuple[int, ...],
    max_tokens: int,
    param: str,
    message: str,
) -> None:
    engine = make_engine(num_blocks=2)
    with pytest.raises(RequestError, match=message) as err:
        engine.add_request("bad", prompt_ids, SamplingParams(max_tokens=max_tokens))
    assert err.value.param == param
    assert not engine.has_unfinished()


def test_a_request_filling_the_whole_cache_is_served(make_engine: EngineFactory) -> None:
    engine = make_engine(num_blocks=2)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    result = generate_alone(engine, Job("full", tuple(range(3, 31)), params))  # 28 + 4 = 2 x 16
    assert len(result.token_ids) == 4


def test_duplicate_request_id_is_refused(make_engine: EngineFactory) -> None:
    engine = make_engine()
    engine.add_request("dup", (5, 6), SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match="duplicate"):
        engine.add_request("dup", (5, 6), SamplingParams(max_tokens=2))
    results: dict[str, Collected] = {}
    collect(engine, results)
    assert results["dup"].num_finished == 1


# ---- abort --------------------------------------------------------------------------------------


def test_abort_mid_generation_frees_blocks_and_answers_once(
    make_engine: EngineFactory, solo: Solo
) -> None:
    engine = make_engine(block_size=4)
    victim = Job("victim", prompt(10, 21), dataclasses.replace(GREEDY, max_tokens=20))
    other = Job("other", prompt(12, 22), GREEDY)
    queued = Job("queued", prompt(6, 23), GREEDY)
    results: dict[str, Collected] = {}
    victim_request = add_job(engine, victim)
    other_request = add_job(engine, other)
    for _ in range(3):
        for out in engine.step():
            results.setdefault(out.request_id, Collected()).add(out)
    assert len(victim_request.block_ids) > 0
    engine.abort_request("victim")
    # Freed at once, not at the next step.
    assert engine.num_active_blocks == len(other_request.block_ids)
    engine.check_integrity()
    engine.abort_request("victim")  # twice: no second answer
    engine.abort_request("never-added")
    add_job(engine, queued)
    engine.abort_request("queued")  # aborted while waiting, before any step ran it
    collect(engine, results)

    for rid in ("victim", "queued"):
        assert results[rid].num_finished == 1 and results[rid].finish_reason == "abort"
    assert results["queued"].token_ids == []
    assert len(results["victim"].token_ids) == 3
    assert results["victim"].token_ids == solo(victim).token_ids[:3]
    assert results["other"].token_ids == solo(other).token_ids
    engine.abort_request("other")  # already finished: nothing happens
    assert engine.step() == []

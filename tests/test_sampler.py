"""``Sampler``: greedy, seeded and filtered sampling against their definitions, and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from memserve.engine.sampler import Sampler, SampleRow
from memserve.engine.types import SamplingParams

GREEDY = SamplingParams(temperature=0)
LOGITS4 = torch.tensor([2.0, 1.0, 0.5, -1.0])  # a 4-token vocabulary for frequency tests
NUM_SAMPLES = 4000


def random_logits(num_rows: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def row(params: SamplingParams, seed: int | None = None, banned: tuple[int, ...] = ()) -> SampleRow:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SampleRow(params, gen, banned)


def frequencies(
    params: SamplingParams, logits: torch.Tensor = LOGITS4, seed: int = 0
) -> torch.Tensor:
    """Empirical distribution of ``NUM_SAMPLES`` draws (one batch of identical rows)."""
    batch = logits.expand(NUM_SAMPLES, -1).contiguous()
    tokens, _ = Sampler(seed).sample(batch, [row(params)] * NUM_SAMPLES)
    counts = torch.bincount(torch.tensor(tokens), minlength=logits.shape[0])
    return counts.double() / NUM_SAMPLES


def assert_close_to(freq: torch.Tensor, probs: torch.Tensor) -> None:
    """Within 4.5 standard deviations of a binomial proportion, per token (and exact zeros)."""
    probs = probs.double()
    tol = 4.5 * torch.sqrt(probs * (1 - probs) / NUM_SAMPLES) + 1e-12
    assert ((freq - probs).abs() <= tol).all(), (freq.tolist(), probs.tolist())


def test_greedy_is_argmax() -> None:
    logits = random_logits(8)
    tokens, logprobs = Sampler().sample(logits, [row(GREEDY)] * 8)
    assert tokens == logits.argmax(dim=-1).tolist()
    assert logprobs == [None] * 8  # not asked for


def test_top_k_one_is_greedy_at_any_temperature() -> None:
    logits = random_logits(8, seed=1)
    tokens, _ = Sampler().sample(logits, [row(SamplingParams(temperature=5.0, top_k=1))] * 8)
    assert tokens == logits.argmax(dim=-1).tolist()


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch() -> None:
    params = SamplingParams(temperature=1.0, seed=1234)
    logits = random_logits(6, seed=2)

    def draws(batch_rows: list[int], target: int) -> list[int]:
        """Sample 5 steps with the seeded request at ``target`` among unseeded neighbours."""
        sampler, gen_row = Sampler(seed=len(batch_rows)), row(params, seed=1234)
        out = []
        for _ in range(5):
            rows = [
                gen_row if i == target else row(SamplingParams(temperature=1.0)) for i in batch_rows
            ]
            tokens, _ = sampler.sample(logits[batch_rows], rows)
            out.append(tokens[batch_rows.index(target)])
        return out

    alone = draws([3], 3)
    assert draws([3], 3) == alone
    assert draws([0, 1, 3, 5], 3) == alone
    assert draws([5, 3], 3) == alone
    other_seed = [Sampler().sample(logits[3:4], [row(params, seed=s)])[0][0] for s in range(20)]
    assert len(set(other_seed)) > 1  # the seed matters


def test_tiny_top_p_is_argmax() -> None:
    logits = random_logits(16, seed=3)
    tokens, _ = Sampler().sample(logits, [row(SamplingParams(temperature=1.0, top_p=1e-6))] * 16)
    assert tokens == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies_follow_softmax(temperature: float) -> None:
    freq = frequencies(SamplingParams(temperature=temperature))
    assert_close_to(freq, torch.softmax(LOGITS4 / temperature, dim=-1))


def test_top_k_keeps_the_k_most_likely() -> None:
    freq = frequencies(SamplingParams(temperature=1.0, top_k=2))
    assert_close_to(freq, torch.softmax(torch.tensor([2.0, 1.0, -math.inf, -math.inf]), dim=-1))


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.softmax(LOGITS4, dim=-1)  # ≈ [0.61, 0.22, 0.14, 0.03]
    p = float(probs[0] + probs[1]) - 0.01  # needs the top two, not the third
    freq = frequencies(SamplingParams(temperature=1.0, top_p=p))
    kept = torch.tensor([probs[0], probs[1], 0.0, 0.0])
    assert_close_to(freq, kept / kept.sum())


def test_min_p_drops_tokens_below_a_fraction_of_the_best() -> None:
    probs = torch.softmax(LOGITS4, dim=-1)
    min_p = float(probs[2] / probs[0]) + 0.01  # token 2 just below the cut, token 1 above
    freq = frequencies(SamplingParams(temperature=1.0, min_p=min_p))
    kept = torch.tensor([probs[0], probs[1], 0.0, 0.0])
    assert_close_to(freq, kept / kept.sum())


def test_banned_tokens_are_never_sampled() -> None:
    banned = (0, 1)  # the two most likely tokens of LOGITS4
    batch = LOGITS4.expand(NUM_SAMPLES, -1).contiguous()
    rows = [row(SamplingParams(temperature=1.0), banned=banned)] * NUM_SAMPLES
    tokens, _ = Sampler().sample(batch, rows)
    counts = torch.bincount(torch.tensor(tokens), minlength=4).double() / NUM_SAMPLES
    assert counts[0] == counts[1] == 0
    assert_close_to(counts, torch.softmax(torch.tensor([-math.inf, -math.inf, 0.5, -1.0]), dim=-1))
    greedy, _ = Sampler().sample(LOGITS4[None], [row(GREEDY, banned=banned)])
    assert greedy == [2]


def test_logprobs_are_of_the_raw_distribution_sorted_and_consistent() -> None:
    logits = random_logits(4, seed=4)
    reference = torch.log_softmax(logits.double(), dim=-1)
    rows = [
        row(SamplingParams(temperature=0, logprobs=5)),
        row(SamplingParams(temperature=0.3, top_k=3, logprobs=2), seed=1),  # filters do not apply
        row(SamplingParams(temperature=0, logprobs=0), banned=(int(logits[2].argmax()),)),
        row(SamplingParams(temperature=0)),
    ]
    tokens, logprobs = Sampler().sample(logits, rows)
    assert logprobs[3] is None
    for i, num_top in enumerate((5, 2, 0)):
        lp = logprobs[i]
        assert lp is not None
        assert lp.token_id == tokens[i]
        assert lp.logprob == pytest.approx(float(reference[i, tokens[i]]), abs=1e-5)
        assert len(lp.top) == num_top
        top_ids = reference[i].argsort(descending=True)[:num_top].tolist()
        assert [t for t, _ in lp.top] == top_ids
        for token_id, value in lp.top:
            assert value == pytest.approx(float(reference[i, token_id]), abs=1e-5)
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
    first = logprobs[0]
    assert first is not None and first.top[0][0] == tokens[0]  # greedy: the most likely token
    assert first.top[0][1] == pytest.approx(first.logprob)
    # The banned argmax was not sampled, yet the reported logprob is of the raw distribution.
    assert tokens[2] != int(logits[2].argmax())
    assert logprobs[2] is not None and logprobs[2].logprob < float(reference[2].max())


def test_all_rows_share_one_call() -> None:
    """Greedy, seeded and unseeded rows mixed in one batch each follow their own rule."""
    logits = random_logits(3, seed=5)
    seeded = SamplingParams(temperature=0.8, seed=7)
    tokens, _ = Sampler().sample(logits, [row(GREEDY), row(seeded, seed=7), row(GREEDY)])
    alone, _ = Sampler(99).sample(logits[1:2], [row(seeded, seed=7)])
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())
    assert tokens[1] == alone[0]

"""Token sampling from fp32 logits: greedy, temperature, top-k, top-p, min-p, per-request seeds.

Logprobs are those of the model's distribution (log-softmax of the raw logits, before temperature
and filtering), as OpenAI and vLLM report them. Greedy rows are one batched ``argmax``; random rows
are sampled one by one with their own ``torch.Generator`` when seeded, so a seeded request gives the
same tokens whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from memserve.engine.types import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class SampleRow:
    params: SamplingParams
    generator: torch.Generator | None
    banned_token_ids: tuple[int, ...] = ()  # stop tokens while min_tokens is not reached


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    def sample(
        self, logits: torch.Tensor, rows: Sequence[SampleRow]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [S, V] fp32 on any device → (token id per row, logprob info per row)."""
        logits = logits.cpu()
        raw = logits
        if any(r.banned_token_ids for r in rows):
            logits = logits.clone()
            for i, r in enumerate(rows):
                if r.banned_token_ids:
                    logits[i, list(r.banned_token_ids)] = float("-inf")
        greedy = logits.argmax(dim=-1).tolist()
        tokens = [
            greedy[i] if r.params.greedy else self._sample_row(logits[i], r)
            for i, r in enumerate(rows)
        ]
        return tokens, _logprobs(raw, rows, tokens)

    def _sample_row(self, logits: torch.Tensor, row: SampleRow) -> int:
        p = row.params
        scaled = logits / p.temperature  # [V]
        if p.top_k is not None and p.top_k < scaled.shape[0]:
            kth = torch.topk(scaled, p.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1:
            probs = _top_p(probs, p.top_p)
        generator = row.generator or self._generator
        return int(torch.multinomial(probs, 1, generator=generator).item())


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (always ≥ 1)."""
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)


def _logprobs(
    logits: torch.Tensor, rows: Sequence[SampleRow], tokens: list[int]
) -> list[TokenLogprob | None]:
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(rows)
    if not wanted:
        return out
    logp = torch.log_softmax(logits[wanted], dim=-1)  # [W, V]
    k = max(rows[i].params.logprobs or 0 for i in wanted)
    top_vals, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    for j, i in enumerate(wanted):
        n = rows[i].params.logprobs or 0
        top = tuple(zip(top_ids[j, :n].tolist(), top_vals[j, :n].tolist(), strict=True))
        out[i] = TokenLogprob(tokens[i], float(logp[j, tokens[i]]), top)
    return out

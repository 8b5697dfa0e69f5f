"""ShareGPT-like multi-turn chat: each turn resends the whole conversation plus a new user message.

Defaults and where they come from (the ShareGPT V3 dump vLLM benchmarks with,
``ShareGPT_V3_unfiltered_cleaned_split.json``, Llama tokenizer):

- user message: lognormal, mean ``user_tokens=161``, ``user_sigma=1.0`` (heavy tail; the sigmas
  are our choice, not measured) — the vLLM paper (Kwon et al., SOSP'23, Fig. 11a) reports a mean ShareGPT input of 161 tokens;
- assistant answer: lognormal, mean ``answer_tokens=338``, ``answer_sigma=0.8`` — same figure,
  mean output 338 tokens ("relatively long" next to Alpaca's 58);
- turns per conversation: 1 + geometric, mean ``mean_turns=3.5``, at most ``max_turns=16`` — the
  commonly quoted figure for the cleaned dump is 3-4 user turns per conversation once empty and
  one-sided ones are dropped (we did not re-measure it; there is no text here to measure);
- ``max_model_len=4096``: a session keeps only the turns whose full prompt plus answer fits (the
  first turn is always kept, its message cut to fit), so tiny models can serve every request.
  This trims the long tail: statistics above hold with a large ``max_model_len``.

Sessions arrive Poisson at ``rate`` sessions/s (first at 0). No shared prefix; ``history=True``.
"""

from __future__ import annotations

import math
from random import Random

from memserve.bench.workloads.base import Session, Turn, Workload, random_tokens


def make(
    num_sessions: int,
    seed: int,
    rate: float = 1.0,
    *,
    user_tokens: float = 161.0,
    user_sigma: float = 1.0,
    answer_tokens: float = 338.0,
    answer_sigma: float = 0.8,
    mean_turns: float = 3.5,
    max_turns: int = 16,
    max_model_len: int = 4096,
) -> Workload:
    """``num_sessions`` conversations, deterministic from ``seed`` (see the module docstring)."""
    if num_sessions < 0 or rate <= 0 or mean_turns < 1 or max_turns < 1 or max_model_len < 2:
        raise ValueError(
            "sharegpt: need num_sessions >= 0, rate > 0, turns >= 1, max_model_len >= 2"
        )
    rng = Random(seed)
    sessions, t = [], 0.0
    for i in range(num_sessions):
        num_turns = min(max_turns, 1 + _geometric(rng, mean_turns - 1))
        turns: list[Turn] = []
        total = 0  # prompt + answer tokens of the session so far
        for _ in range(num_turns):
            num_new = _lognormal(rng, user_tokens, user_sigma)
            max_tokens = _lognormal(rng, answer_tokens, answer_sigma)
            if total + num_new + max_tokens > max_model_len:
                if turns:
                    break
                max_tokens = min(max_tokens, max_model_len // 2)
                num_new = min(num_new, max_model_len - max_tokens)
            turns.append(Turn(random_tokens(rng, num_new), max_tokens))
            total += num_new + max_tokens
        sessions.append(Session(f"sharegpt-{i:05d}", t, (), tuple(turns)))
        t += rng.expovariate(rate)
    return Workload("sharegpt", tuple(sessions))


def _lognormal(rng: Random, mean: float, sigma: float) -> int:
    """A lognormal draw with the given *mean* (not median), at least 1."""
    return max(1, round(rng.lognormvariate(math.log(mean) - sigma**2 / 2, sigma)))


def _geometric(rng: Random, mean: float) -> int:
    """Failures before the first success, mean ``mean`` (0 when ``mean`` is 0)."""
    if mean <= 0:
        return 0
    p = 1 / (1 + mean)
    return int(math.log(1 - rng.random()) / math.log(1 - p))

"""ReAct-like agent traces: a long shared few-shot prompt, then many short think-act-observe steps.

ReAct on HotpotQA (Yao et al., ICLR'23): the prompt is a few-shot block of solved trajectories
(6 examples, ~1.5-2K tokens), then the question; each step the model writes "Thought/Action"
(short), the tool answers an "Observation" (a Wikipedia passage, ~100 tokens) that is appended
with the model's own output before the next step; tasks take ~5-8 steps (capped at 7-8).

Here, per task (session):

- ``prefix``: one of ``num_prefixes`` few-shot prompts of ``prefix_tokens`` tokens (task ``i``
  uses prompt ``i % num_prefixes``), shared by every task that uses it;
- turn 0: the question, ``question_tokens`` tokens; each later turn: an observation plus the
  next thought header, ``observation_tokens`` on average (uniform within +-50 %);
- each turn's output (thought + action): ``output_tokens`` on average (uniform within +-50 %);
- ``min_steps``..``max_steps`` turns, uniform (mean 5.5 with the defaults);
- ``history=True``: a step's prompt is the prefix and the whole trajectory so far.

Tasks arrive Poisson at ``rate`` tasks/s (first at 0).
"""

from __future__ import annotations

from random import Random

from memserve.bench.workloads.base import Session, Turn, Workload, random_tokens


def make(
    num_sessions: int,
    seed: int,
    rate: float = 1.0,
    *,
    num_prefixes: int = 1,
    prefix_tokens: int = 1536,
    question_tokens: int = 32,
    observation_tokens: int = 96,
    output_tokens: int = 48,
    min_steps: int = 3,
    max_steps: int = 8,
) -> Workload:
    """``num_sessions`` tasks, deterministic from ``seed`` (see the module docstring)."""
    if rate <= 0 or num_prefixes < 1 or not 1 <= min_steps <= max_steps:
        raise ValueError("react: need rate > 0, num_prefixes >= 1, 1 <= min_steps <= max_steps")
    if min(prefix_tokens, question_tokens, observation_tokens, output_tokens) < 2:
        raise ValueError("react: lengths must be >= 2")
    rng = Random(seed)
    prefixes = [random_tokens(rng, prefix_tokens) for _ in range(num_prefixes)]
    sessions, t = [], 0.0
    for i in range(num_sessions):
        num_steps = rng.randint(min_steps, max_steps)
        turns = [Turn(random_tokens(rng, question_tokens), _around(rng, output_tokens))]
        for _ in range(num_steps - 1):
            observation = random_tokens(rng, _around(rng, observation_tokens))
            turns.append(Turn(observation, _around(rng, output_tokens)))
        sessions.append(Session(f"react-{i:05d}", t, prefixes[i % num_prefixes], tuple(turns)))
        t += rng.expovariate(rate)
    return Workload("react", tuple(sessions))


def _around(rng: Random, mean: int) -> int:
    """Uniform in ``[mean - mean // 2, mean + mean // 2]``: mean ``mean``."""
    return rng.randint(mean - mean // 2, mean + mean // 2)

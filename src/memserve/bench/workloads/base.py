"""What every workload of ``memserve-bench`` produces: sessions of turns, in token ids.

A ``Session`` arrives at ``arrival_s`` (seconds from the start; open loop across sessions) and
sends its ``turns`` one after the other (closed loop inside a session: turn n+1 is sent when turn
n has finished). Turn n's prompt is built at run time: with ``history`` on, it is the session's
``prefix`` + every earlier turn's ``new_tokens`` and the tokens the server actually generated for
it + this turn's ``new_tokens``; without, it is ``prefix + new_tokens``. A single request is a
session of one turn. Token ids avoid special tokens (they are plain ids in ``TOKEN_RANGE``), so
any model's tokenizer takes them. Everything is deterministic from the workload's seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from random import Random

TOKEN_RANGE = (300, 31000)
"""Token ids drawn by the generators: past the byte-level and special tokens of small vocabs."""


@dataclass(frozen=True)
class Turn:
    new_tokens: tuple[int, ...]  # appended to the prompt for this turn
    max_tokens: int  # output length asked for (sent with ignore_eos so it is exact)


@dataclass(frozen=True)
class Session:
    session_id: str
    arrival_s: float
    prefix: tuple[int, ...]  # shared document / few-shot prompt / trace blocks ("" if none)
    turns: tuple[Turn, ...]
    history: bool = True  # later turns carry the earlier turns and their answers


@dataclass(frozen=True)
class Workload:
    name: str
    sessions: tuple[Session, ...]  # sorted by arrival

    @property
    def num_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


def build_prompt(session: Session, turn_index: int, answers: Sequence[Sequence[int]]) -> list[int]:
    """The prompt of ``session.turns[turn_index]`` given the answers (generated token ids) of
    the earlier turns."""
    prompt = list(session.prefix)
    if session.history:
        for turn, answer in zip(session.turns[:turn_index], answers, strict=True):
            prompt += turn.new_tokens
            prompt += answer
    return prompt + list(session.turns[turn_index].new_tokens)


def random_tokens(rng: Random, num_tokens: int) -> tuple[int, ...]:
    """``num_tokens`` ids drawn uniformly from ``TOKEN_RANGE``."""
    return tuple(rng.choices(range(*TOKEN_RANGE), k=num_tokens))

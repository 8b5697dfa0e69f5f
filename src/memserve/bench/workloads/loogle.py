"""LooGLE-like long-document QA: shared long documents, short questions asked in turn.

The structure of ``benchmarks/routing_policies.py`` (the MemServe paper's scheduler experiment):

- ``num_sessions / share_ratio`` documents of ``doc_tokens`` random tokens (the session prefix);
  each document is read by exactly ``share_ratio`` sessions, in a shuffled order so a document's
  readers are spread over the run;
- each session asks ``questions`` questions of ``question_tokens`` tokens, each answered in
  ``answer_tokens`` tokens; a question's prompt carries the document and the session's earlier
  questions and answers (``history=True``);
- sessions arrive Poisson at ``rate`` sessions/s (first at 0).

Defaults: LooGLE (Li et al., 2023) documents are long (~20K words, over 20K tokens) and its
questions and answers short (tens of tokens). The MemServe paper's run has 80 sessions, 250
requests (~3 questions per session). Scaled for a CPU as in ``routing_policies.py``:
``doc_tokens=2048`` (about 10x shorter than LooGLE), ``share_ratio=3``, ``questions=3``,
``question_tokens=32``, ``answer_tokens=16``.
"""

from __future__ import annotations

from random import Random

from memserve.bench.workloads.base import Session, Turn, Workload, random_tokens


def make(
    num_sessions: int,
    seed: int,
    rate: float = 0.45,
    *,
    share_ratio: int = 3,
    doc_tokens: int = 2048,
    questions: int = 3,
    question_tokens: int = 32,
    answer_tokens: int = 16,
) -> Workload:
    """``num_sessions`` sessions over ``num_sessions // share_ratio`` documents.

    Raises ``ValueError`` unless ``share_ratio`` divides ``num_sessions`` (every document has
    exactly ``share_ratio`` readers)."""
    if share_ratio < 1 or num_sessions % share_ratio:
        raise ValueError(f"loogle: share_ratio {share_ratio} must divide {num_sessions} sessions")
    if rate <= 0 or questions < 1 or min(doc_tokens, question_tokens, answer_tokens) < 1:
        raise ValueError("loogle: need rate > 0 and positive questions and lengths")
    rng = Random(seed)
    docs = [random_tokens(rng, doc_tokens) for _ in range(num_sessions // share_ratio)]
    readers = [d for d in range(len(docs)) for _ in range(share_ratio)]
    rng.shuffle(readers)
    sessions, t = [], 0.0
    for i, doc_id in enumerate(readers):
        turns = tuple(
            Turn(random_tokens(rng, question_tokens), answer_tokens) for _ in range(questions)
        )
        sessions.append(Session(f"loogle-{i:04d}-d{doc_id:03d}", t, docs[doc_id], turns))
        t += rng.expovariate(rate)
    return Workload("loogle", tuple(sessions))

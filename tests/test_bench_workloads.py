"""The workload generators of ``memserve-bench``: determinism, documented statistics, sharing."""

from __future__ import annotations

import json
import lzma
import math
import random
import statistics
from collections.abc import Sequence
from pathlib import Path

import pytest

from memserve.bench.workloads import TOKEN_RANGE, WORKLOADS, Workload, build_prompt, make_workload
from memserve.bench.workloads import trace as trace_mod

SMALL = {"sharegpt": 20, "loogle": 12, "react": 20, "trace": 50}


REAL_TRACE_XZ = Path(__file__).parent / "data" / "mooncake_conversation_trace.jsonl.xz"
"""The real Mooncake conversation trace (Apache-2.0, see tests/data/README.md), compressed."""


def write_synthetic_trace(path: Path, num: int = 1200, seed: int = 0) -> None:
    """A Mooncake-format trace (CI has the repository only, not ../shared/traces): sessions
    whose turns extend their previous prompt, so hash ids are shared as in the real one."""
    rng = random.Random(seed)
    sessions: list[list[int]] = []
    next_id, t = 0, 0
    with path.open("w") as f:
        for _ in range(num):
            if sessions and rng.random() < 0.6:
                blocks = rng.choice(sessions)
            else:
                blocks = []
                sessions.append(blocks)
            for _ in range(rng.randint(1, 4)):
                blocks.append(next_id)
                next_id += 1
            input_length = 512 * (len(blocks) - 1) + rng.randint(1, 512)
            t += rng.randint(0, 900)
            row = {"timestamp": t, "input_length": input_length,
                   "output_length": rng.randint(1, 600), "hash_ids": list(blocks)}  # fmt: skip
            f.write(json.dumps(row) + "\n")


@pytest.fixture(autouse=True)
def synthetic_traces(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path_factory.getbasetemp() / "traces"
    if not folder.exists():
        folder.mkdir()
        write_synthetic_trace(folder / "conversation_trace.jsonl")
    monkeypatch.setenv("MEMSERVE_TRACES", str(folder))


def _trace_rows() -> list[trace_mod.TraceRequest]:
    return trace_mod.load_trace(trace_mod.resolve_path("conversation", None))


def _all_tokens(w: Workload) -> list[int]:
    return [t for s in w.sessions for t in (*s.prefix, *(x for u in s.turns for x in u.new_tokens))]


def _shared_fraction(chunks: Sequence[tuple[int, ...]]) -> float:
    """The share of chunks (blocks) equal to one seen before."""
    seen: set[tuple[int, ...]] = set()
    hits = 0
    for c in chunks:
        hits += c in seen
        seen.add(c)
    return hits / len(chunks)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_deterministic_in_range_and_sorted(name: str) -> None:
    if name == "trace":
        _trace_rows()
    a = make_workload(name, SMALL[name], seed=1)
    assert a == make_workload(name, SMALL[name], seed=1)
    assert a != make_workload(name, SMALL[name], seed=2)
    assert len(a.sessions) == SMALL[name]
    tokens = _all_tokens(a)
    assert tokens and min(tokens) >= TOKEN_RANGE[0] and max(tokens) < TOKEN_RANGE[1]
    arrivals = [s.arrival_s for s in a.sessions]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0
    assert all(u.max_tokens >= 1 for s in a.sessions for u in s.turns)
    assert len({s.session_id for s in a.sessions}) == len(a.sessions)


def test_make_workload_rejects_unknown_names_and_params() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("alpaca", 1, seed=0)
    with pytest.raises(TypeError):
        make_workload("react", 1, seed=0, no_such_param=1)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("sharegpt", {"max_model_len": 64}),
        ("loogle", {"doc_tokens": 4}),
        ("react", {"max_steps": 3}),
    ],
)
def test_sessions_arrive_poisson_at_rate(name: str, params: dict[str, int]) -> None:
    w = make_workload(name, 3000, seed=0, rate=2.0, **params)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(w.sessions, w.sessions[1:], strict=False)]
    assert statistics.mean(gaps) == pytest.approx(0.5, rel=0.08)  # 4 standard errors
    assert statistics.stdev(gaps) == pytest.approx(0.5, rel=0.1)  # exponential: std == mean


def test_sharegpt_statistics() -> None:
    w = make_workload("sharegpt", 3000, seed=0, max_model_len=10**9)
    turns = [len(s.turns) for s in w.sessions]
    users = [len(u.new_tokens) for s in w.sessions for u in s.turns]
    answers = [u.max_tokens for s in w.sessions for u in s.turns]
    assert statistics.mean(turns) == pytest.approx(3.5, abs=0.15)
    assert min(turns) == 1 and max(turns) <= 16
    assert statistics.mean(users) == pytest.approx(161, rel=0.08)
    assert statistics.mean(answers) == pytest.approx(338, rel=0.08)
    assert all(not s.prefix and s.history for s in w.sessions)


def test_sharegpt_sessions_fit_max_model_len() -> None:
    w = make_workload("sharegpt", 500, seed=0, max_model_len=1024)
    totals = [sum(len(u.new_tokens) + u.max_tokens for u in s.turns) for s in w.sessions]
    assert max(totals) <= 1024
    assert all(s.turns for s in w.sessions)
    # an over-long first turn is cut, never padded: its message stays at most what was drawn
    tiny = make_workload("sharegpt", 200, seed=0, max_model_len=8)
    assert all(len(s.turns) == 1 for s in tiny.sessions)
    assert max(len(s.turns[0].new_tokens) + s.turns[0].max_tokens for s in tiny.sessions) <= 8


def test_sharegpt_prompt_carries_the_whole_history() -> None:
    session = next(s for s in make_workload("sharegpt", 50, seed=0).sessions if len(s.turns) >= 3)
    answers = [[7] * 3, [8] * 2]
    t0, t1, t2 = session.turns[:3]
    assert build_prompt(session, 0, []) == list(t0.new_tokens)
    expected = [*t0.new_tokens, 7, 7, 7, *t1.new_tokens, 8, 8, *t2.new_tokens]
    assert build_prompt(session, 2, answers) == expected


def test_loogle_documents_are_shared_by_share_ratio_sessions() -> None:
    w = make_workload("loogle", 60, seed=0, share_ratio=4, questions=3)
    readers: dict[tuple[int, ...], int] = {}
    for s in w.sessions:
        readers[s.prefix] = readers.get(s.prefix, 0) + 1
        assert len(s.prefix) == 2048 and s.history
        assert [(len(u.new_tokens), u.max_tokens) for u in s.turns] == [(32, 16)] * 3
    assert sorted(readers.values()) == [4] * 15
    assert w.num_requests == 180
    # readers of one document are spread over the run, not back to back
    assert any(a.prefix != b.prefix for a, b in zip(w.sessions, w.sessions[1:], strict=False))
    with pytest.raises(ValueError, match="must divide"):
        make_workload("loogle", 10, seed=0, share_ratio=3)


def test_loogle_question_prompt_is_document_then_history() -> None:
    s = make_workload("loogle", 3, seed=0).sessions[0]
    prompt = build_prompt(s, 1, [[5] * 16])
    assert prompt == [*s.prefix, *s.turns[0].new_tokens, *[5] * 16, *s.turns[1].new_tokens]


def test_react_statistics_and_shared_prefixes() -> None:
    w = make_workload("react", 900, seed=0, num_prefixes=3)
    assert (
        sorted(sum(s.prefix == p for s in w.sessions) for p in {s.prefix for s in w.sessions})
        == [300] * 3
    )
    assert all(len(s.prefix) == 1536 and s.history for s in w.sessions)
    steps = [len(s.turns) for s in w.sessions]
    assert min(steps) == 3 and max(steps) == 8
    assert statistics.mean(steps) == pytest.approx(5.5, abs=0.15)
    observations = [len(u.new_tokens) for s in w.sessions for u in s.turns[1:]]
    outputs = [u.max_tokens for s in w.sessions for u in s.turns]
    assert statistics.mean(observations) == pytest.approx(96, rel=0.03)
    assert statistics.mean(outputs) == pytest.approx(48, rel=0.03)
    assert all(len(s.turns[0].new_tokens) == 32 for s in w.sessions)


def test_trace_lengths_blocks_and_arrivals() -> None:
    rows = _trace_rows()[100:1100]
    w = make_workload("trace", 1000, seed=0, start=100, token_scale=32, time_scale=0.5)
    block_of: dict[int, tuple[int, ...]] = {}
    for r, s in zip(rows, w.sessions, strict=True):
        assert len(s.prefix) == math.ceil(r.input_length / 32)
        assert s.turns[0].max_tokens == max(1, r.output_length // 32)
        assert s.arrival_s == pytest.approx((r.timestamp_ms - rows[0].timestamp_ms) / 2000)
        assert not s.history and len(s.turns) == 1 and s.turns[0].new_tokens == ()
        for i, h in enumerate(r.hash_ids):
            block = s.prefix[16 * i : 16 * (i + 1)]
            if len(block) == 16:  # equal ids give equal blocks
                assert block_of.setdefault(h, block) == block
    assert len(set(block_of.values())) == len(block_of)  # unequal ids give different blocks


def test_trace_rate_sets_time_scale() -> None:
    _trace_rows()
    w = make_workload("trace", 400, seed=0, rate=4.0)
    assert w.sessions[-1].arrival_s == pytest.approx(399 / 4.0)
    with pytest.raises(ValueError, match="not both"):
        make_workload("trace", 10, seed=0, rate=1.0, time_scale=2.0)


def test_trace_sharing_matches_the_readme(tmp_path: Path) -> None:
    real = tmp_path / "conversation_trace.jsonl"
    real.write_bytes(lzma.decompress(REAL_TRACE_XZ.read_bytes()))
    rows = trace_mod.load_trace(real)
    # a window: exactly the hash ids' own sharing (cold start makes it lower than the trace's)
    w = make_workload("trace", 2000, seed=0, start=3000, token_scale=32, path=real)
    chunks = [s.prefix[i : i + 16] for s in w.sessions for i in range(0, len(s.prefix), 16)]
    ids = [(h,) for r in rows[3000:5000] for h in r.hash_ids]
    assert _shared_fraction(chunks) == pytest.approx(_shared_fraction(ids), abs=1e-3)
    # the whole trace, scaled 512 -> 8 tokens a block: the README's 36.6 %
    w = make_workload("trace", len(rows), seed=0, token_scale=64, path=real)
    chunks = [s.prefix[i : i + 8] for s in w.sessions for i in range(0, len(s.prefix), 8)]
    assert _shared_fraction(chunks) == pytest.approx(0.366, abs=0.002)


def test_trace_max_model_len_cuts_to_fit() -> None:
    _trace_rows()
    w = make_workload("trace", 300, seed=0, max_model_len=256)
    assert all(len(s.prefix) + s.turns[0].max_tokens <= 256 for s in w.sessions)


def test_trace_missing_file_says_where_to_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMSERVE_TRACES", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="MEMSERVE_TRACES"):
        make_workload("trace", 10, seed=0)
    with pytest.raises(FileNotFoundError, match="nope"):
        make_workload("trace", 10, seed=0, path=tmp_path / "nope.jsonl")

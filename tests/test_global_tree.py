"""The scheduler's global prompt tree: per-instance prefix lengths, TTL, forgetting, bounded size.

A hypothesis test compares ``match`` with a brute-force reference (every instance's inserted
sequences with their expiry times) over random inserts from a small alphabet, so prompts share
and split prefixes often.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from memserve.tree.global_tree import GlobalPromptTree

BS = 4


def test_match_reports_each_instances_prefix() -> None:
    tree = GlobalPromptTree(BS, ttl_s=10)
    doc = list(range(100, 140))  # 10 blocks
    tree.insert(doc[:24], "p0", now=0)
    tree.insert(doc, "p1", now=0)
    tree.insert([*doc[:8], 1, 2, 3, 4], "d0", now=0)  # diverges after 2 blocks
    assert tree.match(doc, now=1) == {"p0": 24, "p1": 40, "d0": 8}
    assert tree.match([*doc[:13], 9, 9, 9], now=1) == {"p0": 12, "p1": 12, "d0": 8}
    assert tree.match(doc[:3], now=1) == {}  # less than a block
    assert tree.match([7, *doc], now=1) == {}
    assert tree.num_blocks == 10 + 1  # shared blocks are indexed once


def test_entries_expire_and_inserts_refresh_the_path() -> None:
    tree = GlobalPromptTree(BS, ttl_s=10)
    long, short = list(range(32)), list(range(8))
    tree.insert(long, "p0", now=0)
    tree.insert(short, "p0", now=8)  # refreshes the first two blocks only
    assert tree.match(long, now=9) == {"p0": 32}
    assert tree.match(long, now=12) == {"p0": 8}  # the tail expired at 10, the head at 18
    assert tree.match(long, now=18) == {}


def test_forget_drops_an_instance_everywhere() -> None:
    tree = GlobalPromptTree(BS, ttl_s=10)
    tree.insert(list(range(16)), "p0", now=0)
    tree.insert(list(range(12)), "p1", now=0)
    tree.forget("p0")
    assert tree.match(list(range(16)), now=1) == {"p1": 12}


def test_size_stays_bounded_and_recent_prefixes_survive() -> None:
    tree = GlobalPromptTree(BS, ttl_s=1000, max_blocks=100)
    hot = [7] * 40  # 10 blocks, used again and again
    for i in range(200):
        tree.insert([i, *range(1000, 1000 + 4 * 5 - 1)], f"p{i % 3}", now=i)  # 5 blocks each
        tree.match(hot, now=i)
        if i == 0:
            tree.insert(hot, "p9", now=i)
        assert tree.num_blocks <= 100
    assert tree.match(hot, now=200) == {"p9": 40}
    assert tree.match([199, *range(1000, 1019)], now=200) == {"p1": 20}  # the newest one
    assert tree.match([0, *range(1000, 1019)], now=200) == {}  # pruned long ago


def test_dead_entries_are_pruned_first() -> None:
    tree = GlobalPromptTree(BS, ttl_s=5, max_blocks=20)
    tree.insert(list(range(40)), "old", now=0)  # 10 blocks, expired by t=5
    tree.insert(list(range(100, 140)), "live", now=4)
    tree.match(list(range(40)), now=6)  # recently looked at, but nobody holds it any more
    tree.insert(list(range(200, 212)), "new", now=6)  # 23 blocks > 20: prune to 18
    assert tree.num_blocks <= 18
    assert tree.match(list(range(100, 140)), now=6) == {"live": 40}
    assert tree.match(list(range(200, 212)), now=6) == {"new": 12}


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[str, list[int], float]]:
    ops = []
    now = 0.0
    for _ in range(draw(st.integers(1, 25))):
        now += draw(st.sampled_from([0.0, 1.0, 3.0]))
        instance = draw(st.sampled_from(["a", "b", "c"]))
        tokens = draw(st.lists(st.integers(0, 2), min_size=0, max_size=6 * BS))
        ops.append((instance, tokens, now))
    return ops


@settings(max_examples=300, deadline=None)
@given(operations(), st.lists(st.integers(0, 2), max_size=6 * BS), st.floats(0, 4))
def test_match_equals_the_brute_force_reference(
    ops: list[tuple[str, list[int], float]], query: list[int], later: float
) -> None:
    tree = GlobalPromptTree(BS, ttl_s=5)
    for instance, tokens, now in ops:
        tree.insert(tokens, instance, now)
    now = ops[-1][2] + later
    want: dict[str, int] = {}
    for instance, tokens, t in ops:
        if t + 5 <= now:
            continue
        common = 0
        while common < min(len(tokens), len(query)) and tokens[common] == query[common]:
            common += 1
        blocks = common // BS * BS
        if blocks:
            want[instance] = max(want.get(instance, 0), blocks)
    assert tree.match(query, now) == want

"""``BlockAllocator``: exact block ids on tiny pools, reference counts, and the integrity check."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memserve.mempool.block_allocator import BlockAllocator, NoFreeBlocksError


def test_allocates_lowest_ids_first_then_reuses_oldest_freed() -> None:
    a = BlockAllocator(6)
    assert a.allocate(3) == [0, 1, 2]
    assert a.allocate(2) == [3, 4]
    a.free([1])
    a.free([0])
    # Never-used block 5 was "freed" before 1 and 0; then 1 before 0.
    assert a.allocate(2) == [5, 1]
    assert a.allocate(1) == [0]
    assert (a.num_free, a.num_used) == (0, 6)
    a.check_integrity()


def test_allocate_zero_and_all() -> None:
    a = BlockAllocator(4)
    assert a.allocate(0) == []
    assert a.allocate(4) == [0, 1, 2, 3]
    assert a.num_free == 0
    a.free([2, 0, 3, 1])
    assert a.allocate(4) == [2, 0, 3, 1]


def test_refcounts_are_one_after_allocate_and_zero_after_free() -> None:
    a = BlockAllocator(3)
    ids = a.allocate(2)
    assert [a.refcount(b) for b in range(3)] == [1, 1, 0]
    a.free(ids)
    assert [a.refcount(b) for b in range(3)] == [0, 0, 0]
    assert a.num_free == 3


def test_out_of_blocks_raises_and_changes_nothing() -> None:
    a = BlockAllocator(3)
    assert a.allocate(2) == [0, 1]
    with pytest.raises(NoFreeBlocksError, match="need 2 blocks, 1 free"):
        a.allocate(2)
    assert a.num_free == 1
    assert a.allocate(1) == [2]
    a.check_integrity()


def test_double_free_raises() -> None:
    a = BlockAllocator(2)
    [b] = a.allocate(1)
    a.free([b])
    with pytest.raises(ValueError, match=f"double free of block {b}"):
        a.free([b])
    with pytest.raises(ValueError, match="double free of block 1"):
        a.free([1])  # never allocated
    a.check_integrity()
    assert a.num_free == 2


def test_share_keeps_a_block_until_the_last_reference_is_freed() -> None:
    a = BlockAllocator(3)
    ids = a.allocate(2)
    a.share(ids)
    a.share([ids[0]])
    assert [a.refcount(b) for b in ids] == [3, 2]
    a.free(ids)
    assert [a.refcount(b) for b in ids] == [2, 1]
    assert a.num_free == 1
    a.free(ids)
    assert a.num_free == 2  # ids[1] is back
    assert a.allocate(2) == [2, ids[1]]
    a.free([ids[0]])
    assert a.refcount(ids[0]) == 0
    a.check_integrity()


def test_share_of_a_free_block_raises() -> None:
    a = BlockAllocator(2)
    with pytest.raises(ValueError, match="cannot share free block 0"):
        a.share([0])
    assert a.refcount(0) == 0


def test_pool_must_hold_a_block() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(0)


# ---- check_integrity catches corrupted state ----------------------------------------------------
# These reach into the private fields on purpose: the point is that corruption is detected.


def test_integrity_catches_a_duplicate_in_the_free_list() -> None:
    a = BlockAllocator(3)
    a._free.append(0)
    with pytest.raises(AssertionError, match="twice"):
        a.check_integrity()


def test_integrity_catches_a_used_block_that_is_also_free() -> None:
    a = BlockAllocator(3)
    [b] = a.allocate(1)
    a._free.append(b)
    with pytest.raises(AssertionError, match=f"block {b}"):
        a.check_integrity()


def test_integrity_catches_a_leaked_block() -> None:
    a = BlockAllocator(3)
    [b] = a.allocate(1)
    a._refcount[b] = 0  # neither referenced nor free: lost
    with pytest.raises(AssertionError, match=f"block {b}"):
        a.check_integrity()


def test_integrity_catches_a_negative_refcount() -> None:
    a = BlockAllocator(3)
    a._free.remove(1)
    a._refcount[1] = -1
    with pytest.raises(AssertionError, match="refcount -1"):
        a.check_integrity()


# ---- against a model of the pool -----------------------------------------------------------------

Op = tuple[str, int]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 8),
    st.lists(
        st.tuples(st.sampled_from(["allocate", "share", "free"]), st.integers(0, 7)), max_size=40
    ),
)
def test_random_operations_match_a_reference_model(num_blocks: int, ops: list[Op]) -> None:
    """Refcounts and the free order follow a plain dict + list model; errors leave no trace."""
    a = BlockAllocator(num_blocks)
    refs = [0] * num_blocks
    free_order = list(range(num_blocks))
    for op, arg in ops:
        if op == "allocate":
            n = arg % (num_blocks + 2)
            if n > len(free_order):
                with pytest.raises(NoFreeBlocksError):
                    a.allocate(n)
            else:
                got, free_order = free_order[:n], free_order[n:]
                assert a.allocate(n) == got
                for b in got:
                    refs[b] = 1
        else:
            b = arg % num_blocks
            if refs[b] == 0:
                with pytest.raises(ValueError):
                    (a.share if op == "share" else a.free)([b])
            elif op == "share":
                a.share([b])
                refs[b] += 1
            else:
                a.free([b])
                refs[b] -= 1
                if refs[b] == 0:
                    free_order.append(b)
        a.check_integrity()
        assert [a.refcount(b) for b in range(num_blocks)] == refs
        assert a.num_free == len(free_order)

"""ReorderBuffer: chunks of concurrent reads in, one plan-ordered stream out."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardstream.client._reorder import ReorderBuffer, ReorderError


def test_reads_completing_out_of_order_release_in_order() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer([2, 3, 1], window=3)
    buf.put(2, 0, 1, "c0")
    assert buf.pop() == []
    buf.put(1, 0, 3, "b0")
    assert buf.pop() == []
    assert buf.depth() == 2
    assert buf.head == 0
    buf.put(0, 0, 2, "a0")
    assert buf.pop() == ["a0", "b0", "c0"]
    assert buf.depth() == 0
    assert buf.done
    assert buf.pop() == []


def test_head_read_streams_chunk_by_chunk() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer([5, 2], window=2)
    buf.put(1, 0, 2, "b")  # complete, but waits for read 0
    buf.put(0, 0, 2, "a0")
    assert buf.pop() == ["a0"]
    assert buf.head == 0
    buf.put(0, 2, 1, "a1")
    assert buf.pop() == ["a1"]
    assert buf.pop() == []
    assert buf.head == 0
    assert buf.depth() == 1
    buf.put(0, 3, 2, "a2")
    assert buf.pop() == ["a2", "b"]
    assert buf.head == 2
    assert buf.done


def test_partial_later_read_streams_once_it_is_the_head() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer([1, 4], window=2)
    buf.put(1, 0, 1, "b0")
    buf.put(0, 0, 1, "a")
    assert buf.pop() == ["a", "b0"]
    assert buf.head == 1
    assert not buf.done
    buf.put(1, 1, 3, "b1")
    assert buf.pop() == ["b1"]
    assert buf.done


@pytest.mark.parametrize(("offset", "kind"), [(0, "duplicate"), (1, "duplicate"), (3, "gap")])
def test_duplicate_and_gap_raise(offset: int, kind: str) -> None:
    buf: ReorderBuffer[str] = ReorderBuffer([6], window=1)
    buf.put(0, 0, 2, "a")
    with pytest.raises(ReorderError, match=kind):
        buf.put(0, offset, 1, "x")
    # The rejected chunk changed nothing.
    assert buf.received(0) == 2
    assert buf.pop() == ["a"]


def test_gap_on_first_chunk_raises() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer([3, 3], window=2)
    with pytest.raises(ReorderError, match="gap"):
        buf.put(1, 1, 1, "x")
    assert buf.received(1) == 0


def test_duplicate_of_released_read_raises() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer([2, 2], window=1)
    buf.put(0, 0, 2, "a")
    assert buf.pop() == ["a"]
    with pytest.raises(ReorderError, match="duplicate"):
        buf.put(0, 0, 2, "a")
    with pytest.raises(ReorderError, match="overrun"):
        buf.put(0, 2, 1, "a")


@pytest.mark.parametrize(("offset", "n"), [(0, 4), (2, 2), (3, 1), (0, 0), (0, -1)])
def test_overrun_and_empty_chunks_raise(offset: int, n: int) -> None:
    buf: ReorderBuffer[str] = ReorderBuffer([3], window=1)
    if offset:
        buf.put(0, 0, offset, "first")
    with pytest.raises(ReorderError, match="overrun"):
        buf.put(0, offset, n, "x")
    assert buf.received(0) == offset


@pytest.mark.parametrize("seq", [-1, 3, 100])
def test_seq_outside_the_plan_raises(seq: int) -> None:
    buf: ReorderBuffer[str] = ReorderBuffer([1, 1, 1], window=10)
    with pytest.raises(ReorderError, match="not in the plan"):
        buf.put(seq, 0, 1, "x")
    assert buf.depth() == 0


def test_window_bound() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer([1, 1, 1, 1, 1], window=2)
    assert [buf.admits(s) for s in range(5)] == [True, True, False, False, False]
    with pytest.raises(ReorderError, match="past the window"):
        buf.put(2, 0, 1, "c")
    assert buf.received(2) == 0
    buf.put(1, 0, 1, "b")
    buf.put(0, 0, 1, "a")
    assert [buf.admits(s) for s in range(5)] == [True, True, False, False, False]
    assert buf.pop() == ["a", "b"]
    assert buf.head == 2
    assert [buf.admits(s) for s in range(5)] == [True, True, True, True, False]
    buf.put(3, 0, 1, "d")
    with pytest.raises(ReorderError, match="past the window"):
        buf.put(4, 0, 1, "e")


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window"):
        ReorderBuffer([1], window=0)


def test_received_is_the_resume_point() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer([10, 4], window=2)
    assert (buf.received(0), buf.received(1)) == (0, 0)
    buf.put(0, 0, 3, "a")
    buf.put(1, 0, 4, "b")
    buf.put(0, 3, 2, "a")
    assert (buf.received(0), buf.received(1)) == (5, 4)
    buf.pop()
    assert buf.received(0) == 5  # released records still count as received
    buf.put(0, buf.received(0), 5, "rest")  # a resumed read goes on from there
    assert buf.received(0) == 10
    assert buf.pop() == ["rest", "b"]


def test_depth_counts_held_items() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer([2, 3, 2], window=3)
    assert buf.depth() == 0
    buf.put(1, 0, 1, "b0")
    buf.put(1, 1, 1, "b1")
    buf.put(2, 0, 2, "c")
    assert buf.depth() == 3
    buf.put(0, 0, 1, "a0")
    assert buf.depth() == 4
    assert buf.pop() == ["a0"]
    assert buf.depth() == 3
    buf.put(0, 1, 1, "a1")
    assert buf.pop() == ["a1", "b0", "b1"]
    assert buf.depth() == 1  # b is not complete: c waits
    buf.put(1, 2, 1, "b2")
    assert buf.pop() == ["b2", "c"]
    assert buf.depth() == 0
    assert buf.done


def test_empty_plan_is_done() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer([], window=1)
    assert buf.done
    assert buf.pop() == []


@pytest.mark.parametrize(
    ("counts", "window"),
    [([0, 2], 1), ([2, 0, 0, 1], 1), ([1, 0], 1), ([0, 0, 0], 1), ([0, 3, 0, 2, 0], 2)],
)
def test_zero_count_reads_do_not_stall(counts: list[int], window: int) -> None:
    """A 0-record read has nothing to wait for: the head moves past it on pop()."""
    buf: ReorderBuffer[int] = ReorderBuffer(counts, window)
    out: list[int] = []
    for _ in range(len(counts) + 1):
        out += buf.pop()
        if buf.done:
            break
        seq = buf.head
        assert counts[seq] > 0, f"head stuck on empty read {seq}"
        assert buf.admits(seq)
        buf.put(seq, 0, counts[seq], seq)
    assert buf.done
    assert out == [s for s, n in enumerate(counts) if n > 0]


def test_zero_count_read_at_start_opens_the_window() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer([0, 0, 1, 1], window=1)
    assert buf.pop() == []
    assert buf.head == 2
    assert buf.admits(2)
    assert not buf.admits(3)
    with pytest.raises(ReorderError, match="overrun"):
        buf.put(0, 0, 1, "x")


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_completion_order_gives_plan_order(data: st.DataObject) -> None:
    counts = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=8))
    window = data.draw(st.integers(1, len(counts) + 1))
    # Each read arrives as chunks; the chunk sizes split its count.
    planned: dict[int, list[tuple[int, int]]] = {}
    for seq, n in enumerate(counts):
        cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=n - 1)) if n > 1 else [])
        bounds = [0, *cuts, n]
        planned[seq] = [(a, b - a) for a, b in itertools.pairwise(bounds)]
    expected = [(seq, off) for seq in range(len(counts)) for off, _ in planned[seq]]
    left = {seq: list(c) for seq, c in planned.items()}
    buf: ReorderBuffer[tuple[int, int]] = ReorderBuffer(counts, window)
    out: list[tuple[int, int]] = []
    while not buf.done:
        ready = [s for s in left if left[s] and buf.admits(s)]
        assert ready, "stalled"
        assert all(buf.head <= s < buf.head + window for s in ready)
        seq = data.draw(st.sampled_from(ready))
        offset, n = left[seq].pop(0)
        assert buf.received(seq) == offset
        buf.put(seq, offset, n, (seq, offset))
        out += buf.pop()
        assert buf.depth() == sum(len(planned[s]) - len(left[s]) for s in left) - len(out)
    assert out == expected
    assert buf.depth() == 0


def test_pop_with_a_limit_frees_a_read_only_when_all_its_items_are_out() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer([2, 1], window=1)
    buf.put(0, 0, 1, "a")
    buf.put(0, 1, 1, "b")
    assert buf.pop(limit=1) == ["a"]
    assert not buf.admits(1)  # read 0 still has an item inside
    assert buf.pop(limit=1) == ["b"]
    assert buf.admits(1) and buf.head == 1
    buf.put(1, 0, 1, "c")
    assert buf.pop(limit=5) == ["c"] and buf.done

"""The pure epoch planner: exactly once, equal steps, determinism, shuffling, errors."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardstream.client._planner import (
    PlanOptions,
    RankPlan,
    plan_epoch,
    rank_records,
    shard_order,
)

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- helpers -------------------------------------------------------------------------------


def bases(shard_records: Sequence[int]) -> list[int]:
    """Global id of each shard's first record (by shard index, not by epoch order)."""
    return [int(x) for x in np.cumsum([0, *shard_records])[:-1]]


def delivered(plan: RankPlan, shard_records: Sequence[int]) -> list[int]:
    """The global record ids a rank delivers, in delivery order."""
    base = bases(shard_records)
    out: list[int] = []
    for window in plan.windows:
        ids = [base[r.shard] + r.start + i for r in window.reads for i in range(r.count)]
        if window.take is not None:
            ids = [ids[int(i)] for i in window.take]
        out.extend(ids)
    return out


def cut(ids: Sequence[int], batch_size: int) -> list[list[int]]:
    return [list(ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)]


def cyclic(shard_records: Sequence[int], order: Sequence[int]) -> list[int]:
    """One pass of the epoch's global sequence (shards in `order`)."""
    base = bases(shard_records)
    return [base[s] + i for s in order for i in range(shard_records[s])]


def all_ranks(
    shard_records: Sequence[int],
    world_size: int,
    options: PlanOptions,
    *,
    epoch: int = 0,
    read_records: int = 1000,
) -> list[RankPlan]:
    return [
        plan_epoch(
            shard_records,
            epoch=epoch,
            rank=r,
            world_size=world_size,
            options=options,
            read_records=read_records,
        )
        for r in range(world_size)
    ]


@dataclass(frozen=True)
class Case:
    shards: list[int]
    world_size: int
    options: PlanOptions
    epoch: int
    read_records: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """Valid planner inputs: empty shards mixed with non-empty ones, any policy."""
    shards = draw(
        st.lists(st.one_of(st.just(0), st.integers(1, 60)), min_size=1, max_size=12).filter(
            lambda s: sum(s) > 0
        )
    )
    total = sum(shards)
    remainder = draw(st.sampled_from(["drop", "pad"]))
    world_size = draw(st.integers(1, min(8, total) if remainder == "drop" else 8))
    part = total // world_size if remainder == "drop" else -(-total // world_size)
    drop_last = draw(st.booleans())
    batch_size = draw(st.integers(1, min(50, part) if drop_last else 50))
    shuffle = draw(st.booleans())
    shuffle_window = draw(st.one_of(st.just(0), st.integers(2, 100))) if shuffle else 0
    options = PlanOptions(
        batch_size=batch_size,
        seed=draw(st.integers(0, 2**32)),
        shuffle=shuffle,
        shuffle_window=shuffle_window,
        remainder=remainder,
        drop_last=drop_last,
    )
    return Case(
        shards, world_size, options, draw(st.integers(0, 50)), draw(st.sampled_from([1, 7, 1000]))
    )


def plans_of(case: Case) -> list[RankPlan]:
    return all_ranks(
        case.shards,
        case.world_size,
        case.options,
        epoch=case.epoch,
        read_records=case.read_records,
    )


# -- exactly once ----------------------------------------------------------------------------


@FAST
@given(cases())
def test_exactly_once_across_ranks(case: Case) -> None:
    plans = plans_of(case)
    total = sum(case.shards)
    ws = case.world_size
    part, used = rank_records(total, ws, case.options)
    per_rank = [delivered(p, case.shards) for p in plans]
    for p, ids in zip(plans, per_rank, strict=True):
        assert p.records == used
        assert len(ids) == used
        assert all(0 <= i < total for i in ids)
    union = [i for ids in per_rank for i in ids]

    # The multiset is exactly the ranks' slices of the cyclic global sequence.
    order = shard_order(len(case.shards), epoch=case.epoch, options=case.options)
    seq = cyclic(case.shards, order)
    expected = [seq[(r * part + i) % total] for r in range(ws) for i in range(used)]
    assert Counter(union) == Counter(expected)

    if case.options.remainder == "drop":
        assert len(set(union)) == len(union) == ws * used
        if not case.options.drop_last and total % ws == 0:
            assert sorted(union) == list(range(total))
    else:
        assert part == -(-total // ws)
        if not case.options.drop_last:
            assert set(union) == set(range(total))
            # Duplicates only from wrapping: the first ws*part of the cyclic sequence.
            assert Counter(union) == Counter(seq[i % total] for i in range(ws * part))
            if ws * part <= total:
                assert len(set(union)) == len(union)


@pytest.mark.parametrize(
    ("shards", "ws", "remainder", "expected"),
    [
        # N = 12, 3 ranks: everything, once.
        ([3, 0, 4, 0, 5], 3, "drop", [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]),
        # N = 11, drop: the last 2 records are dropped.
        ([0, 4, 7], 3, "drop", [[0, 1, 2], [3, 4, 5], [6, 7, 8]]),
        # N = 11, pad: ceil(11/3) = 4 each, wrapping to the start.
        ([0, 4, 7], 3, "pad", [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 0]]),
        # N = 2, pad over 5 ranks: wraps more than once.
        ([0, 2, 0], 5, "pad", [[0], [1], [0], [1], [0]]),
    ],
)
def test_explicit_splits(
    shards: list[int], ws: int, remainder: str, expected: list[list[int]]
) -> None:
    options = PlanOptions(batch_size=2, remainder=remainder)  # type: ignore[arg-type]
    for read_records in (1, 3, 1000):
        plans = all_ranks(shards, ws, options, read_records=read_records)
        assert [delivered(p, shards) for p in plans] == expected


# -- equal steps -----------------------------------------------------------------------------


@FAST
@given(cases())
def test_equal_steps(case: Case) -> None:
    plans = plans_of(case)
    bs = case.options.batch_size
    cuts = [cut(delivered(p, case.shards), bs) for p in plans]
    n_batches = {p.batches for p in plans}
    assert len(n_batches) == 1
    (n,) = n_batches
    assert n >= 1
    last_sizes = set()
    for p, batches in zip(plans, cuts, strict=True):
        assert len(batches) == p.batches == n
        assert all(len(b) == bs for b in batches[:-1])
        assert 1 <= len(batches[-1]) <= bs
        assert p.last_batch_size == len(batches[-1])
        last_sizes.add(len(batches[-1]))
        if case.options.drop_last:
            assert len(batches[-1]) == bs
    assert len(last_sizes) == 1


@pytest.mark.parametrize(
    ("drop_last", "batches", "last"),
    [(False, 3, 1), (True, 2, 4)],
)
def test_explicit_batches(drop_last: bool, batches: int, last: int) -> None:
    # N = 27 over 3 ranks: 9 each; batch 4 -> 4, 4, 1 (or 4, 4 with drop_last).
    options = PlanOptions(batch_size=4, drop_last=drop_last)
    for p in all_ranks([10, 0, 17], 3, options):
        assert p.batches == batches
        assert p.last_batch_size == last
        assert p.records == (batches - 1) * 4 + last


# -- determinism and reads -------------------------------------------------------------------


@FAST
@given(cases())
def test_deterministic_and_independent_of_read_size(case: Case) -> None:
    reference = None
    for read_records in (1, 7, 1000):
        for _ in range(2):
            plans = all_ranks(
                case.shards,
                case.world_size,
                case.options,
                epoch=case.epoch,
                read_records=read_records,
            )
            got = [delivered(p, case.shards) for p in plans]
            if reference is None:
                reference = got
            assert got == reference
            for p in plans:
                reads = p.reads
                assert [r.seq for r in reads] == list(range(len(reads)))
                for r in reads:
                    assert 1 <= r.count <= read_records
                    assert r.start >= 0
                    assert r.start + r.count <= case.shards[r.shard]
                for w in p.windows:
                    assert w.records == sum(r.count for r in w.reads)
                    if w.take is not None:
                        assert sorted(w.take.tolist()) == list(range(w.records))
                assert sum(w.records for w in p.windows) == p.records


def test_reads_split_at_shard_ends_and_read_records() -> None:
    options = PlanOptions(batch_size=3)
    (plan,) = all_ranks([5, 0, 4], 1, options, read_records=3)
    assert [(r.seq, r.shard, r.start, r.count) for r in plan.reads] == [
        (0, 0, 0, 3),
        (1, 0, 3, 2),
        (2, 2, 0, 1),  # the limit counts from the rank's first record
        (3, 2, 1, 3),
    ]


# -- shuffling -------------------------------------------------------------------------------


def test_shuffle_changes_with_epoch_and_reproduces() -> None:
    shards = [5] * 20
    options = PlanOptions(batch_size=4, seed=7, shuffle=True)
    orders = [shard_order(20, epoch=e, options=options) for e in range(5)]
    for o in orders:
        assert sorted(o) == list(range(20))
    assert len({tuple(o) for o in orders}) == 5
    assert orders[0] != list(range(20))
    seqs = [
        [delivered(p, shards) for p in all_ranks(shards, 2, options, epoch=e)] for e in range(5)
    ]
    assert len({str(s) for s in seqs}) == 5
    # Same seed and epoch: identical; another seed: different.
    assert shard_order(20, epoch=3, options=options) == orders[3]
    assert [delivered(p, shards) for p in all_ranks(shards, 2, options, epoch=3)] == seqs[3]
    other = PlanOptions(batch_size=4, seed=8, shuffle=True)
    assert shard_order(20, epoch=3, options=other) != orders[3]


def test_shuffle_window_changes_with_epoch() -> None:
    options = PlanOptions(batch_size=4, seed=1, shuffle=True, shuffle_window=16)
    a = [delivered(p, [64]) for p in all_ranks([64], 2, options, epoch=0)]
    b = [delivered(p, [64]) for p in all_ranks([64], 2, options, epoch=1)]
    assert a != b
    assert a == [delivered(p, [64]) for p in all_ranks([64], 2, options, epoch=0)]


@FAST
@given(cases())
def test_no_shuffle_is_identity(case: Case) -> None:
    options = PlanOptions(
        batch_size=case.options.batch_size,
        seed=case.options.seed,
        remainder=case.options.remainder,
        drop_last=case.options.drop_last,
    )
    total = sum(case.shards)
    part, used = rank_records(total, case.world_size, options)
    assert shard_order(len(case.shards), epoch=case.epoch, options=options) == list(
        range(len(case.shards))
    )
    plans = all_ranks(case.shards, case.world_size, options, epoch=case.epoch)
    for r, p in enumerate(plans):
        assert all(w.take is None for w in p.windows)
        assert delivered(p, case.shards) == [i % total for i in range(r * part, r * part + used)]


@FAST
@given(cases(), st.integers(2, 100))
def test_shuffle_window_permutes_only_within_windows(case: Case, window: int) -> None:
    base = dict(
        batch_size=case.options.batch_size,
        seed=case.options.seed,
        shuffle=True,
        remainder=case.options.remainder,
        drop_last=case.options.drop_last,
    )
    plain = PlanOptions(**base, shuffle_window=0)  # type: ignore[arg-type]
    windowed = PlanOptions(**base, shuffle_window=window)  # type: ignore[arg-type]
    for r in range(case.world_size):
        kw = dict(epoch=case.epoch, rank=r, world_size=case.world_size, read_records=7)
        p0 = plan_epoch(case.shards, options=plain, **kw)  # type: ignore[arg-type]
        pw = plan_epoch(case.shards, options=windowed, **kw)  # type: ignore[arg-type]
        a = delivered(p0, case.shards)
        b = delivered(pw, case.shards)
        assert len(a) == len(b)
        assert [w.records for w in pw.windows] == [len(c) for c in cut(a, window)]
        for ca, cb in zip(cut(a, window), cut(b, window), strict=True):
            assert sorted(ca) == sorted(cb)


def test_shuffle_window_actually_shuffles() -> None:
    options = PlanOptions(batch_size=8, seed=3, shuffle=True, shuffle_window=32)
    plain = PlanOptions(batch_size=8, seed=3, shuffle=True)
    (pw,) = all_ranks([100], 1, options)
    (p0,) = all_ranks([100], 1, plain)
    a, b = delivered(p0, [100]), delivered(pw, [100])
    assert a == list(range(100))
    assert b != a
    assert [len(w.reads) > 0 for w in pw.windows] == [True] * 4
    assert [w.records for w in pw.windows] == [32, 32, 32, 4]
    for lo in range(0, 100, 32):
        assert sorted(b[lo : lo + 32]) == a[lo : lo + 32]


# -- errors ----------------------------------------------------------------------------------


def _plan(
    shards: Sequence[int] = (10, 10),
    *,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 2,
    read_records: int = 4,
    **options: object,
) -> RankPlan:
    opts = {"batch_size": 2, **options}
    return plan_epoch(
        shards,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        options=PlanOptions(**opts),  # type: ignore[arg-type]
        read_records=read_records,
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"world_size": 0}, "world_size"),
        ({"world_size": -1}, "world_size"),
        ({"rank": 2}, "rank"),
        ({"rank": -1}, "rank"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -3}, "batch_size"),
        ({"epoch": -1}, "epoch"),
        ({"read_records": 0}, "read_records"),
        ({"shards": []}, "shard_records"),
        ({"shards": [3, -1]}, "shard_records"),
        ({"shards": [0, 0, 0]}, "no records"),
        ({"shards": [1, 0, 1], "world_size": 3, "rank": 0}, "world_size=3"),
        ({"shards": [3, 2], "world_size": 2, "batch_size": 4, "drop_last": True}, "batch_size=4"),
        ({"shuffle_window": 8}, "shuffle_window"),
        ({"remainder": "wrap"}, "remainder"),
        ({"seed": -1}, "seed"),
        ({"shuffle": True, "shuffle_window": -2}, "shuffle_window"),
    ],
)
def test_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _plan(**kwargs)  # type: ignore[arg-type]


def test_boundary_inputs_are_accepted() -> None:
    # N == world_size with drop, part == batch_size with drop_last: one batch of one each.
    p = _plan([1, 0, 2], world_size=3, rank=2, batch_size=1, drop_last=True)
    assert (p.records, p.batches) == (1, 1)
    assert delivered(p, [1, 0, 2]) == [2]
    # pad with fewer records than ranks is fine.
    p = _plan([0, 1], world_size=4, rank=3, remainder="pad")
    assert delivered(p, [0, 1]) == [0]

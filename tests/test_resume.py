"""Resuming an epoch: same world size (identical to uninterrupted), other world sizes
(exactly once across the interruption, equal steps), and state checks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from shardstream.client._planner import PlanOptions, RankPlan, plan_epoch
from shardstream.client._resume import Interruption, resume_plan


def delivered_ids(plan: RankPlan, counts: Sequence[int]) -> list[int]:
    offsets = np.cumsum([0, *counts])
    out: list[int] = []
    for w in plan.windows:
        ids = np.concatenate(
            [np.arange(r.count) + offsets[r.shard] + r.start for r in w.reads]
            or [np.array([], int)]
        )
        out += (ids if w.take is None else ids[w.take]).tolist()
    return out


def batches(plan: RankPlan, counts: Sequence[int]) -> list[list[int]]:
    """Batches as lists of ids, cut by slots (trailing holes make the last one short)."""
    ids = delivered_ids(plan, counts)
    b = plan.batch_size
    return [ids[i : i + b] for i in range(0, plan.batches * b, b)]


configs = st.fixed_dictionaries(
    {
        "counts": st.lists(st.integers(0, 60), min_size=1, max_size=8).filter(
            lambda c: sum(c) >= 12
        ),
        "batch_size": st.integers(1, 9),
        "seed": st.integers(0, 5),
        "epoch": st.integers(0, 3),
        "shuffle": st.booleans(),
        "window": st.sampled_from([0, 5, 16]),
        "remainder": st.sampled_from(["drop", "pad"]),
        "drop_last": st.booleans(),
        "read_records": st.sampled_from([1, 4, 1000]),
    }
)


def options(c: dict) -> PlanOptions:
    return PlanOptions(
        batch_size=c["batch_size"],
        seed=c["seed"],
        shuffle=c["shuffle"],
        shuffle_window=c["window"] if c["shuffle"] else 0,
        remainder=c["remainder"],
        drop_last=c["drop_last"],
    )


def plans(
    c: dict, world: int, history: Sequence[Interruption] = (), dropped: bool = False
) -> list[RankPlan]:
    return [
        resume_plan(
            c["counts"],
            epoch=c["epoch"],
            rank=r,
            world_size=world,
            options=options(c),
            read_records=c["read_records"],
            history=history,
            dropped=dropped,
        )
        for r in range(world)
    ]


def dropped_ids(c: dict, world: int, history: Sequence[Interruption]) -> list[int]:
    """What a resumed run leaves out: with drop_last, the records past every rank's whole
    batches; nothing otherwise."""
    out = [i for p in plans(c, world, history, dropped=True) for i in delivered_ids(p, c["counts"])]
    assert c["drop_last"] or not out
    return out


@settings(max_examples=150, deadline=None)
@given(c=configs, world=st.integers(1, 4), frac=st.floats(0, 1))
def test_same_world_size_resume_is_the_rest_of_the_epoch(c: dict, world: int, frac: float) -> None:
    try:
        full = plans(c, world)
    except ValueError:
        return  # impossible options (e.g. fewer records than ranks): refused elsewhere
    k = int(frac * full[0].batches)
    resumed = plans(c, world, [Interruption(world, k)])
    for f, r in zip(full, resumed, strict=True):
        assert batches(r, c["counts"]) == batches(f, c["counts"])[k:]
        assert r.batches == f.batches - k


@settings(max_examples=150, deadline=None)
@given(c=configs, old=st.integers(1, 5), new=st.integers(1, 5), frac=st.floats(0, 1))
def test_elastic_resume_is_exactly_once_with_equal_steps(
    c: dict, old: int, new: int, frac: float
) -> None:
    try:
        full = plans(c, old)
    except ValueError:
        return
    k = int(frac * full[0].batches)
    before = [i for f in full for batch in batches(f, c["counts"])[:k] for i in batch]
    after_plans = plans(c, new, [Interruption(old, k)])
    after = [i for p in after_plans for i in delivered_ids(p, c["counts"])]
    left_out = dropped_ids(c, new, [Interruption(old, k)])
    everything = [i for f in full for i in delivered_ids(f, c["counts"])]
    # exactly once across the interruption (drop_last: but for what it leaves out)
    assert sorted(before + after + left_out) == sorted(everything)
    assert len({p.batches for p in after_plans}) == 1  # equal steps
    sizes = [p.records for p in after_plans]
    assert max(sizes) - min(sizes) <= 1
    if c["drop_last"]:  # one shape per step: whole batches only, on every rank
        assert len(set(sizes)) == 1 and sizes[0] % c["batch_size"] == 0
        assert all(len(b) == c["batch_size"] for p in after_plans for b in batches(p, c["counts"]))
        assert len(left_out) < new * c["batch_size"] + new  # no more than it must


@settings(max_examples=80, deadline=None)
@given(
    c=configs,
    sizes=st.lists(st.integers(1, 5), min_size=3, max_size=3),
    fracs=st.lists(st.floats(0, 1), min_size=2, max_size=2),
)
def test_chained_elastic_resumes(c: dict, sizes: list[int], fracs: list[float]) -> None:
    w0, w1, w2 = sizes
    try:
        first = plans(c, w0)
    except ValueError:
        return
    k0 = int(fracs[0] * first[0].batches)
    got = [i for p in first for b in batches(p, c["counts"])[:k0] for i in b]
    second = plans(c, w1, [Interruption(w0, k0)])
    k1 = int(fracs[1] * second[0].batches)
    got += [i for p in second for b in batches(p, c["counts"])[:k1] for i in b]
    third = plans(c, w2, [Interruption(w0, k0), Interruption(w1, k1)])
    got += [i for p in third for i in delivered_ids(p, c["counts"])]
    got += dropped_ids(c, w2, [Interruption(w0, k0), Interruption(w1, k1)])
    everything = [i for f in first for i in delivered_ids(f, c["counts"])]
    assert sorted(got) == sorted(everything)


def test_short_part_ends_with_a_hole() -> None:
    opts = PlanOptions(batch_size=4)
    # 2 ranks x 10 records, 1 batch each consumed: 12 remain for 5 ranks -> 3,3,2,2,2 (+ holes).
    parts = [
        resume_plan(
            [20],
            epoch=0,
            rank=r,
            world_size=5,
            options=opts,
            read_records=8,
            history=[Interruption(2, 1)],
        )
        for r in range(5)
    ]
    assert [p.records for p in parts] == [3, 3, 2, 2, 2]
    assert [p.trailing_holes for p in parts] == [0, 0, 1, 1, 1]
    assert {p.batches for p in parts} == {1}
    assert (
        plan_epoch([20], epoch=0, rank=0, world_size=2, options=opts, read_records=8).batches == 3
    )

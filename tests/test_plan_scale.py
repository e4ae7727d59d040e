"""Plans cost what this rank reads: a description claiming 10**15 records, or a state of
10**7 ranks, plans at once; and the on-demand plans are the ones the eager planner made."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardstream.client._planner import PlanOptions, RankPlan, Read, plan_epoch, rank_records
from shardstream.client._resume import Interruption, resume_plan
from shardstream.client.errors import StateMismatchError

# -- the eager planner and resume as they were: the reference ---------------------------------

Reads = tuple[tuple[int, int, int], ...]  # (shard, start, count)
Win = tuple[Reads, Any]  # reads, take (None or an array)


def _rng(seed: int, epoch: int, purpose: int, key: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, purpose, key])))


def _order(n: int, epoch: int, o: PlanOptions) -> list[int]:
    return [int(i) for i in _rng(o.seed, epoch, 0).permutation(n)] if o.shuffle else list(range(n))


def _runs(counts: Sequence[int], order: Sequence[int], position: int, length: int, limit: int):
    total = sum(counts)
    offsets = np.cumsum([0] + [counts[s] for s in order])
    done = 0
    while done < length:
        p = (position + done) % total
        k = int(np.searchsorted(offsets, p, side="right")) - 1
        shard = order[k]
        start = p - int(offsets[k])
        count = min(counts[shard] - start, length - done, limit - done % limit)
        yield shard, start, count
        done += count


def ref_plan(counts, *, epoch, rank, world_size, options, read_records) -> list[Win]:
    total = sum(counts)
    part, used = rank_records(total, world_size, options)
    order = _order(len(counts), epoch, options)
    first = rank * part
    shuffled = options.shuffle and options.shuffle_window > 1
    window = options.shuffle_window if shuffled else used
    out: list[Win] = []
    for w_start in range(0, used, window):
        w_len = min(window, used - w_start)
        reads = tuple(_runs(counts, order, first + w_start, w_len, read_records))
        take = None
        if shuffled:
            take = _rng(options.seed, epoch, 1, first + w_start).permutation(w_len).astype(np.intp)
        out.append((reads, take))
    return out


def _delivered(w: Win) -> int:
    return sum(r[2] for r in w[0]) if w[1] is None else len(w[1])


def _slice(windows: Sequence[Win], a: int, b: int) -> list[Win]:
    out: list[Win] = []
    pos = 0
    for reads, take in windows:
        n = _delivered((reads, take))
        lo, hi = max(a, pos), min(b, pos + n)
        if lo < hi:
            if take is None:
                cut, p = [], 0
                for s, st_, c in reads:
                    x, y = max(lo - pos, p), min(hi - pos, p + c)
                    if x < y:
                        cut.append((s, st_ + x - p, y - x))
                    p += c
                out.append((tuple(cut), None))
            else:
                out.append((reads, take[lo - pos : hi - pos]))
        pos += n
    return out


def ref_resume(counts, *, epoch, rank, world_size, options, read_records, history):
    """(windows, records, batches, trailing_holes) as the eager resume made them."""
    b = options.batch_size
    ranks = [
        ref_plan(counts, epoch=epoch, rank=r, world_size=history[0].world_size,
                 options=options, read_records=read_records)
        for r in range(history[0].world_size)
    ]  # fmt: skip
    slots = [sum(_delivered(w) for w in ws) for ws in ranks]
    for step, cut in enumerate(history):
        new = history[step + 1].world_size if step + 1 < len(history) else world_size
        remains: list[Win] = []
        for ws, n in zip(ranks, slots, strict=True):
            done = min(cut.batches * b, n)
            total = sum(_delivered(w) for w in ws)
            remains += _slice(ws, min(done, total), total)
        total = sum(_delivered(w) for w in remains)
        q, extra = divmod(total, new)
        ranks, pos = [], 0
        for r in range(new):
            size = q + (1 if r < extra else 0)
            ranks.append(_slice(remains, pos, pos + size))
            pos += size
        slots = [q + (1 if extra else 0)] * new
    if options.drop_last:  # the last split: the shortest part's whole batches on every rank
        keep = q // b * b
        ranks[rank], slots = _slice(ranks[rank], 0, keep), [keep] * world_size
    records = sum(_delivered(w) for w in ranks[rank])
    return ranks[rank], records, -(-slots[rank] // b), slots[rank] - records


def as_windows(plan: RankPlan) -> list[Win]:
    out: list[Win] = []
    seq = 0
    for w in plan.windows:
        reads = []
        for r in w.reads:
            assert r.seq == seq
            seq += 1
            reads.append((r.shard, r.start, r.count))
        out.append((tuple(reads), w.take))
    return out


def same(got: Sequence[Win], want: Sequence[Win]) -> None:
    assert [w[0] for w in got] == [w[0] for w in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def check_access(plan: RankPlan) -> None:
    """Indexing and counting agree with iterating."""
    listed = list(plan.windows)
    assert len(plan.windows) == len(listed)
    for i in sorted({0, len(listed) // 2, len(listed) - 1}):
        if 0 <= i < len(listed):
            w = plan.windows[i]
            assert list(w.reads) == list(listed[i].reads)
            assert w.records == sum(r.count for r in w.reads)
            for j in sorted({0, len(w.reads) - 1}):
                assert w.reads[j] == listed[i].reads[j] == list(w.reads)[j]
    assert plan.read_count == len(plan.reads)


# -- identical to the eager planner ----------------------------------------------------------

configs = st.fixed_dictionaries(
    {
        "counts": st.lists(st.one_of(st.just(0), st.integers(1, 40)), min_size=1, max_size=7),
        "batch_size": st.integers(1, 7),
        "seed": st.integers(0, 3),
        "epoch": st.integers(0, 2),
        "shuffle": st.booleans(),
        "window": st.sampled_from([0, 2, 5, 16]),
        "remainder": st.sampled_from(["drop", "pad"]),
        "drop_last": st.booleans(),
        "read_records": st.sampled_from([1, 3, 4, 1000]),
    }
).filter(lambda c: sum(c["counts"]) >= 1)


def options_of(c: dict[str, Any]) -> PlanOptions:
    return PlanOptions(
        batch_size=c["batch_size"],
        seed=c["seed"],
        shuffle=c["shuffle"],
        shuffle_window=c["window"] if c["shuffle"] else 0,
        remainder=c["remainder"],
        drop_last=c["drop_last"],
    )


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(c=configs, world=st.integers(1, 5))
def test_plans_are_the_eager_planners(c: dict[str, Any], world: int) -> None:
    kw = dict(epoch=c["epoch"], world_size=world, options=options_of(c),
              read_records=c["read_records"])  # fmt: skip
    try:
        want = [ref_plan(c["counts"], rank=r, **kw) for r in range(world)]  # type: ignore[arg-type]
    except ValueError:
        return
    for r in range(world):
        plan = plan_epoch(c["counts"], rank=r, **kw)  # type: ignore[arg-type]
        same(as_windows(plan), want[r])
        check_access(plan)


@SETTINGS
@given(
    c=configs,
    sizes=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    fracs=st.lists(st.sampled_from([0.0, 0.3, 0.5, 0.99, 1.0]), min_size=3, max_size=3),
)
def test_resumes_are_the_eager_resumes(
    c: dict[str, Any], sizes: list[int], fracs: list[float]
) -> None:
    kw = dict(epoch=c["epoch"], options=options_of(c), read_records=c["read_records"])
    history: list[Interruption] = []
    try:
        for world, frac in zip(sizes[:-1], fracs, strict=False):
            n = resume_plan(c["counts"], rank=0, world_size=world, history=history, **kw).batches
            history.append(Interruption(world, int(frac * n)))
    except ValueError:
        return  # impossible options (e.g. fewer records than ranks): refused elsewhere
    world = sizes[-1]
    for r in range(world):
        plan = resume_plan(c["counts"], rank=r, world_size=world, history=history, **kw)
        windows, records, n_batches, holes = ref_resume(
            c["counts"], rank=r, world_size=world, history=history, **kw
        )
        same(as_windows(plan), windows)
        assert (plan.records, plan.batches, plan.trailing_holes) == (records, n_batches, holes)
        check_access(plan)


# -- what a plan costs -----------------------------------------------------------------------

PB = [250_000_000_000_000] * 4  # 10**15 records in 4 shards
READ = 8 << 20  # records per read of a 1-byte record with the default read_bytes (8 MiB)


def measured(make: Callable[[], RankPlan]) -> tuple[RankPlan, float, float]:
    """(the plan, seconds, peak MiB allocated) of making it and looking at its ends."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        plan = make()
        windows = plan.windows
        for w in (windows[0], windows[-1]):
            assert len(w.reads) and w.reads[0].count and w.reads[-1].count
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    return plan, seconds, peak


def test_a_description_of_1e15_records_plans_at_once() -> None:
    """Was: 14.9 million reads made up front, 78 s and 2.6 GB for rank 0 of 8."""
    options = PlanOptions(batch_size=64)
    plan, seconds, peak = measured(
        lambda: plan_epoch(PB, epoch=0, rank=0, world_size=8, options=options, read_records=READ)
    )
    assert peak < 2 and seconds < 5, (peak, seconds)
    part = 10**15 // 8
    assert (plan.records, plan.batches, plan.last_batch_size) == (
        part,
        -(-part // 64),
        (part - 1) % 64 + 1,
    )
    (window,) = plan.windows
    assert window.take is None and window.records == part
    assert len(window.reads) == -(-part // READ)  # rank 0's part lies in shard 0
    assert window.reads[0] == Read(0, 0, 0, READ)
    n = len(window.reads)
    assert window.reads[-1] == Read(n - 1, 0, (n - 1) * READ, part - (n - 1) * READ)
    assert window.reads[n // 2] == Read(n // 2, 0, n // 2 * READ, READ)


def test_a_shuffled_description_of_1e15_records_plans_at_once() -> None:
    options = PlanOptions(batch_size=64, seed=3, shuffle=True, shuffle_window=3000)
    plan, seconds, peak = measured(
        lambda: plan_epoch(PB, epoch=2, rank=5, world_size=8, options=options, read_records=1000)
    )
    assert peak < 2 and seconds < 5, (peak, seconds)
    part = 10**15 // 8
    assert len(plan.windows) == -(-part // 3000) and plan.records == part
    last = plan.windows[-1]
    assert last.take is not None and sorted(last.take.tolist()) == list(range(part % 3000))
    # Rank 5's part ends where a shard does: 3 reads a window, 2 in the last (2000 records).
    assert plan.read_count == len(plan.windows) * 3 - 1


def test_resuming_an_epoch_of_1e15_records_plans_at_once() -> None:
    options = PlanOptions(batch_size=64, seed=3, shuffle=True)
    history = [Interruption(8, 10**9), Interruption(5, 12345), Interruption(1000, 7)]

    def make() -> RankPlan:
        return resume_plan(PB, epoch=0, rank=2, world_size=3, options=options,
                           read_records=READ, history=history)  # fmt: skip

    plan, seconds, peak = measured(make)
    assert peak < 2 and seconds < 5, (peak, seconds)
    left = 10**15 - 8 * 10**9 * 64 - 5 * 12345 * 64 - 1000 * 7 * 64
    assert plan.records == left // 3 and plan.trailing_holes == (1 if left % 3 else 0)


def test_resuming_a_state_of_ten_million_ranks_plans_at_once() -> None:
    """A `pad` epoch of 2000 records over 10**7 ranks: one record each. Was: a plan for every
    one of the 10**7 old ranks, and every new part cut from all of them (hours)."""
    options = PlanOptions(batch_size=1, remainder="pad")
    ws = 10**7
    kw = dict(epoch=0, options=options, read_records=64)

    def plan(rank: int, world_size: int, history: list[Interruption]) -> RankPlan:
        return resume_plan(
            [1500, 500],
            rank=rank,
            world_size=world_size,
            history=history,
            **kw,  # type: ignore[arg-type]
        )

    def ids(p: RankPlan) -> list[int]:
        return [[0, 1500][r.shard] + r.start + i for w in p.windows for r in w.reads
                for i in range(r.count)]  # fmt: skip

    t0 = time.perf_counter()
    # Nothing consumed, then one rank fewer: rank 0 takes two old ranks' records, the
    # others one each and a hole.
    first, last = (
        plan(0, ws - 1, [Interruption(ws, 0)]),
        plan(ws - 2, ws - 1, [Interruption(ws, 0)]),
    )
    assert (first.records, first.trailing_holes, ids(first)) == (2, 0, [0, 1])
    assert (last.records, last.trailing_holes, ids(last)) == (1, 1, [(ws - 1) % 2000])
    assert len(first.windows) == 2  # one window per old rank, as before
    # Every rank consumed its batch: nothing is left, for any world size.
    for world in (ws, 3):
        p = plan(world - 1, world, [Interruption(ws, 1)])
        assert (p.records, p.batches, len(p.windows)) == (0, 0, 0)
    assert time.perf_counter() - t0 < 5


# -- a state past the epoch's end ------------------------------------------------------------


@pytest.mark.parametrize(
    ("history", "match"),
    [
        ([Interruption(2, 6)], "says 6 batches of epoch 1 were consumed with world_size=2, "
                               "but the epoch has 5"),
        ([Interruption(2, 5)], None),  # all of it: an empty rest, which is right
        ([Interruption(2, 1), Interruption(3, 4)], "says 4 batches .* after 1 interruption"),
        ([Interruption(2, 1), Interruption(3, 3)], None),
        ([Interruption(0, 1)], "impossible interruption"),
        ([Interruption(2, -1)], "impossible interruption"),
    ],
)  # fmt: skip
def test_a_state_past_the_end_of_the_epoch_is_refused(
    history: list[Interruption], match: str | None
) -> None:
    # 20 records, 2 ranks: 10 each, batches of 2: 5 batches.
    def plan() -> RankPlan:
        return resume_plan([20], epoch=1, rank=0, world_size=2, options=PlanOptions(batch_size=2),
                           read_records=4, history=history)  # fmt: skip

    if match is None:
        assert plan().batches >= 0
    else:
        with pytest.raises(StateMismatchError, match=match):
            plan()

"""Record-level shuffle (`shuffle_reads`): blocks of one read permuted over all shards, records
shuffled in groups of K reads. The planner's guarantees in this mode (exactly once, equal
steps, determinism, resume with any world size), its laziness, old states, and the whole
path through a worker and a `Loader`."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardstream.client import Loader
from shardstream.client._blocks import BlockLayout, Feistel
from shardstream.client._planner import PlanOptions, RankPlan, Read, plan_epoch, rank_records
from shardstream.client._resume import Interruption, resume_plan
from shardstream.client._state import LoaderState
from shardstream.client.errors import ConfigError, StateMismatchError

from conftest import RECORDS, SHARDS, collect_epoch, ids_of, running_workers

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def delivered(plan: RankPlan, counts: Sequence[int]) -> list[int]:
    """Global record ids (shard by shard) a plan delivers, in delivery order."""
    base = np.cumsum([0, *counts])
    out: list[int] = []
    for w in plan.windows:
        ids = [int(base[r.shard]) + r.start + i for r in w.reads for i in range(r.count)]
        out += ids if w.take is None else [ids[int(i)] for i in w.take]
    return out


def batches(plan: RankPlan, counts: Sequence[int]) -> list[list[int]]:
    ids = delivered(plan, counts)
    b = plan.batch_size
    return [ids[i : i + b] for i in range(0, plan.batches * b, b)]


def global_sequence(counts: Sequence[int], options: PlanOptions, epoch: int, size: int) -> list:
    """One pass of the epoch, made eagerly: every block, in the permutation's order."""
    base = np.cumsum([0, *counts])
    blocks = [(s, a) for s, c in enumerate(counts) for a in range(0, c, size)]
    order = Feistel(len(blocks), (options.seed, epoch, 2)).forward(np.arange(len(blocks)))
    out: list[int] = []
    for b in order.tolist():
        s, a = blocks[b]
        out += range(int(base[s]) + a, int(base[s]) + min(a + size, counts[s]))
    return out


configs = st.fixed_dictionaries(
    {
        "counts": st.lists(st.one_of(st.just(0), st.integers(1, 50)), min_size=1, max_size=8),
        "batch_size": st.integers(1, 9),
        "seed": st.integers(0, 2**64 - 1),
        "epoch": st.integers(0, 5),
        "reads": st.integers(1, 5),
        "remainder": st.sampled_from(["drop", "pad"]),
        "drop_last": st.booleans(),
        "read_records": st.sampled_from([1, 3, 4, 7, 1000]),
    }
).filter(lambda c: sum(c["counts"]) >= 1)


def options(c: dict[str, Any]) -> PlanOptions:
    return PlanOptions(
        batch_size=c["batch_size"],
        seed=c["seed"],
        shuffle=True,
        shuffle_reads=c["reads"],
        remainder=c["remainder"],
        drop_last=c["drop_last"],
    )


def plans(
    c: dict[str, Any], world: int, history: Sequence[Interruption] = (), dropped: bool = False
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


# -- the permutation and the layout ---------------------------------------------------------


@given(n=st.integers(1, 3000), key=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=3))
@settings(max_examples=60, deadline=None)
def test_feistel_is_a_bijection_and_inverts(n: int, key: list[int]) -> None:
    f = Feistel(n, key)
    out = f.forward(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    assert f.inverse(out).tolist() == list(range(n))


@FAST
@given(
    counts=st.lists(st.one_of(st.just(0), st.integers(1, 40)), min_size=1, max_size=8).filter(sum),
    size=st.integers(1, 12),
    key=st.integers(0, 99),
)
def test_layout_positions_and_blocks_agree(counts: list[int], size: int, key: int) -> None:
    layout = BlockLayout(counts, size, (key,))
    position = 0
    seen: set[tuple[int, int]] = set()
    for k in range(layout.n):
        shard, start, n = layout.block(k)
        assert layout.offset(k) == position and 1 <= n <= size
        assert start % size == 0 and start + n <= counts[shard]
        assert layout.index(position) == layout.index(position + n - 1) == k
        seen.update((shard, start + i) for i in range(n))
        position += n
    assert position == layout.total == layout.offset(layout.n) == sum(counts)
    assert seen == {(s, i) for s, c in enumerate(counts) for i in range(c)}


# -- the planner's guarantees ----------------------------------------------------------------


@FAST
@given(c=configs, world=st.integers(1, 6))
def test_exactly_once_equal_steps_and_windows_of_k_reads(c: dict[str, Any], world: int) -> None:
    try:
        got = plans(c, world)
    except ValueError:
        return  # impossible options (fewer records than ranks, ...): refused elsewhere
    total = sum(c["counts"])
    part, used = rank_records(total, world, options(c))
    seq = global_sequence(c["counts"], options(c), c["epoch"], c["read_records"])
    for r, p in enumerate(got):
        ids = delivered(p, c["counts"])
        # The rank's part of the block-permuted sequence, shuffled.
        assert sorted(ids) == sorted(seq[(r * part + i) % total] for i in range(used))
        assert p.records == used and p.read_count == len(p.reads)
        assert [x.seq for x in p.reads] == list(range(p.read_count))
        for w in p.windows:
            assert 1 <= len(w.reads) <= c["reads"]  # memory: K reads
            assert all(1 <= x.count <= c["read_records"] for x in w.reads)
            assert w.take is not None and sorted(w.take.tolist()) == list(range(w.records))
    everything = [i for p in got for i in delivered(p, c["counts"])]
    if c["remainder"] == "drop":
        assert len(set(everything)) == len(everything) == world * used
    elif not c["drop_last"]:
        assert set(everything) == set(range(total))
    assert len({p.batches for p in got}) == 1
    assert len({p.last_batch_size for p in got}) == 1


@FAST
@given(c=configs, world=st.integers(1, 4))
def test_deterministic_and_indexing_agrees(c: dict[str, Any], world: int) -> None:
    try:
        a, b = plans(c, world), plans(c, world)
    except ValueError:
        return
    for p, q in zip(a, b, strict=True):
        assert delivered(p, c["counts"]) == delivered(q, c["counts"])
        listed = list(p.windows)
        assert len(listed) == len(p.windows)
        for i in range(len(listed)):
            w = p.windows[i]
            assert list(w.reads) == list(listed[i].reads)
            assert w.take is not None and listed[i].take is not None
            assert w.take.tolist() == listed[i].take.tolist()


@settings(max_examples=150, deadline=None)
@given(c=configs, world=st.integers(1, 4), frac=st.floats(0, 1))
def test_same_world_size_resume_is_the_rest_of_the_epoch(
    c: dict[str, Any], world: int, frac: float
) -> None:
    try:
        full = plans(c, world)
    except ValueError:
        return
    k = int(frac * full[0].batches)
    for f, r in zip(full, plans(c, world, [Interruption(world, k)]), strict=True):
        assert batches(r, c["counts"]) == batches(f, c["counts"])[k:]


@settings(max_examples=100, deadline=None)
@given(
    c=configs,
    sizes=st.lists(st.integers(1, 5), min_size=3, max_size=3),
    fracs=st.lists(st.floats(0, 1), min_size=2, max_size=2),
)
def test_elastic_resumes_are_exactly_once_with_equal_steps(
    c: dict[str, Any], sizes: list[int], fracs: list[float]
) -> None:
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
    got += [i for p in third for i in delivered(p, c["counts"])]
    # drop_last: whole batches on every resumed rank, the records past them left out
    cut = [Interruption(w0, k0), Interruption(w1, k1)]
    got += [i for p in plans(c, w2, cut, dropped=True) for i in delivered(p, c["counts"])]
    assert sorted(got) == sorted(i for p in first for i in delivered(p, c["counts"]))
    assert len({p.batches for p in third}) == 1


def test_records_mix_across_shards_and_epochs_differ() -> None:
    counts = [1000] * 16
    opts = PlanOptions(batch_size=50, seed=1, shuffle=True, shuffle_reads=8)
    (p,) = [plan_epoch(counts, epoch=0, rank=0, world_size=1, options=opts, read_records=50)]
    ids = np.array(delivered(p, counts))
    assert sorted(ids.tolist()) == list(range(16_000))
    shard = ids // 1000
    assert np.mean(shard[1:] == shard[:-1]) < 0.3  # 8 reads of mostly 8 shards a window
    reads = p.reads
    assert np.mean([a.shard == b.shard for a, b in itertools.pairwise(reads)]) < 0.2
    # Not shard order, nor within-shard order: file position and delivery barely correlate.
    assert abs(np.corrcoef(ids, np.arange(len(ids)))[0, 1]) < 0.1
    (q,) = [plan_epoch(counts, epoch=1, rank=0, world_size=1, options=opts, read_records=50)]
    assert delivered(q, counts) != ids.tolist()


def test_a_description_of_1e15_records_plans_at_once() -> None:
    opts = PlanOptions(batch_size=64, seed=3, shuffle=True, shuffle_reads=8)
    counts = [250_000_000_000_000, 7, 0, 249_999_999_999_993, 500_000_000_000_000]
    t0 = time.perf_counter()
    p = plan_epoch(counts, epoch=2, rank=5, world_size=8, options=opts, read_records=1000)
    windows = p.windows
    first, last = windows[0], windows[-1]
    n = p.read_count
    assert time.perf_counter() - t0 < 2
    assert p.records == 10**15 // 8 and len(first.reads) == 8
    assert sum(w.records for w in windows[:3]) == sum(w.records for w in list(windows[:3]))
    assert 1 <= len(last.reads) <= 8 and n >= 10**15 // 8 // 1000
    assert all(isinstance(r, Read) for r in first.reads)
    t0 = time.perf_counter()
    history = [Interruption(8, 10**9), Interruption(5, 12345)]
    r = resume_plan(counts, epoch=2, rank=2, world_size=3, options=opts,
                    read_records=1000, history=history)  # fmt: skip
    assert r.windows[0].take is not None and r.read_count > 0
    assert time.perf_counter() - t0 < 2


def test_options_refused() -> None:
    with pytest.raises(ValueError, match="shuffle_reads needs shuffle=True"):
        PlanOptions(batch_size=2, shuffle_reads=8)
    with pytest.raises(ValueError, match="two kinds of shuffle"):
        PlanOptions(batch_size=2, shuffle=True, shuffle_reads=8, shuffle_window=64)
    with pytest.raises(ValueError, match="shuffle_reads must be >= 0"):
        PlanOptions(batch_size=2, shuffle=True, shuffle_reads=-1)
    base = {"dataset": "train", "batch_size": 2, "shuffle": True}
    with pytest.raises(ConfigError, match=r"reads_ahead \(16\) must be >= 2 x shuffle_reads"):
        Loader(["127.0.0.1:1"], **base, shuffle_reads=9, reads_ahead=16)  # type: ignore[arg-type]
    # Not given: as many reads ahead as the shuffle needs (at least 8).
    assert Loader(["127.0.0.1:1"], **base, shuffle_reads=9).config.reads_ahead == 18  # type: ignore[arg-type]
    assert Loader(["127.0.0.1:1"], **base, shuffle_reads=2).config.reads_ahead == 8  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"shuffle_reads must be an int >= 0, got 2\.5"):
        Loader(["127.0.0.1:1"], **base, shuffle_reads=2.5)  # type: ignore[arg-type]


def test_states_pin_the_mode_and_the_read_size() -> None:
    saved = {"version": 1, "dataset": "d", "fingerprint": "f", "epoch": 1, "batches": 2,
             "world_size": 1, "rank": 0, "history": [],
             "options": {"seed": 0, "batch_size": 4, "shuffle": True, "shuffle_window": 0,
                         "remainder": "drop", "drop_last": False}}  # fmt: skip
    old = LoaderState.from_dict(saved)  # saved before shuffle_reads existed
    now = {**saved["options"], "shuffle_reads": 0, "read_bytes": 0, "record_bytes": 0}
    assert old.check(dataset="d", fingerprint="f", options=now) == []
    block = {**now, "shuffle_reads": 8, "read_bytes": 1 << 20}
    assert old.check(dataset="d", fingerprint="f", options=block) == [
        "shuffle_reads 0 vs 8",
        "read_bytes 0 vs 1048576",
    ]
    new = LoaderState.from_dict({**saved, "options": block})
    assert new.check(dataset="d", fingerprint="f", options={**block, "read_bytes": 2 << 20}) == [
        "read_bytes 1048576 vs 2097152"
    ]
    # ragged records: the measured size the reads were cut by (0: not measured)
    assert new.check(dataset="d", fingerprint="f", options={**block, "record_bytes": 4016}) == [
        "record_bytes 0 vs 4016"
    ]


# -- through a worker and a Loader -----------------------------------------------------------

OPTS: dict[str, Any] = {
    "dataset": "train", "batch_size": 32, "seed": 5, "shuffle": True, "shuffle_reads": 4,
    "read_bytes": 4096, "chunk_bytes": 1024, "reads_ahead": 8, "max_inflight_reads": 4,
}  # fmt: skip


async def test_two_ranks_exactly_once_resume_and_epochs(npz_root: Path) -> None:
    async with running_workers(npz_root, 2) as workers:
        addresses = [w.address for w in workers]
        per_rank: list[list[dict[str, np.ndarray]]] = []
        for rank in range(2):
            async with Loader(addresses, rank=rank, world_size=2, **OPTS) as loader:
                plan = loader.plan(0)
                assert all(len(w.reads) <= 4 for w in plan.windows)
                per_rank.append(await collect_epoch(loader, 0))
                assert len(per_rank[-1]) == plan.batches
                again = await collect_epoch(loader, 0)
                assert ids_of(again).tolist() == ids_of(per_rank[-1]).tolist()
                other = await collect_epoch(loader, 1)
                assert ids_of(other).tolist() != ids_of(per_rank[-1]).tolist()
                assert sorted(ids_of(other).tolist()) != ids_of(other).tolist()
        ids = np.concatenate([ids_of(b) for b in per_rank])
        assert sorted(ids.tolist()) == list(range(RECORDS))  # 2000 records: exactly once
        # Mixed: neighbours in a batch seldom share a shard (it would be 31/32 in shard order).
        shard = ids_of(per_rank[0]) // (RECORDS // SHARDS)
        assert np.mean(shard[1:] == shard[:-1]) < 0.5
        assert ids_of(per_rank[0]).tolist() != sorted(ids_of(per_rank[0]).tolist())

        # Stop rank 1 after 7 batches; a new loader from its state gets exactly the rest.
        async with Loader(addresses, rank=1, world_size=2, **OPTS) as loader:
            it = loader.epoch(0)
            head = [await it.__anext__() for _ in range(7)]
            state = loader.state_dict()
            await it.aclose()
        assert state["options"]["shuffle_reads"] == 4 and state["options"]["read_bytes"] == 4096
        async with Loader(addresses, rank=1, world_size=2, state=state, **OPTS) as loader:
            rest = await collect_epoch(loader, loader.start_epoch)
        assert np.concatenate([ids_of(head), ids_of(rest)]).tolist() == ids_of(per_rank[1]).tolist()
        # Another read size cuts other blocks: the state refuses to fit.
        with pytest.raises(StateMismatchError, match="read_bytes 4096 vs 8192"):
            async with Loader(addresses, rank=1, world_size=2, state=state,
                              **{**OPTS, "read_bytes": 8192}):  # fmt: skip
                pass

        # Both ranks stop after 5 batches; 3 ranks take over: exactly once overall.
        states, got = [], []
        for rank in range(2):
            async with Loader(addresses, rank=rank, world_size=2, **OPTS) as loader:
                it = loader.epoch(0)
                got += [await it.__anext__() for _ in range(5)]
                states.append(loader.state_dict())
                await it.aclose()
        steps = set()
        for rank in range(3):
            async with Loader(
                addresses, rank=rank, world_size=3, state=states[0], **OPTS
            ) as loader:
                rest = await collect_epoch(loader, loader.start_epoch)
                steps.add(len(rest))
                got += rest
        assert len(steps) == 1  # equal steps on the new ranks
        assert sorted(ids_of(got).tolist()) == list(range(RECORDS))

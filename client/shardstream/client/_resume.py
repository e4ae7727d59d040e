"""Resuming an epoch part-way, with the same or a different world size.

A rank's plan is a list of windows; each delivers the rows `take` of its
reads' records (all of them, in order, when `take` is None). Resuming works
on that form alone:

- `drop_front(windows, n)`: what remains after the first n delivered records;
- the remains of every old rank, in rank order, form the sequence of records
  not yet delivered this epoch; `split` cuts it into equal parts for the new
  world size. A part one record shorter than the others ends with a hole, so
  every rank still has the same number of batch slots (equal steps).

Resuming with the world size unchanged gives each rank exactly the rest of
its own plan, so a resumed run is identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from shardstream.client._planner import PlanOptions, RankPlan, Read, Window, plan_epoch


@dataclass(frozen=True, slots=True)
class Interruption:
    """All ranks of a `world_size` job had consumed `batches` batches of the epoch."""

    world_size: int
    batches: int


def _cut_reads(reads: Sequence[Read], a: int, b: int) -> tuple[Read, ...]:
    """The records [a, b) of the reads' concatenation, as reads."""
    out = []
    pos = 0
    for r in reads:
        lo, hi = max(a, pos), min(b, pos + r.count)
        if lo < hi:
            out.append(Read(0, r.shard, r.start + lo - pos, hi - lo))
        pos += r.count
    return tuple(out)


def slice_windows(windows: Sequence[Window], a: int, b: int) -> list[Window]:
    """The windows delivering records [a, b) of what `windows` deliver."""
    out = []
    pos = 0
    for w in windows:
        n = w.delivered
        lo, hi = max(a, pos), min(b, pos + n)
        if lo < hi:
            if w.take is None:
                out.append(Window(_cut_reads(w.reads, lo - pos, hi - pos)))
            else:
                out.append(Window(w.reads, w.take[lo - pos : hi - pos]))
        pos += n
    return out


def _renumber(windows: Sequence[Window]) -> tuple[Window, ...]:
    seq = 0
    out = []
    for w in windows:
        reads = []
        for r in w.reads:
            reads.append(replace(r, seq=seq))
            seq += 1
        out.append(Window(tuple(reads), w.take))
    return tuple(out)


def resume_plan(
    shard_records: Sequence[int],
    *,
    epoch: int,
    rank: int,
    world_size: int,
    options: PlanOptions,
    read_records: int,
    history: Sequence[Interruption],
) -> RankPlan:
    """The plan of `rank` in `world_size` for the rest of an epoch interrupted as `history` says
    (oldest first: the epoch started with history[0].world_size ranks)."""
    if not history:
        return plan_epoch(
            shard_records, epoch=epoch, rank=rank, world_size=world_size, options=options,
            read_records=read_records,
        )  # fmt: skip
    b = options.batch_size
    first = history[0]
    ranks: list[list[Window]] = []
    for r in range(first.world_size):
        plan = plan_epoch(
            shard_records, epoch=epoch, rank=r, world_size=first.world_size, options=options,
            read_records=read_records,
        )  # fmt: skip
        ranks.append(list(plan.windows))
    slots = [sum(w.delivered for w in ws) for ws in ranks]
    for step, cut in enumerate(history):
        new_size = history[step + 1].world_size if step + 1 < len(history) else world_size
        # What every old rank has not delivered yet, in rank order.
        remains: list[Window] = []
        for ws, n in zip(ranks, slots, strict=True):
            done = min(cut.batches * b, n)
            total = sum(w.delivered for w in ws)
            remains += slice_windows(ws, min(done, total), total)
        ranks, slots = split(remains, new_size)
    windows = _renumber(ranks[rank])
    n_slots = slots[rank]
    records = sum(w.delivered for w in windows)
    return RankPlan(
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        batch_size=b,
        records=records,
        batches=-(-n_slots // b),
        windows=windows,
        trailing_holes=n_slots - records,
    )


def split(windows: Sequence[Window], world_size: int) -> tuple[list[list[Window]], list[int]]:
    """Cut what `windows` deliver into `world_size` contiguous parts, sizes differing by at
    most one; every part gets the larger size in slots (the shorter ends with a hole)."""
    total = sum(w.delivered for w in windows)
    q, extra = divmod(total, world_size)
    slots = q + (1 if extra else 0)
    parts = []
    pos = 0
    for r in range(world_size):
        size = q + (1 if r < extra else 0)
        parts.append(slice_windows(windows, pos, pos + size))
        pos += size
    return parts, [slots] * world_size


__all__ = ["Interruption", "resume_plan", "slice_windows", "split"]

"""The planner: which records a rank reads in an epoch, and in what order.

Pure and deterministic: the plan depends only on the shard record counts and
(seed, epoch, world size, rank, batch size, policies), never on workers.

An epoch's global sequence is the shards' records in shard order, the shards
permuted by (seed, epoch) when shuffling. The sequence is cut into
`world_size` equal contiguous parts (remainder: `drop` the tail, or `pad` by
wrapping around to the start); rank r takes part r. With `drop_last`, the
part's last partial batch is left out. With a shuffle window W, the records a
rank delivers are shuffled inside consecutive windows of W records (a window
is received whole before any of it is delivered, so W bounds that memory).

    global:  [ shard 3 | shard 0 | shard 2 | shard 1 ]   (permuted per epoch)
    parts:   [ rank 0      | rank 1      | rank 2      ] (+ dropped / padded tail)
    rank 1:  [ window 0 | window 1 | ... ] -> batches of batch_size
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Remainder = Literal["drop", "pad"]


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanOptions:
    """Everything besides the dataset and the rank that decides a plan."""

    seed: int = 0  # base of every permutation
    batch_size: int
    shuffle: bool = False  # permute shard order per (seed, epoch)
    shuffle_window: int = 0  # >1: also shuffle records inside windows of this many records
    remainder: Remainder = "drop"  # records left when N % world_size != 0: drop, or pad by wrap
    drop_last: bool = False  # leave out each rank's last partial batch

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        if self.shuffle_window < 0:
            raise ValueError(f"shuffle_window must be >= 0, got {self.shuffle_window}")
        if self.shuffle_window > 1 and not self.shuffle:
            raise ValueError("shuffle_window needs shuffle=True")
        if self.remainder not in ("drop", "pad"):
            raise ValueError(f"remainder must be 'drop' or 'pad', got {self.remainder!r}")


@dataclass(frozen=True, slots=True)
class Read:
    """Records [start, start + count) of shard number `shard`, the `seq`-th read of a plan."""

    seq: int
    shard: int
    start: int
    count: int


@dataclass(frozen=True, slots=True, eq=False)
class Window:
    """Reads whose records are concatenated, then the rows `take` delivered in that order
    (None: all, as read). A `take` may leave rows out (a resumed, partly delivered window)."""

    reads: tuple[Read, ...]
    take: np.ndarray[Any, np.dtype[np.intp]] | None = None

    @property
    def records(self) -> int:
        """Records read (a `take` may deliver fewer of them, in another order)."""
        return sum(r.count for r in self.reads)

    @property
    def delivered(self) -> int:
        """Records delivered."""
        return self.records if self.take is None else len(self.take)


@dataclass(frozen=True, slots=True, eq=False)
class RankPlan:
    """One rank's reads for one epoch and the batches they make."""

    epoch: int
    rank: int
    world_size: int
    batch_size: int
    records: int  # records this rank delivers this epoch
    batches: int  # equal on every rank
    windows: tuple[Window, ...]
    trailing_holes: int = 0  # empty slots after the last record (an elastic resume's short part)

    @property
    def reads(self) -> tuple[Read, ...]:
        return tuple(r for w in self.windows for r in w.reads)

    @property
    def last_batch_size(self) -> int:
        return self.records + self.trailing_holes - (self.batches - 1) * self.batch_size


def rank_records(total: int, world_size: int, options: PlanOptions) -> tuple[int, int]:
    """(records in each rank's part, records each rank delivers) for a dataset of `total`."""
    if options.remainder == "drop":
        part = total // world_size
        if part == 0:
            raise ValueError(
                f"the dataset has {total} records, fewer than world_size={world_size}: "
                "every rank would get nothing; use remainder='pad' or fewer ranks"
            )
    else:
        part = -(-total // world_size)
    used = part - part % options.batch_size if options.drop_last else part
    if used == 0:
        raise ValueError(
            f"each rank gets {part} records per epoch, fewer than batch_size="
            f"{options.batch_size}, and drop_last=True would leave no batch; "
            "use a smaller batch_size or drop_last=False"
        )
    return part, used


def plan_epoch(
    shard_records: Sequence[int],
    *,
    epoch: int,
    rank: int,
    world_size: int,
    options: PlanOptions,
    read_records: int,
) -> RankPlan:
    """This rank's plan for `epoch`; reads hold at most `read_records` records."""
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if epoch < 0:
        raise ValueError(f"epoch must be non-negative, got {epoch}")
    if read_records < 1:
        raise ValueError(f"read_records must be positive, got {read_records}")
    if not shard_records or any(n < 0 for n in shard_records):
        raise ValueError("shard_records must be a non-empty list of non-negative counts")
    total = sum(shard_records)
    if total == 0:
        raise ValueError("the dataset has no records")

    part, used = rank_records(total, world_size, options)
    order = shard_order(len(shard_records), epoch=epoch, options=options)
    first = rank * part  # global position of this rank's first record

    shuffled = options.shuffle and options.shuffle_window > 1
    window = options.shuffle_window if shuffled else used
    windows: list[Window] = []
    seq = 0
    for w_start in range(0, used, window):
        w_len = min(window, used - w_start)
        reads = []
        for shard, start, count in _runs(
            shard_records, order, first + w_start, w_len, read_records
        ):
            reads.append(Read(seq, shard, start, count))
            seq += 1
        take = None
        if shuffled:
            take = _rng(options.seed, epoch, 1, first + w_start).permutation(w_len).astype(np.intp)
        windows.append(Window(tuple(reads), take))
    batches = -(-used // options.batch_size)
    return RankPlan(
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        batch_size=options.batch_size,
        records=used,
        batches=batches,
        windows=tuple(windows),
    )


def shard_order(n_shards: int, *, epoch: int, options: PlanOptions) -> list[int]:
    """The epoch's shard order: permuted by (seed, epoch) when shuffling."""
    if not options.shuffle:
        return list(range(n_shards))
    return [int(i) for i in _rng(options.seed, epoch, 0).permutation(n_shards)]


def _runs(
    shard_records: Sequence[int], order: Sequence[int], position: int, length: int, limit: int
) -> Iterator[tuple[int, int, int]]:
    """(shard, start, count) runs covering global positions [position, position + length).

    Positions past the end wrap around (the `pad` remainder). Runs break at shard
    ends and every `limit` records counted from `position`.
    """
    total = sum(shard_records)
    offsets = np.cumsum([0] + [shard_records[s] for s in order])
    done = 0
    while done < length:
        p = (position + done) % total
        k = int(np.searchsorted(offsets, p, side="right")) - 1
        shard = order[k]
        start = p - int(offsets[k])
        count = min(shard_records[shard] - start, length - done, limit - done % limit)
        yield shard, start, count
        done += count


def _rng(seed: int, epoch: int, purpose: int, key: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, purpose, key])))

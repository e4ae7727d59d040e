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

With `shuffle_reads=K` (record-level shuffle) the global sequence is instead
the shards cut into blocks of `read_records` records, the blocks permuted by
(seed, epoch) (`_blocks`), so consecutive reads come from different shards. A
rank reads a block at a time (the first and last cut by its part's ends) and
delivers each group of K consecutive blocks in a seeded order of all their
records: a window of K reads, which bounds that memory to K reads.

    global:  [ 1.1 | 0.2 | 2.0 | 0.0 | 1.0 | 0.1 | 2.1 | 1.2 ]   (shard.block, permuted)
    rank 1:       [ 0.2 | 2.0 | 0.0 | 1.0 | 0.1 ]                (K = 2: 3 windows)

A plan is worked out as it is looked at: making one costs time and memory in
proportion to the shards (and, resuming, to the old ranks' parts this rank
takes over), never to the records: a description claiming 10**15 records plans
at once. Its windows and their reads are computed from positions when they are
iterated or indexed (`Windows`, `ReadRun`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, overload

import numpy as np

from shardstream.client._blocks import BlockLayout

Remainder = Literal["drop", "pad"]

SEED_LIMIT = 1 << 64  # seeds travel as uint64 on the wire


T = TypeVar("T")


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanOptions:
    """Everything besides the dataset and the rank that decides a plan."""

    seed: int = 0  # base of every permutation
    batch_size: int
    shuffle: bool = False  # permute shard order per (seed, epoch)
    shuffle_window: int = 0  # >1: also shuffle records inside windows of this many records
    # >0: record-level shuffle instead: blocks of one read permuted over all shards, records
    # shuffled in groups of this many reads (a state saved before it existed means 0)
    shuffle_reads: int = 0
    # With shuffle_reads: LoaderConfig.read_bytes, which (with the schema) sets the reads,
    # hence the blocks; kept here so a state pins it. 0 otherwise. The planner reads only
    # its `read_records` argument.
    read_bytes: int = 0
    # With shuffle_reads and ragged fields: the record size the reads were sized by, the
    # description's measured mean (`DatasetDesc.record_bytes`; 0: unmeasured, a guess).
    record_bytes: int = 0
    remainder: Remainder = "drop"  # records left when N % world_size != 0: drop, or pad by wrap
    drop_last: bool = False  # leave out each rank's last partial batch

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.shuffle_window < 0:
            raise ValueError(f"shuffle_window must be >= 0, got {self.shuffle_window}")
        if self.shuffle_window > 1 and not self.shuffle:
            raise ValueError("shuffle_window needs shuffle=True")
        if self.shuffle_reads < 0:
            raise ValueError(f"shuffle_reads must be >= 0, got {self.shuffle_reads}")
        if self.shuffle_reads and not self.shuffle:
            raise ValueError("shuffle_reads needs shuffle=True")
        if self.shuffle_reads and self.shuffle_window > 1:
            raise ValueError(
                "shuffle_reads and shuffle_window are two kinds of shuffle: give one "
                f"(got shuffle_reads={self.shuffle_reads}, shuffle_window={self.shuffle_window})"
            )
        if self.read_bytes < 0:
            raise ValueError(f"read_bytes must be >= 0, got {self.read_bytes}")
        if self.record_bytes < 0:
            raise ValueError(f"record_bytes must be >= 0, got {self.record_bytes}")
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

    reads: Sequence[Read]
    take: np.ndarray[Any, np.dtype[np.intp]] | None = None

    @property
    def records(self) -> int:
        """Records read (a `take` may deliver fewer of them, in another order)."""
        if isinstance(self.reads, ReadRun):
            return self.reads.records
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
    windows: Sequence[Window]  # computed when looked at (see `Windows`)
    trailing_holes: int = 0  # empty slots after the last record (an elastic resume's short part)
    read_records: int = 0  # most records a read holds (with shuffle_reads, the block size)

    @property
    def reads(self) -> tuple[Read, ...]:
        """Every read, in order (all of them at once: as many as the plan has)."""
        return tuple(r for w in self.windows for r in w.reads)

    @property
    def read_count(self) -> int:
        """How many reads the plan has (without making them)."""
        if isinstance(self.windows, Windows):
            return self.windows.read_count
        return sum(len(w.reads) for w in self.windows)

    @property
    def last_batch_size(self) -> int:
        return self.records + self.trailing_holes - (self.batches - 1) * self.batch_size


MAX_EPOCH = 2**63 - 1  # the wire's epoch is a uint64; a state's counts are int64


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
    grid = epoch_grid(
        shard_records, epoch=epoch, world_size=world_size, options=options,
        read_records=read_records,
    )  # fmt: skip
    check_rank(rank, world_size)
    return RankPlan(
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        batch_size=options.batch_size,
        records=grid.used,
        batches=-(-grid.used // options.batch_size),
        windows=Windows(grid, [(int(rank), 0, grid.used)]),
        read_records=int(read_records),
    )


def check_rank(rank: int, world_size: int) -> None:
    """ValueError unless `world_size` is a positive int and `rank` an int below it."""
    if not _is_int(world_size) or world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size!r}")
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")


def epoch_grid(
    shard_records: Sequence[int],
    *,
    epoch: int,
    world_size: int,
    options: PlanOptions,
    read_records: int,
) -> Grid | BlockGrid:
    """Every rank's part of `epoch` with `world_size` ranks (checks the arguments)."""
    check_rank(0, world_size)
    if not _is_int(epoch) or not 0 <= epoch <= MAX_EPOCH:
        raise ValueError(f"epoch must be an int in [0, 2**63 - 1], got {epoch!r}")
    if not _is_int(read_records) or read_records < 1:
        raise ValueError(f"read_records must be positive, got {read_records}")
    counts = tuple(int(n) for n in shard_records)
    if not counts or any(n < 0 for n in counts):
        raise ValueError("shard_records must be a non-empty list of non-negative counts")
    total = sum(counts)
    if total == 0:
        raise ValueError("the dataset has no records")
    part, used = rank_records(total, int(world_size), options)
    if options.shuffle and options.shuffle_reads:
        return BlockGrid(
            blocks=BlockLayout(counts, int(read_records), (options.seed, int(epoch), 2)),
            part=part,
            used=used,
            group=options.shuffle_reads,
            seed=options.seed,
            epoch=int(epoch),
        )
    layout = Layout(counts, tuple(shard_order(len(counts), epoch=epoch, options=options)))
    shuffled = options.shuffle and options.shuffle_window > 1
    return Grid(
        layout=layout,
        part=part,
        used=used,
        width=options.shuffle_window if shuffled else used,
        shuffled=shuffled,
        limit=int(read_records),
        seed=options.seed,
        epoch=int(epoch),
    )


def shard_order(n_shards: int, *, epoch: int, options: PlanOptions) -> list[int]:
    """The epoch's shard order: permuted by (seed, epoch) when shuffling."""
    if not options.shuffle:
        return list(range(n_shards))
    return [int(i) for i in _rng(options.seed, epoch, 0).permutation(n_shards)]


class Layout:
    """An epoch's global sequence: the shards' records in epoch order, repeating (the
    `pad` remainder wraps around). Positions past the end continue at the start."""

    def __init__(self, counts: Sequence[int], order: Sequence[int]) -> None:
        self.counts = tuple(counts)
        self.order = tuple(order)
        self.offsets = [0]  # global position of each ordered shard's first record, then total
        for s in self.order:
            self.offsets.append(self.offsets[-1] + self.counts[s])
        self.total = self.offsets[-1]
        # Where a non-empty shard begins, within one pass: where reads break.
        self.starts = sorted(
            {o for o, s in zip(self.offsets[:-1], self.order, strict=True) if self.counts[s]}
        )

    def runs(self, position: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(shard, start in the shard, count): the shard runs of [position, position + length)."""
        done = 0
        while done < length:
            p = (position + done) % self.total
            k = bisect.bisect_right(self.offsets, p) - 1
            shard = self.order[k]
            start = p - self.offsets[k]
            count = min(self.counts[shard] - start, length - done)
            yield shard, start, count
            done += count

    def breaks(self, a: int, b: int) -> Iterator[int]:
        """Positions in (a, b) where a shard begins, in order."""
        for lap in range(a // self.total, (b - 1) // self.total + 1):
            base = lap * self.total
            lo = bisect.bisect_right(self.starts, a - base)
            hi = bisect.bisect_left(self.starts, b - base)
            for s in self.starts[lo:hi]:
                yield base + s


class _Lazy(Sequence[T]):
    """A sequence whose items are computed when asked for: subclasses give `__len__`
    and `_item(i)` for 0 <= i < len; indexing (negative too) and slices come from here."""

    _what = "item"

    def _item(self, i: int) -> T:
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[T, ...]: ...
    def __getitem__(self, i: int | slice) -> T | tuple[T, ...]:
        if isinstance(i, slice):
            return tuple(self._item(j) for j in range(*i.indices(len(self))))
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self._what} {i} of {n}")
        return self._item(i)


class ReadRun(_Lazy[Read]):
    """The reads of global positions [origin + lo, origin + hi), worked out on demand:
    a read breaks at shard ends and every `limit` records counted from `origin`; the
    first is the plan's `seq`-th read."""

    __slots__ = ("_limit", "_prefix", "_runs", "_seq", "records")

    def __init__(self, layout: Layout, origin: int, lo: int, hi: int, limit: int, seq: int) -> None:
        self.records = hi - lo
        self._limit = limit
        self._seq = seq
        # Shard runs as (first position relative to origin, end, shard, start in shard).
        self._runs: list[tuple[int, int, int, int]] = []
        self._prefix = [0]  # reads before each run
        pos = lo
        for shard, start, count in layout.runs(origin + lo, hi - lo):
            self._runs.append((pos, pos + count, shard, start))
            self._prefix.append(self._prefix[-1] + (pos + count - 1) // limit - pos // limit + 1)
            pos += count

    def __len__(self) -> int:
        return self._prefix[-1]

    _what = "read"

    def _item(self, i: int) -> Read:
        k = bisect.bisect_right(self._prefix, i) - 1
        return self._read(k, i - self._prefix[k], i)

    def __iter__(self) -> Iterator[Read]:
        i = 0
        for k in range(len(self._runs)):
            for j in range(self._prefix[k + 1] - self._prefix[k]):
                yield self._read(k, j, i)
                i += 1

    def _read(self, k: int, j: int, i: int) -> Read:
        """The j-th read of run k, the i-th of this run of reads."""
        a, b, shard, start = self._runs[k]
        block = a // self._limit + j
        lo = a if j == 0 else block * self._limit
        hi = min(b, (block + 1) * self._limit)
        return Read(self._seq + i, shard, start + lo - a, hi - lo)

    def __repr__(self) -> str:
        return f"ReadRun({len(self)} reads, {self.records} records)"


@dataclass(frozen=True, kw_only=True, slots=True)
class Grid:
    """Every rank's part of one epoch: rank r delivers `used` records from global
    position r * part, in windows of `width` records (one window when not shuffled)."""

    layout: Layout
    part: int
    used: int
    width: int  # records per window
    shuffled: bool
    limit: int  # records per read
    seed: int
    epoch: int

    def windows_of(self, rank: int, a: int, b: int) -> tuple[int, int]:
        """The windows [i0, i1) holding delivered records [a, b) of `rank`."""
        return a // self.width, (b - 1) // self.width + 1

    def span(self, rank: int, i: int) -> tuple[int, int]:
        """Delivered records [start, end) of window i of `rank` (end may pass `used`)."""
        return i * self.width, (i + 1) * self.width

    def window(self, rank: int, i: int, lo: int, hi: int, seq: int) -> Window:
        """Window i of `rank`, delivering its records [lo, hi) (counted from the rank's
        first record); its reads are the plan's from the `seq`-th on."""
        origin = rank * self.part + i * self.width
        if not self.shuffled:  # one window: a part of it is a part of its reads
            return Window(ReadRun(self.layout, rank * self.part, lo, hi, self.limit, seq))
        n = min(self.width, self.used - i * self.width)
        reads = ReadRun(self.layout, origin, 0, n, self.limit, seq)
        take = _rng(self.seed, self.epoch, 1, origin).permutation(n).astype(np.intp)
        a, b = lo - i * self.width, hi - i * self.width
        return Window(reads, take if (a, b) == (0, n) else take[a:b])

    def reads_in(self, rank: int, a: int, b: int) -> int:
        """Reads of the windows holding delivered records [a, b) of `rank`."""
        first = rank * self.part
        if not self.shuffled:
            return len(ReadRun(self.layout, first, a, b, self.limit, 0))
        w, limit = self.width, self.limit
        i0, i1 = self.windows_of(rank, a, b)
        end = min(i1 * w, self.used)
        full = min(i1, self.used // w) - i0  # windows of w records; the last may be shorter
        n = full * -(-w // limit)
        if i0 + full < i1:
            n += -(-(end - (i1 - 1) * w) // limit)
        for g in self.layout.breaks(first + i0 * w, first + end):
            x = (g - first) % w
            n += x != 0 and x % limit != 0  # a shard's start that is not a read's anyway
        return n


@dataclass(frozen=True, kw_only=True, slots=True)
class BlockGrid:
    """Every rank's part of a block-shuffled epoch: rank r delivers `used` records from
    global position r * part (past the end: around again), read a block at a time; its
    windows are `group` consecutive blocks (the first and last cut by the part's ends),
    delivered in a seeded order. Blocks are numbered on over passes (`_number`)."""

    blocks: BlockLayout
    part: int
    used: int
    group: int  # blocks (reads) per window
    seed: int
    epoch: int

    def _number(self, position: int) -> int:
        """The block holding a global position, counted over passes."""
        lap, p = divmod(position, self.blocks.total)
        return lap * self.blocks.n + self.blocks.index(p)

    def _start(self, number: int) -> int:
        """Global position of block `number`'s first record."""
        lap, k = divmod(number, self.blocks.n)
        return lap * self.blocks.total + self.blocks.offset(k)

    def windows_of(self, rank: int, a: int, b: int) -> tuple[int, int]:
        first = rank * self.part
        g0 = self._number(first)
        return (self._number(first + a) - g0) // self.group, (
            self._number(first + b - 1) - g0
        ) // self.group + 1

    def span(self, rank: int, i: int) -> tuple[int, int]:
        first = rank * self.part
        g = self._number(first) + i * self.group
        start = 0 if i == 0 else self._start(g) - first
        return start, min(self.used, self._start(g + self.group) - first)

    def window(self, rank: int, i: int, lo: int, hi: int, seq: int) -> Window:
        first = rank * self.part
        start, end = self.span(rank, i)
        g = self._number(first + start)
        reads: list[Read] = []
        while (at := self._start(g)) < first + end:
            shard, offset, count = self.blocks.block(g % self.blocks.n)
            a, b = max(at, first + start), min(at + count, first + end)
            reads.append(Read(seq + len(reads), shard, offset + a - at, b - a))
            g += 1
        n = end - start
        take = _rng(self.seed, self.epoch, 3, first + start).permutation(n).astype(np.intp)
        return Window(reads, take if (lo, hi) == (start, end) else take[lo - start : hi - start])

    def reads_in(self, rank: int, a: int, b: int) -> int:
        first = rank * self.part
        g0 = self._number(first)
        end = self._number(first + self.used - 1) + 1
        i0, i1 = self.windows_of(rank, a, b)
        return min(g0 + i1 * self.group, end) - (g0 + i0 * self.group)


class Windows(_Lazy[Window]):
    """A plan's windows, worked out when looked at: the windows of some ranks' delivered
    records [a, b) of a `Grid`, in the order of `pieces` (rank, a, b), reads numbered
    on. A piece never merges with the next, even where they meet."""

    __slots__ = ("_grid", "_pieces", "_seqs", "_starts")

    def __init__(self, grid: Grid | BlockGrid, pieces: Sequence[tuple[int, int, int]]) -> None:
        self._grid = grid
        self._pieces = tuple(pieces)
        self._starts = [0]  # windows before each piece
        self._seqs = [0]  # reads before each piece
        for rank, a, b in self._pieces:
            i0, i1 = grid.windows_of(rank, a, b)
            self._starts.append(self._starts[-1] + i1 - i0)
            self._seqs.append(self._seqs[-1] + grid.reads_in(rank, a, b))

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def read_count(self) -> int:
        """How many reads the windows have."""
        return self._seqs[-1]

    _what = "window"

    def _item(self, i: int) -> Window:
        p = bisect.bisect_right(self._starts, i) - 1
        rank, a, b = self._pieces[p]
        i0, _ = self._grid.windows_of(rank, a, b)
        k = i0 + i - self._starts[p]
        start, end = self._grid.span(rank, k)
        seq = self._seqs[p] + (self._grid.reads_in(rank, a, start) if k > i0 else 0)
        return self._grid.window(rank, k, max(a, start), min(b, end), seq)

    def __iter__(self) -> Iterator[Window]:
        grid = self._grid
        for (rank, a, b), seq in zip(self._pieces, self._seqs, strict=False):
            i0, i1 = grid.windows_of(rank, a, b)
            for k in range(i0, i1):
                start, end = grid.span(rank, k)
                window = grid.window(rank, k, max(a, start), min(b, end), seq)
                seq += len(window.reads)
                yield window

    def __repr__(self) -> str:
        return f"Windows({len(self)} windows, {self.read_count} reads)"


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _rng(seed: int, epoch: int, purpose: int, key: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, purpose, key])))

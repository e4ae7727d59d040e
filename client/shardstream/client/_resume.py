"""Resuming an epoch part-way, with the same or a different world size.

Every rank of the epoch's first world size delivers `used` records; side by
side, in rank order, they form the sequence S of the epoch's deliveries. An
interruption of a job of n ranks that had consumed k batches each turns the
sequence that job was splitting into the sequence of what it had not
delivered yet: cut it into n equal parts (`split`: sizes differing by at
most one), and keep each part's records after its first k batches. The next
job splits that sequence again, and so on; the last split gives each rank of
the resumed job its part. A part one record shorter than the others ends with
a hole, so every rank still has the same number of batch slots (equal steps).

Only this rank's part is ever worked out: it is mapped back, interruption by
interruption, to runs of the first ranks' deliveries, and those to windows and
reads (`Windows`), so a resume costs what this rank reads, whatever the world
sizes and the size of the dataset.

Resuming with the world size unchanged gives each rank exactly the rest of
its own plan, so a resumed run is identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from shardstream.client._planner import (
    PlanOptions,
    RankPlan,
    Windows,
    check_rank,
    epoch_grid,
    plan_epoch,
)
from shardstream.client.errors import StateMismatchError


@dataclass(frozen=True, slots=True)
class Interruption:
    """All ranks of a `world_size` job had consumed `batches` batches of the epoch."""

    world_size: int
    batches: int


def split(length: int, parts: int, part: int) -> tuple[int, int, int]:
    """(first, size, slots) of `part` when `length` records are cut into `parts` parts
    whose sizes differ by at most one; every part has the larger size in slots."""
    q, extra = divmod(length, parts)
    return part * q + min(part, extra), q + (part < extra), q + (extra > 0)


@dataclass(frozen=True, slots=True)
class _Rest:
    """What a job of `parts` ranks had not delivered when interrupted after `done`
    records each, of a sequence of `length` records it was splitting: part j's
    records after its first `done`, side by side in part order."""

    length: int
    parts: int
    done: int

    @property
    def _sizes(self) -> tuple[int, int, int]:
        """(parts of the larger size, what remains of each of those, of the others)."""
        q, extra = divmod(self.length, self.parts)
        return extra, q + 1 - min(self.done, q + 1), q - min(self.done, q)

    @property
    def size(self) -> int:
        """Records in this sequence (not `len()`: that stops at 2**63)."""
        extra, big, small = self._sizes
        return extra * big + (self.parts - extra) * small

    def sources(self, a: int, b: int) -> Iterator[tuple[int, int]]:
        """Records [a, b) of this sequence as runs of the sequence split, one per part."""
        extra, big, small = self._sizes
        j = a // big if a < extra * big else extra + (a - extra * big) // small
        while a < b:
            at = j * big if j < extra else extra * big + (j - extra) * small  # j's start here
            first, size, _ = split(self.length, self.parts, j)
            start = first + min(self.done, size)  # j's rest starts there in the sequence split
            end = min(b, at + (big if j < extra else small))
            yield start + a - at, start + end - at
            a, j = end, j + 1


def resume_plan(
    shard_records: Sequence[int],
    *,
    epoch: int,
    rank: int,
    world_size: int,
    options: PlanOptions,
    read_records: int,
    history: Sequence[Interruption],
    dropped: bool = False,
) -> RankPlan:
    """The plan of `rank` in `world_size` for the rest of an epoch interrupted as `history` says
    (oldest first: the epoch started with history[0].world_size ranks).

    With `drop_last`, every rank gets as many whole batches as the shortest part holds
    (parts may differ by one record, and a partial last batch of another size on each
    rank would break the one shape per step that drop_last promises): the records past
    them are left out, as an uninterrupted epoch leaves out each rank's partial batch.
    `dropped=True` gives the plan of those records instead (for the ledger's audit).

    Raises `StateMismatchError` for an interruption after more batches than its job had."""
    if dropped and not history:
        raise ValueError("an epoch's own plan leaves out no records of its parts")
    if not history:
        return plan_epoch(
            shard_records, epoch=epoch, rank=rank, world_size=world_size, options=options,
            read_records=read_records,
        )  # fmt: skip
    check_rank(rank, world_size)
    b = options.batch_size
    for cut in history:
        if not (isinstance(cut.world_size, int) and isinstance(cut.batches, int)) or (
            cut.world_size < 1 or cut.batches < 0
        ):
            raise StateMismatchError(f"an impossible interruption in the state: {cut}")
    grid = epoch_grid(
        shard_records, epoch=epoch, world_size=history[0].world_size, options=options,
        read_records=read_records,
    )  # fmt: skip
    rests: list[_Rest] = []
    length = history[0].world_size * grid.used  # S: every first rank's deliveries
    for step, cut in enumerate(history):
        *_, slots = split(length, cut.world_size, 0)
        batches = -(-slots // b)
        if cut.batches > batches:
            when = f" after {step} interruption(s)" if step else ""
            raise StateMismatchError(
                f"the state says {cut.batches} batches of epoch {epoch} were consumed with "
                f"world_size={cut.world_size}{when}, but the epoch has {batches}: "
                "a state of another dataset or options?"
            )
        rests.append(_Rest(length, cut.world_size, min(cut.batches * b, slots)))
        length = rests[-1].size
    first, size, n_slots = split(length, world_size, rank)
    if options.drop_last:
        keep = length // world_size // b * b  # whole batches of the shortest part
        if dropped:
            first, size = first + keep, size - keep
        else:
            size = n_slots = keep
    elif dropped:
        size = 0
    runs = [(first, first + size)] if size else []
    for rest in reversed(rests):
        runs = [run for a, z in runs for run in rest.sources(a, z)]
    pieces = []  # runs of S as (first rank, delivered records [a, z)), never across ranks
    for a, z in runs:
        while a < z:
            r, x = divmod(a, grid.used)
            end = min(z, (r + 1) * grid.used)
            pieces.append((r, x, x + end - a))
            a = end
    return RankPlan(
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        batch_size=b,
        records=size,
        batches=-(-(size if dropped else n_slots) // b),
        windows=Windows(grid, pieces),
        trailing_holes=0 if dropped else n_slots - size,
        read_records=int(read_records),
    )


__all__ = ["Interruption", "resume_plan", "split"]
